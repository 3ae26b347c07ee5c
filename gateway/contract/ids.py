"""Deterministic event ids.

An inbound event's id is derived from where it came from, so a provider's
retry of the same webhook yields the same id: the runtime dedupes on it and a
consumer can always dedupe on it too.
"""

from __future__ import annotations

import uuid
from functools import lru_cache

#: Namespace of every id the gateway derives (uuid5).
NAMESPACE = uuid.UUID("6f1c2b8e-3f0a-5d7c-9a41-2f6e0c1d7b3a")


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
    name = "\x1f".join((provider, account, kind, *provider_ids))
    return str(uuid.uuid5(NAMESPACE, name))


def new_id() -> str:
    """A fresh random id (outbound messages, commands)."""
    return str(uuid.uuid4())


@lru_cache(maxsize=65536)  # the same pairs keep talking; uuid5 is a hash per call
def conversation_id(channel: str, business_address: str, customer_address: str) -> str:
    """Stable id of the conversation between one of our addresses and a customer."""
    return str(
        uuid.uuid5(
            NAMESPACE, "\x1f".join(("conversation", channel, business_address, customer_address))
        )
    )
