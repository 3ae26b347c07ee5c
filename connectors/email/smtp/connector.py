"""SMTP email connector: an inbound mail server and outbound submission.

Protocols: SMTP (RFC 5321) with ESMTP SIZE, STARTTLS (RFC 3207), SMTPUTF8;
message format RFC 5322 / MIME; DSNs per RFC 3464.
Docs: https://aiosmtpd.aio-libs.org/ and https://aiosmtplib.readthedocs.io/

Inbound: the connector opens its own SMTP listener in :meth:`start` (no
webhook routes) and publishes through the runtime's
:meth:`~gateway.contract.ConnectorContext.publish`, answering ``250`` only
after the broker confirmed (see :mod:`connectors.email.smtp.server`).

Outbound: each ``SendMessageCommand`` is composed as MIME
(:mod:`connectors.email.compose`) and submitted to the configured relay.
The provider message id is the Message-ID header, ``<message id@domain>``.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.email.compose import compose
from connectors.email.ingest import MailIngestor
from connectors.email.mapping import outbound_message_id
from connectors.email.settings import MimeCaps
from connectors.email.smtp.server import InboundHandler, RecipientPolicy, SmtpListener
from connectors.email.smtp.submission import submit
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorLimits, ConnectorManifest
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


class InboundSmtpSettings(BaseModel):
    """The SMTP listener."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    #: 25 for an MX; 0 picks a free port (tests).
    port: int = Field(default=2525, ge=0, le=65535)
    #: Name in the greeting and EHLO reply.
    hostname: str = "localhost"
    #: Recipient addresses we accept mail for, and/or whole domains.
    addresses: list[str] = []
    domains: list[str] = []
    max_message_bytes: int = Field(default=25 * 1024 * 1024, gt=0)
    #: PEM certificate chain and key: STARTTLS is offered when both are set.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    require_starttls: bool = False
    #: Idle timeout of a session (seconds).
    timeout: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.addresses and not self.domains:
            raise ValueError("inbound needs addresses or domains to accept mail for")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.require_starttls and self.tls_cert_file is None:
            raise ValueError("require_starttls needs tls_cert_file and tls_key_file")
        return self


class SubmissionSettings(BaseModel):
    """The relay outbound mail is submitted to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    port: int = Field(default=587, gt=0, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password: Secret | None = None
    #: PEM bundle to trust instead of the system CAs (a private relay).
    ca_file: str | None = None
    timeout: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self


class SmtpSettings(BaseModel):
    """``connectors.email.smtp`` config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inbound: InboundSmtpSettings | None = None
    submission: SubmissionSettings | None = None
    #: Default sender of outbound mail.
    from_address: str = ""
    from_name: str = ""
    #: Domain of the Message-IDs we generate (maps replies and bounces back).
    message_id_domain: str = Field(min_length=1)
    mime: MimeCaps = MimeCaps()

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.inbound is None and self.submission is None:
            raise ValueError("configure inbound, submission, or both")
        if self.submission is not None and "@" not in self.from_address:
            raise ValueError("submission needs from_address")
        return self


MANIFEST = ConnectorManifest(
    channel="email",
    provider="smtp",
    api_version="RFC 5321",
    docs_url="https://www.rfc-editor.org/rfc/rfc5321",
    outbound_content=["email", "text"],
    inbound_content=["email"],
    delivery_states=sorted(
        {
            S.DELIVERY_STATE_SENT,
            S.DELIVERY_STATE_QUEUED,
            S.DELIVERY_STATE_DELIVERED,
            S.DELIVERY_STATE_FAILED,
            S.DELIVERY_STATE_EXPIRED,
        }
    ),
    event_types=["message.received", "message.status"],
    limits=ConnectorLimits(max_attachments=100, max_attachment_bytes=25 * 1024 * 1024),
    idempotent_send=False,
)


class SmtpEmailConnector:
    """Inbound SMTP server and outbound SMTP submission."""

    manifest = MANIFEST

    def __init__(self, context: ConnectorContext, settings: SmtpSettings) -> None:
        self._ctx = context
        self._settings = settings
        self._ingestor: MailIngestor | None = None
        self._listener: SmtpListener | None = None
        self._tls_out: ssl.SSLContext | None = None

    @classmethod
    def create(cls, context: ConnectorContext, settings: SmtpSettings) -> Self:
        """Factory named by the entry point's spec."""
        return cls(context, settings)

    @property
    def port(self) -> int | None:
        """The bound SMTP port (after start)."""
        return self._listener.port if self._listener is not None else None

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        return ()

    async def start(self) -> None:
        submission = self._settings.submission
        if submission is not None and submission.ca_file:
            self._tls_out = ssl.create_default_context(cafile=submission.ca_file)
        inbound = self._settings.inbound
        if inbound is None:
            return
        tls: ssl.SSLContext | None = None
        if inbound.tls_cert_file and inbound.tls_key_file:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                tls.load_cert_chain(inbound.tls_cert_file, inbound.tls_key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load the SMTP TLS certificate: {exc}") from exc
        self._ingestor = MailIngestor(
            self._ctx,
            provider="smtp",
            caps=self._settings.mime,
            max_bytes=inbound.max_message_bytes,
            message_id_domain=self._settings.message_id_domain,
        )
        await self._ingestor.warm()
        handler = InboundHandler(
            self._ingestor,
            RecipientPolicy(addresses=inbound.addresses, domains=inbound.domains),
            self._ctx.log,
        )
        self._listener = SmtpListener(
            handler,
            host=inbound.host,
            port=inbound.port,
            hostname=inbound.hostname,
            max_message_bytes=inbound.max_message_bytes,
            tls_context=tls,
            require_starttls=inbound.require_starttls,
            timeout=inbound.timeout,
        )
        try:
            await self._listener.start()
        except OSError as exc:
            self._ingestor.close()
            raise ConfigError(f"cannot listen on {inbound.host}:{inbound.port}: {exc}") from exc
        self._ctx.log.info("smtp listening", host=inbound.host, port=self._listener.port)

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._ingestor is not None:
            self._ingestor.close()
            self._ingestor = None

    async def send(self, command: SendMessageCommand) -> SendResult:
        submission = self._settings.submission
        if submission is None:
            raise PermanentError(
                "email.smtp has no submission relay configured", code="no_submission"
            )
        message = compose(
            command,
            from_address=self._settings.from_address,
            from_name=self._settings.from_name,
            message_id_domain=self._settings.message_id_domain,
            now=self._ctx.now(),
        )
        result = await submit(
            message,
            host=submission.host,
            port=submission.port,
            security=submission.security,
            username=submission.username,
            password=submission.password.get_secret_value() if submission.password else None,
            timeout=submission.timeout,
            tls_context=self._tls_out,
        )
        attributes = {"email.smtp_response": result.response[:200]}
        if result.refused:
            attributes["email.refused"] = ",".join(sorted(result.refused))
        return SendResult(
            provider_message_id=outbound_message_id(
                command.message_id, self._settings.message_id_domain
            ),
            account=command.account or self._settings.from_address,
            state=S.DELIVERY_STATE_SENT,
            provider_status="250",
            attributes=attributes,
        )
