"""Telegram Bot API: entry point ``telegram.bot``."""

from connectors.social.telegram.connector import (
    DEDUP_TTL_SECONDS,
    MANIFEST,
    TelegramConnector,
    TelegramSettings,
)
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="telegram",
    provider="bot",
    settings=TelegramSettings,
    factory=TelegramConnector.create,
    manifest=MANIFEST,
    # Telegram retries an update for up to about 24 hours.
    dedup_ttl_seconds=DEDUP_TTL_SECONDS,
)

__all__ = ["SPEC", "TelegramConnector", "TelegramSettings"]
