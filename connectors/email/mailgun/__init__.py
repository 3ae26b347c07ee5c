"""Mailgun route forwards and event webhooks: entry point ``email.mailgun``."""

from connectors.email.mailgun.connector import MANIFEST, MailgunEmailConnector, MailgunSettings
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="email",
    provider="mailgun",
    settings=MailgunSettings,
    factory=MailgunEmailConnector.create,
    manifest=MANIFEST,
    # Mailgun retries for 8 hours.
    dedup_ttl_seconds=24 * 3600,
)

__all__ = ["SPEC", "MailgunEmailConnector", "MailgunSettings"]
