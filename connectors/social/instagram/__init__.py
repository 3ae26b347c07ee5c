"""Instagram messaging (Meta Messenger Platform): entry point ``instagram.meta``.

Shares the Messenger connector (``connectors.social.messenger``); Instagram
reports read receipts but no delivery receipts, as its manifest says.
"""

from connectors.social.messenger.connector import (
    DEDUP_TTL_SECONDS,
    InstagramConnector,
    MessagingSettings,
)
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="instagram",
    provider="meta",
    settings=MessagingSettings,
    factory=InstagramConnector.create,
    manifest=InstagramConnector.manifest,
    dedup_ttl_seconds=DEDUP_TTL_SECONDS,
)

__all__ = ["SPEC", "InstagramConnector"]
