"""Vonage SMS (SMS API webhooks, Messages API v1): entry point ``sms.vonage``."""

from connectors.sms.vonage.connector import MANIFEST, VonageSettings, VonageSmsConnector
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="sms",
    provider="vonage",
    settings=VonageSettings,
    factory=VonageSmsConnector.create,
    manifest=MANIFEST,
    # Vonage retries an inbound SMS webhook for 24 h until it gets a 200/204;
    # remember events a little longer than that.
    dedup_ttl_seconds=26 * 3600,
)

__all__ = ["SPEC", "VonageSettings", "VonageSmsConnector"]
