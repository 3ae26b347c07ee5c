"""Vonage Voice API: entry point ``voice.vonage``."""

from connectors.voice.vonage.connector import (
    MANIFEST,
    VonageVoiceConnector,
    VonageVoiceSettings,
)
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="voice",
    provider="vonage",
    settings=VonageVoiceSettings,
    factory=VonageVoiceConnector.create,
    manifest=MANIFEST,
    # Vonage retries event webhooks for a limited time; a day is ample.
    dedup_ttl_seconds=24 * 3600,
    # A live call cannot wait for a broker outage to end: spool its events.
    spool_on_outage=True,
)

__all__ = ["MANIFEST", "SPEC", "VonageVoiceConnector", "VonageVoiceSettings"]
