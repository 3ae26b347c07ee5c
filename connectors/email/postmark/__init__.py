"""Postmark inbound and delivery webhooks: entry point ``email.postmark``."""

from connectors.email.postmark.connector import (
    MANIFEST,
    PostmarkEmailConnector,
    PostmarkSettings,
)
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="email",
    provider="postmark",
    settings=PostmarkSettings,
    factory=PostmarkEmailConnector.create,
    manifest=MANIFEST,
    # Postmark retries 10 times over about 10.5 hours.
    dedup_ttl_seconds=24 * 3600,
)

__all__ = ["SPEC", "PostmarkEmailConnector", "PostmarkSettings"]
