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
)

__all__ = ["SPEC", "TwilioSettings", "TwilioSmsConnector"]
