"""SendGrid Inbound Parse and Event Webhook: entry point ``email.sendgrid``."""

from connectors.email.sendgrid.connector import (
    MANIFEST,
    SendGridEmailConnector,
    SendGridSettings,
)
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="email",
    provider="sendgrid",
    settings=SendGridSettings,
    factory=SendGridEmailConnector.create,
    manifest=MANIFEST,
    # SendGrid retries non-2xx for about 24 h (Inbound Parse: up to 3 days).
    dedup_ttl_seconds=3 * 24 * 3600,
)

__all__ = ["SPEC", "SendGridEmailConnector", "SendGridSettings"]
