"""SMTP email (inbound server and outbound submission): entry point ``email.smtp``."""

from connectors.email.smtp.connector import MANIFEST, SmtpEmailConnector, SmtpSettings
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="email",
    provider="smtp",
    settings=SmtpSettings,
    factory=SmtpEmailConnector.create,
    manifest=MANIFEST,
    # Sending MTAs retry a 4xx for days (RFC 5321 suggests 4-5 days).
    dedup_ttl_seconds=5 * 24 * 3600,
)

__all__ = ["SPEC", "SmtpEmailConnector", "SmtpSettings"]
