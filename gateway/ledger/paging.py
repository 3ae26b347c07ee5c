"""AIP-158 page tokens of :meth:`gateway.ledger.Ledger.list`: opaque, tied to the filter."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import datetime

from gateway.ledger.models import (
    InvalidPageTokenError,
    ListFilter,
    as_utc,
)


def filter_digest(flt: ListFilter) -> str:
    """A short digest of the filter, so a token only works with its filter."""
    parts = (
        flt.conversation_id,
        flt.correlation_id,
        as_utc(flt.since).isoformat() if flt.since else "",
        as_utc(flt.until).isoformat() if flt.until else "",
    )
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def encode_token(created: datetime, message_id: str, digest: str) -> str:
    """An opaque token for the position after (created, message_id)."""
    data = json.dumps({"v": 1, "c": created.isoformat(), "m": message_id, "f": digest})
    return base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")


def decode_token(token: str, digest: str) -> tuple[datetime, str]:
    """The position of a token; :class:`InvalidPageTokenError` if it is not ours."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        created = datetime.fromisoformat(data["c"])
        message_id = data["m"]
        token_digest = data["f"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidPageTokenError("malformed page token") from exc
    if data.get("v") != 1 or not isinstance(message_id, str):
        raise InvalidPageTokenError("malformed page token")
    if token_digest != digest:
        raise InvalidPageTokenError("page token belongs to a different filter")
    return created.replace(tzinfo=None), message_id
