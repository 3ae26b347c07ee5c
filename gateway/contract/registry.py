"""Connector lookup by name through the ``gateway.connectors`` entry-point group.

Installing a distribution that declares an entry point is all it takes to add
a connector; the registry never scans folders.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points

from gateway.contract.connector import ConnectorSpec
from gateway.contract.errors import ConnectorNotFoundError

GROUP = "gateway.connectors"


def available() -> list[str]:
    """Names of every installed connector (``sms.twilio`` ...), sorted."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def load(name: str) -> ConnectorSpec:
    """The spec of connector ``name``; a clear error when it is misspelled or missing."""
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        names = available()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConnectorNotFoundError(
            f"no connector named {name!r} in entry-point group {GROUP!r}: misspelled, or its "
            f"package is not installed.{hint} Installed: {', '.join(names) or 'none'}"
        )
    try:
        spec = matches[0].load()
    except Exception as exc:
        # as one clear error naming the connector, with the original as its cause.
        raise ConnectorNotFoundError(
            f"connector {name!r} is installed but failed to load ({matches[0].value}): {exc}"
        ) from exc
    if not isinstance(spec, ConnectorSpec):
        raise ConnectorNotFoundError(
            f"entry point {name!r} ({matches[0].value}) is not a ConnectorSpec"
        )
    if spec.name != name:
        raise ConnectorNotFoundError(f"entry point {name!r} names connector {spec.name!r}")
    return spec


def for_channel(channel: str) -> list[str]:
    """Names of the installed connectors of one channel."""
    return [n for n in available() if n.split(".", 1)[0] == channel]
