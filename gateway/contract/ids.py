"""Deterministic event ids.

An inbound event's id is derived from where it came from, so a provider's
retry of the same webhook yields the same id: the runtime dedupes on it and a
consumer can always dedupe on it too.
"""

from __future__ import annotations

import hashlib
import uuid
from functools import lru_cache

#: Namespace of every id the gateway derives (uuid5).
NAMESPACE = uuid.UUID("6f1c2b8e-3f0a-5d7c-9a41-2f6e0c1d7b3a")
_NAMESPACE_BYTES = NAMESPACE.bytes


def _uuid5(name: str) -> str:
    """``str(uuid.uuid5(NAMESPACE, name))`` without the UUID object.

    Every inbound event derives its id here; the stdlib builds an int-backed
    UUID and formats it back, which costs more than the SHA-1 itself.
    """
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def inbound_event_id(provider: str, account: str, kind: str, *provider_ids: str) -> str:
    """Id of an inbound event: the same inputs always give the same id.

    ``kind`` tells apart several events about one provider object (a message
    and each of its status callbacks); ``provider_ids`` are the provider's own
    identifiers (message SID, status name, error code ...).
    """
    # No provider id at all would give every event of this kind one id, and
    # dedup would then drop all but the first.
    if not provider_ids or not all(provider_ids):
        raise ValueError("inbound_event_id needs non-empty provider ids")
    return _uuid5("\x1f".join((provider, account, kind, *provider_ids)))


def new_id() -> str:
    """A fresh random id (outbound messages, commands)."""
    return str(uuid.uuid4())


@lru_cache(maxsize=65536)  # the same pairs keep talking; uuid5 is a hash per call
def conversation_id(channel: str, business_address: str, customer_address: str) -> str:
    """Stable id of the conversation between one of our addresses and a customer."""
    return _uuid5("\x1f".join(("conversation", channel, business_address, customer_address)))
