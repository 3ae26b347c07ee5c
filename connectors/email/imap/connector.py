"""IMAP email connector: polls existing mailboxes (aioimaplib).

Protocol: IMAP4rev1 (RFC 3501) with UIDPLUS / MOVE when offered.
Docs: https://github.com/iroco-co/aioimaplib

Every configured mailbox gets a poller task (see
:mod:`connectors.email.imap.poller`): new messages by UID, tracked with
UIDVALIDITY in a state directory so nothing is missed or duplicated across
restarts and disconnects; a backfill window on first start; \\Seen or a move
only after the publish is confirmed; reconnects with exponential backoff.
The mailbox key is the events' ``account``. Outbound email goes through
``email.smtp``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from datetime import timedelta
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.email.imap.poller import MailboxConfig, MailboxPoller
from connectors.email.imap.state import StateStore
from connectors.email.ingest import MailIngestor
from connectors.email.settings import MimeCaps
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorManifest
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.contract import (
    ConfigError,
    ConnectorContext,
    PermanentError,
    Secret,
    SendResult,
    WebhookRoute,
)

S = DeliveryState
#: How long stop waits for a poll round in flight.
STOP_GRACE_SECONDS = 3.0


class ImapMailbox(BaseModel):
    """One mailbox to poll."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    port: int = Field(default=993, gt=0, le=65535)
    security: Literal["tls", "none"] = "tls"
    username: str = Field(min_length=1)
    password: Secret
    folder: str = "INBOX"
    #: Our address at this mailbox (the recipient on its events).
    address: str = ""
    #: What to do with a message once its events are confirmed.
    after_publish: Literal["seen", "move", "none"] = "seen"
    move_to: str | None = None
    #: PEM bundle to trust instead of the system CAs.
    ca_file: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.after_publish == "move" and not self.move_to:
            raise ValueError("after_publish: move needs move_to")
        return self


class ImapSettings(BaseModel):
    """``connectors.email.imap`` config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mailboxes: dict[str, ImapMailbox] = Field(min_length=1)
    #: Directory of the per-mailbox UIDVALIDITY/UID state (must survive restarts).
    state_dir: str
    poll_interval: float = Field(default=30.0, gt=0)
    #: How far back the first poll of a mailbox reads.
    backfill_days: int = Field(default=7, ge=0)
    batch_size: int = Field(default=100, gt=0)
    timeout: float = Field(default=30.0, gt=0)
    min_backoff: float = Field(default=1.0, gt=0)
    max_backoff: float = Field(default=300.0, gt=0)
    message_id_domain: str = ""
    max_message_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    mime: MimeCaps = MimeCaps()


MANIFEST = ConnectorManifest(
    channel="email",
    provider="imap",
    api_version="IMAP4rev1",
    docs_url="https://www.rfc-editor.org/rfc/rfc3501",
    outbound_content=[],
    inbound_content=["email"],
    delivery_states=sorted(
        {S.DELIVERY_STATE_QUEUED, S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_FAILED}
    ),
    event_types=["message.received", "message.status"],
    idempotent_send=False,
)


class ImapEmailConnector:
    """Polls IMAP mailboxes."""

    manifest = MANIFEST

    def __init__(self, context: ConnectorContext, settings: ImapSettings) -> None:
        self._ctx = context
        self._settings = settings
        self._ingestor: MailIngestor | None = None
        self.pollers: list[MailboxPoller] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    @classmethod
    def create(cls, context: ConnectorContext, settings: ImapSettings) -> Self:
        """Factory named by the entry point's spec."""
        return cls(context, settings)

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        return ()

    def _config(self, key: str, mailbox: ImapMailbox) -> MailboxConfig:
        context: ssl.SSLContext | None = None
        if mailbox.security == "tls":
            try:
                context = ssl.create_default_context(cafile=mailbox.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"mailbox {key}: cannot load ca_file: {exc}") from exc
        return MailboxConfig(
            key=key,
            host=mailbox.host,
            port=mailbox.port,
            tls=mailbox.security == "tls",
            username=mailbox.username,
            password=mailbox.password.get_secret_value(),
            folder=mailbox.folder,
            address=mailbox.address.lower(),
            after_publish=mailbox.after_publish,
            move_to=mailbox.move_to,
            timeout=self._settings.timeout,
            tls_context=context,
        )

    async def start(self) -> None:
        settings = self._settings
        state = StateStore(settings.state_dir)
        self._ingestor = MailIngestor(
            self._ctx,
            provider="imap",
            caps=settings.mime,
            max_bytes=settings.max_message_bytes,
            message_id_domain=settings.message_id_domain,
        )
        await self._ingestor.warm()
        self._stop = asyncio.Event()
        for key, mailbox in settings.mailboxes.items():
            poller = MailboxPoller(
                self._config(key, mailbox),
                ingestor=self._ingestor,
                state=state,
                log=self._ctx.log,
                now=self._ctx.now,
                poll_interval=settings.poll_interval,
                backfill=timedelta(days=settings.backfill_days),
                batch_size=settings.batch_size,
                max_backoff=settings.max_backoff,
                min_backoff=settings.min_backoff,
            )
            self.pollers.append(poller)
            self._tasks.append(asyncio.create_task(poller.run(self._stop), name=f"imap:{key}"))

    async def stop(self) -> None:
        self._stop.set()
        for poller, task in zip(self.pollers, self._tasks, strict=True):
            if not poller.in_message:
                # Waiting, connecting or searching: nothing to finish.
                task.cancel()
        if self._tasks:
            # A round in flight may finish its message (publish, flag, state);
            # one stuck longer is cancelled, which is safe: its UID is not
            # saved, so the next start reads it again and dedup drops a copy.
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()
        self.pollers.clear()
        if self._ingestor is not None:
            self._ingestor.close()
            self._ingestor = None

    async def send(self, command: SendMessageCommand) -> SendResult:
        raise PermanentError(
            "email.imap receives only: send email through email.smtp", code="send_unsupported"
        )
