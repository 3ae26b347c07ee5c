"""Postmark email connector: inbound webhook and delivery / bounce webhooks.

Provider API: Postmark webhooks (inbound, Delivery, Bounce, Open, Click,
SpamComplaint). Docs: https://postmarkapp.com/developer/webhooks/webhooks-overview

Routes (under ``/webhooks/email/postmark``), one set per configured account:

- ``/{account}/inbound``: inbound mail (JSON; ``RawEmail`` used when the
  server includes it, otherwise the mail is rebuilt from the fields);
- ``/{account}/events``: delivery, bounce and engagement webhooks.

Postmark authenticates webhooks only with HTTP basic credentials in the
webhook URL; they are compared in constant time, and a failure is a 403
(which also stops Postmark's retries of a misconfigured hook).
Outbound: ``POST /email`` with the server token, the gateway's message id in
``Metadata`` so delivery and bounce webhooks map back to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.email.postmark import mapping
from connectors.email.postmark.client import DEFAULT_API_BASE, PostmarkClient
from connectors.email.provider import EmailWebhookConnector, EmailWebhookSettings, sending_account
from connectors.email.webhooks import verify_basic_auth
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorManifest
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.contract import (
    AuthError,
    ConnectorContext,
    Inbound,
    Secret,
    SendResult,
    WebhookReply,
    WebhookRequest,
    WebhookRoute,
)

S = DeliveryState


class PostmarkAccount(BaseModel):
    """One Postmark server's webhook credentials."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str = Field(min_length=1)
    password: Secret
    #: Server API token for sends (sends are refused for a server without one).
    server_token: Secret | None = None
    from_address: str = ""
    from_name: str = ""
    message_stream: str = "outbound"

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.server_token is not None and "@" not in self.from_address:
            raise ValueError("a server with a server_token needs from_address")
        return self


class PostmarkSettings(EmailWebhookSettings):
    """``connectors.email.postmark`` config section."""

    accounts: dict[str, PostmarkAccount] = Field(min_length=1)
    api_base_url: str = DEFAULT_API_BASE
    default_account: str | None = None


MANIFEST = ConnectorManifest(
    channel="email",
    provider="postmark",
    api_version="2024",
    docs_url="https://postmarkapp.com/developer/webhooks/webhooks-overview",
    outbound_content=["email", "text"],
    inbound_content=["email"],
    delivery_states=sorted(
        {
            S.DELIVERY_STATE_QUEUED,
            S.DELIVERY_STATE_SENT,
            S.DELIVERY_STATE_DELIVERED,
            S.DELIVERY_STATE_FAILED,
            S.DELIVERY_STATE_EXPIRED,
        }
    ),
    event_types=["message.received", "message.status", "message.interaction"],
    idempotent_send=False,
)


class PostmarkEmailConnector(EmailWebhookConnector):
    """Postmark inbound and event webhooks."""

    manifest = MANIFEST
    provider = mapping.PROVIDER

    def __init__(self, context: ConnectorContext, settings: PostmarkSettings) -> None:
        super().__init__(context, settings)
        self._settings = settings
        self._clients: dict[str, PostmarkClient] = {}

    @classmethod
    def create(cls, context: ConnectorContext, settings: PostmarkSettings) -> Self:
        """Factory named by the entry point's spec."""
        return cls(context, settings)

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        return (
            WebhookRoute(name="inbound", path="/{account}/inbound", handler=self.on_inbound),
            WebhookRoute(name="events", path="/{account}/events", handler=self.on_events),
        )

    async def start(self) -> None:
        await super().start()
        for name, account in self._settings.accounts.items():
            if account.server_token is not None:
                self._clients[name] = PostmarkClient(
                    self._ctx.http,
                    api_base=self._settings.api_base_url,
                    token=account.server_token.get_secret_value(),
                )

    async def stop(self) -> None:
        self._clients.clear()
        await super().stop()

    async def send(self, command: SendMessageCommand) -> SendResult:
        """Send through ``POST /email`` (200 = Postmark accepted and is sending)."""
        name, account, client = sending_account(
            command,
            self._settings.accounts,
            self._clients,
            default=self._settings.default_account,
            label="postmark server",
            credential="server_token",
            code="no_token",
        )
        payload = mapping.email_payload(
            command,
            from_address=account.from_address,
            from_name=account.from_name,
            message_stream=account.message_stream,
            message_id_domain=self._settings.message_id_domain or "postmark.invalid",
        )
        provider_id = await client.send(payload)
        return SendResult(
            provider_message_id=provider_id,
            account=name,
            state=S.DELIVERY_STATE_SENT,
            provider_status="OK",
        )

    def _authenticate(self, request: WebhookRequest) -> str:
        name = request.path_params.get("account", "")
        account = self._settings.accounts.get(name)
        if account is None:
            raise AuthError("unknown account", status=403)
        verify_basic_auth(request, account.username, account.password.get_secret_value())
        return name

    async def on_inbound(self, request: WebhookRequest) -> Inbound:
        account = self._authenticate(request)
        raw, mail_from, rcpt_to = mapping.inbound_mail(request.json())
        return await self.inbound_mail(raw, account=account, mail_from=mail_from, rcpt_to=rcpt_to)

    async def on_events(self, request: WebhookRequest) -> Inbound:
        account = self._authenticate(request)
        event = mapping.event(
            request.json(),
            account=account,
            received_at=self._ctx.now(),
            raw=request.body,
            message_id_domain=self._settings.message_id_domain,
        )
        return Inbound(events=[event], reply=WebhookReply(status=200))
