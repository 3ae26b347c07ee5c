"""IMAP mailbox polling: entry point ``email.imap``."""

from connectors.email.imap.connector import MANIFEST, ImapEmailConnector, ImapSettings
from gateway.contract import ConnectorSpec

SPEC = ConnectorSpec(
    channel="email",
    provider="imap",
    settings=ImapSettings,
    factory=ImapEmailConnector.create,
    manifest=MANIFEST,
    # A message is re-read after a crash or a UIDVALIDITY change within the
    # backfill window: remember event ids for longer than that.
    dedup_ttl_seconds=30 * 24 * 3600,
)

__all__ = ["SPEC", "ImapEmailConnector", "ImapSettings"]
