"""Secrets in configuration: only from the environment or a file.

A config file names where a secret lives (``{env: NAME}`` or ``{file: PATH}``),
never the secret itself, so config files can be committed and shown. The
resolved value is a :class:`pydantic.SecretStr`, which never prints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, SecretStr, ValidationInfo

#: Values found in example configs and docs; a service refuses to start on them.
EXAMPLE_SECRET_MARKERS = ("changeme", "change-me", "example", "your_", "xxxxxxxx", "<")


def _resolve(value: Any, info: ValidationInfo) -> SecretStr:
    environ: Mapping[str, str] = (info.context or {}).get("environ", os.environ)
    if isinstance(value, SecretStr):
        return value
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ValueError(
            "secrets are read from the environment or a file: write {env: NAME} or "
            "{file: /path}, never the secret itself"
        )
    ((source, where),) = value.items()
    if source == "env":
        if where not in environ or not environ[where]:
            raise ValueError(f"environment variable {where} is not set")
        secret = environ[where]
    elif source == "file":
        try:
            secret = Path(where).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read secret file {where}: {exc.strerror}") from exc
        if not secret:
            raise ValueError(f"secret file {where} is empty")
    else:
        raise ValueError(f"unknown secret source {source!r}: use env or file")
    lowered = secret.lower()
    if any(marker in lowered for marker in EXAMPLE_SECRET_MARKERS):
        raise ValueError(f"secret from {source} {where} is an example value; set a real one")
    return SecretStr(secret)


#: A config field holding a secret reference, resolved to ``SecretStr``.
Secret = Annotated[SecretStr, BeforeValidator(_resolve)]
