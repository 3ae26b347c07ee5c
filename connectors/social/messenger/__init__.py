"""Messenger (Meta Messenger Platform): entry point ``messenger.meta``."""

from connectors.social.messenger.connector import (
    DEDUP_TTL_SECONDS,
    MessagingConnector,
    MessagingSettings,
)
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="messenger",
    provider="meta",
    settings=MessagingSettings,
    factory=MessagingConnector.create,
    manifest=MessagingConnector.manifest,
    # Meta retries an unacknowledged webhook with backoff for up to 7 days.
    dedup_ttl_seconds=DEDUP_TTL_SECONDS,
)

__all__ = ["SPEC", "MessagingConnector", "MessagingSettings"]
