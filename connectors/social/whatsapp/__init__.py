"""WhatsApp Cloud API (Meta Graph API): entry point ``whatsapp.meta``."""

from connectors.social.whatsapp.connector import (
    DEDUP_TTL_SECONDS,
    MANIFEST,
    WhatsAppConnector,
    WhatsAppSettings,
)
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="whatsapp",
    provider="meta",
    settings=WhatsAppSettings,
    factory=WhatsAppConnector.create,
    manifest=MANIFEST,
    # Meta retries an unacknowledged webhook with backoff for up to 7 days.
    dedup_ttl_seconds=DEDUP_TTL_SECONDS,
)

__all__ = ["SPEC", "WhatsAppConnector", "WhatsAppSettings"]
