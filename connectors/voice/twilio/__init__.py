"""Twilio Programmable Voice: entry point ``voice.twilio``."""

from connectors.voice.twilio.connector import (
    MANIFEST,
    TwilioVoiceConnector,
    TwilioVoiceSettings,
)
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="voice",
    provider="twilio",
    settings=TwilioVoiceSettings,
    factory=TwilioVoiceConnector.create,
    manifest=MANIFEST,
    # Twilio retries a webhook within seconds; an hour is ample.
    dedup_ttl_seconds=3600,
    # Twilio does not retry a 5xx, and answered calls cannot wait: spool in an outage.
    spool_on_outage=True,
)

__all__ = ["MANIFEST", "SPEC", "TwilioVoiceConnector", "TwilioVoiceSettings"]
