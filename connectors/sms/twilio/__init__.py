"""Twilio Programmable Messaging (SMS/MMS): entry point ``sms.twilio``."""

from connectors.sms.twilio.connector import MANIFEST, TwilioSettings, TwilioSmsConnector
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="sms",
    provider="twilio",
    settings=TwilioSettings,
    factory=TwilioSmsConnector.create,
    manifest=MANIFEST,
    # Twilio retries a webhook once, within 15 s; an hour is ample.
    dedup_ttl_seconds=3600,
    # Twilio does not retry a 5xx: spool events in a broker outage instead of a 503.
    spool_on_outage=True,
)

__all__ = ["SPEC", "TwilioSettings", "TwilioSmsConnector"]
