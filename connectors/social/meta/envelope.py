"""Meta's webhook envelope: ``{"object": ..., "entry": [...]}``, parsed strictly.

Every entry of a batch counts: the callers iterate ``entry[] x changes[]``
(WhatsApp) or ``entry[] x messaging[]`` (Messenger, Instagram) completely and
never stop at the first item (pywa #229, Chatwoot's ``.first``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from gateway.api.v1.envelope_pb2 import RawPayload
from gateway.contract import BadRequestError, WebhookRequest


def envelope(request: WebhookRequest, expected_object: str) -> list[Mapping[str, Any]]:
    """The ``entry`` list of a webhook for ``expected_object`` (a 400 otherwise)."""
    body = request.json()
    if not isinstance(body, dict):
        raise BadRequestError("webhook body must be a JSON object")
    if body.get("object") != expected_object:
        raise BadRequestError(
            f"webhook for object {body.get('object')!r}, expected {expected_object!r}"
        )
    entries = body.get("entry")
    if not isinstance(entries, list):
        raise BadRequestError("webhook without an entry list")
    return [_object(e, "entry") for e in entries]


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise BadRequestError(f"{where} is not an object")
    return value


def items(parent: Mapping[str, Any], name: str) -> Iterator[Mapping[str, Any]]:
    """Every object of the list ``parent[name]`` (absent: none; not a list: 400)."""
    value = parent.get(name)
    if value is None:
        return
    if not isinstance(value, list):
        raise BadRequestError(f"{name} is not a list")
    for item in value:
        yield _object(item, name)


def text(parent: Mapping[str, Any], name: str, default: str = "") -> str:
    """A string field (numbers written as strings are accepted); 400 on other types."""
    value = parent.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRequestError(f"{name} is not a string")
    return str(value)


def required(parent: Mapping[str, Any], name: str) -> str:
    """A non-empty string field; 400 when missing."""
    value = text(parent, name)
    if not value:
        raise BadRequestError(f"missing {name}")
    return value


def unix_time(value: Any, *, millis: bool = False) -> datetime | None:
    """A Unix timestamp (seconds, or milliseconds as Messenger writes them)."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise BadRequestError(f"malformed timestamp {value!r}") from exc
    return datetime.fromtimestamp(number / 1000 if millis else number, UTC)


def raw_item(item: Mapping[str, Any]) -> RawPayload:
    """One batch item as JSON: the escape hatch carries the item, not the whole batch."""
    data = json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode()
    return RawPayload(content_type="application/json", data=data)
