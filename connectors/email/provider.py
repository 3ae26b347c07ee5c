"""What the SendGrid, Mailgun and Postmark email connectors share.

Each is a webhook connector: inbound mail arrives raw or split into fields,
delivery events as JSON. Mail goes through :class:`MailIngestor` (MIME parse
in a process pool, quarantine on a cap); delivery events are mapped by the
provider's own ``mapping`` module. Each sends through its provider's HTTP
API when an account has an API credential (:func:`sending_account` picks the
account and its client); without one, :meth:`EmailWebhookConnector.send` is a
permanent error pointing at ``email.smtp`` and the provider's SMTP relay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from connectors.email.ingest import MailIngestor
from connectors.email.settings import MimeCaps
from connectors.email.webhooks import FormPart, split_form_data
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.contract import (
    BadRequestError,
    ConnectorContext,
    Inbound,
    PermanentError,
    SendResult,
    TransientError,
    WebhookReply,
    WebhookRequest,
)

_Account = TypeVar("_Account")
_Client = TypeVar("_Client")


def sending_account(
    command: SendMessageCommand,
    accounts: Mapping[str, _Account],
    clients: Mapping[str, _Client],
    *,
    default: str | None,
    label: str,
    credential: str,
    code: str,
) -> tuple[str, _Account, _Client]:
    """The account a send goes out from and its API client.

    The command's account, else the configured default, else the first one.
    An unknown account, or one without an API credential (``credential``, the
    setting's name; ``code``, the error code), is a permanent error;
    ``label`` names an account in messages ("sendgrid account").
    """
    name = command.account or default or next(iter(accounts))
    account = accounts.get(name)
    if account is None:
        raise PermanentError(f"unknown {label} {name!r}", code="unknown_account")
    client = clients.get(name)
    if client is None:
        raise PermanentError(f"{label} {name!r} has no {credential}", code=code)
    return name, account, client


class EmailWebhookSettings(BaseModel):
    """Settings every email webhook connector has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Domain of the Message-IDs ``email.smtp`` generates (maps events back).
    message_id_domain: str = ""
    #: How old a signature timestamp may be (seconds).
    signature_max_age: float = Field(default=300.0, gt=0)
    max_message_bytes: int = Field(default=30 * 1024 * 1024, gt=0)
    mime: MimeCaps = MimeCaps()
    #: Form fields accepted in one inbound webhook (attachments included).
    max_form_fields: int = Field(default=300, gt=0)


class EmailWebhookConnector:
    """Base of the provider webhook connectors: ingest and form helpers."""

    provider = ""

    def __init__(self, context: ConnectorContext, settings: EmailWebhookSettings) -> None:
        self._ctx = context
        self._common = settings
        self._ingestor: MailIngestor | None = None

    async def start(self) -> None:
        self._ingestor = MailIngestor(
            self._ctx,
            provider=self.provider,
            caps=self._common.mime,
            max_bytes=self._common.max_message_bytes,
            message_id_domain=self._common.message_id_domain,
        )
        await self._ingestor.warm()

    async def stop(self) -> None:
        if self._ingestor is not None:
            self._ingestor.close()
            self._ingestor = None

    async def send(self, command: SendMessageCommand) -> SendResult:
        raise PermanentError(
            f"email.{self.provider} receives only: send email through email.smtp "
            f"(point its submission at the {self.provider} SMTP relay)",
            code="send_unsupported",
        )

    @property
    def ingestor(self) -> MailIngestor:
        """The running ingestor (after start)."""
        if self._ingestor is None:
            raise TransientError(f"email.{self.provider} is not started")
        return self._ingestor

    async def form_fields(self, request: WebhookRequest) -> list[FormPart]:
        """The fields of a ``multipart/form-data`` or urlencoded body (a 400 otherwise)."""
        content_type = request.headers.get("Content-Type", "")
        if content_type.lower().startswith("application/x-www-form-urlencoded"):
            return [FormPart(name=k, data=v.encode()) for k, v in request.form.items()]
        if not content_type.lower().startswith("multipart/form-data"):
            raise BadRequestError(f"unsupported content type {content_type[:80]!r}", status=415)
        try:
            return await self.ingestor.mime.run(
                split_form_data, content_type, request.body, self._common.max_form_fields
            )
        except ValueError as exc:  # FormDataError, or the stdlib parser giving up
            raise BadRequestError(f"malformed multipart/form-data: {exc}") from exc

    async def inbound_mail(
        self,
        raw: bytes,
        *,
        account: str,
        mail_from: str = "",
        rcpt_to: Sequence[str] = (),
        reply: WebhookReply | None = None,
    ) -> Inbound:
        """The events of one inbound mail, for the runtime to publish.

        A mail that breaks the MIME caps is quarantined here (confirmed) and
        answered 2xx with no events; when the quarantine is not confirmed the
        provider gets a 503 and retries.
        """
        result = await self.ingestor.normalize(
            raw, account=account, mail_from=mail_from, rcpt_to=rcpt_to
        )
        reply = reply or WebhookReply()
        if result.quarantine is not None:
            try:
                await self._ctx.quarantine(result.quarantine)
            except TransientError as exc:
                self._ctx.log.warning("quarantine not confirmed", error=str(exc))
                return Inbound(reply=WebhookReply(status=503, body=b"temporarily unavailable\n"))
            return Inbound(reply=reply)
        return Inbound(events=result.events, reply=reply)
