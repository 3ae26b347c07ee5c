"""Mailgun email connector: route forwards (inbound mail) and event webhooks.

Provider API: Mailgun v3 webhooks.
Docs: https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks

Routes (under ``/webhooks/email/mailgun``), one set per configured account:

- ``/{account}/inbound``: a route's ``forward()`` (form or multipart; the raw
  MIME in ``body-mime`` when the route URL ends in ``mime``, as
  ``/{account}/inbound/mime`` does);
- ``/{account}/events``: event webhooks (delivered, failed permanent /
  temporary, accepted, rejected; opened, clicked, unsubscribed, complained
  as interactions).

Both are signed with the webhook signing key (HMAC-SHA256 of timestamp +
token), held to a freshness window, with a token-to-body replay cache.
Outbound: the Messages API (``api_key`` + ``domain`` per account), with the
gateway's message id as the user variable ``gateway_message_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.email.mailgun import mapping, webhooks
from connectors.email.mailgun.client import DEFAULT_API_BASE, MailgunClient
from connectors.email.provider import EmailWebhookConnector, EmailWebhookSettings, sending_account
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


class MailgunAccount(BaseModel):
    """One Mailgun account (or subaccount)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The HTTP webhook signing key (Settings > Webhooks).
    webhook_signing_key: Secret
    #: Sending: a private API key and the sending domain (sends refused without).
    api_key: Secret | None = None
    domain: str = ""
    from_address: str = ""
    from_name: str = ""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.api_key is not None and (not self.domain or "@" not in self.from_address):
            raise ValueError("an account with an api_key needs domain and from_address")
        return self


class MailgunSettings(EmailWebhookSettings):
    """``connectors.email.mailgun`` config section."""

    accounts: dict[str, MailgunAccount] = Field(min_length=1)
    #: https://api.mailgun.net, or https://api.eu.mailgun.net for EU domains.
    api_base_url: str = DEFAULT_API_BASE
    default_account: str | None = None


MANIFEST = ConnectorManifest(
    channel="email",
    provider="mailgun",
    api_version="v3",
    docs_url="https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/",
    outbound_content=["email", "text"],
    inbound_content=["email"],
    delivery_states=sorted(
        {
            S.DELIVERY_STATE_QUEUED,
            S.DELIVERY_STATE_DELIVERED,
            S.DELIVERY_STATE_FAILED,
            S.DELIVERY_STATE_EXPIRED,
        }
    ),
    event_types=["message.received", "message.status", "message.interaction"],
    idempotent_send=False,
)


class MailgunEmailConnector(EmailWebhookConnector):
    """Mailgun route forwards and event webhooks."""

    manifest = MANIFEST
    provider = mapping.PROVIDER

    def __init__(self, context: ConnectorContext, settings: MailgunSettings) -> None:
        super().__init__(context, settings)
        self._settings = settings
        self._tokens = webhooks.TokenCache(ttl=settings.signature_max_age + 60)
        self._clients: dict[str, MailgunClient] = {}

    @classmethod
    def create(cls, context: ConnectorContext, settings: MailgunSettings) -> Self:
        """Factory named by the entry point's spec."""
        return cls(context, settings)

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        return (
            WebhookRoute(name="inbound", path="/{account}/inbound", handler=self.on_inbound),
            WebhookRoute(
                name="inbound_mime", path="/{account}/inbound/mime", handler=self.on_inbound
            ),
            WebhookRoute(name="events", path="/{account}/events", handler=self.on_events),
        )

    async def start(self) -> None:
        await super().start()
        for name, account in self._settings.accounts.items():
            if account.api_key is not None:
                self._clients[name] = MailgunClient(
                    self._ctx.http,
                    api_base=self._settings.api_base_url,
                    api_key=account.api_key.get_secret_value(),
                    domain=account.domain,
                )

    async def stop(self) -> None:
        self._clients.clear()
        await super().stop()

    async def send(self, command: SendMessageCommand) -> SendResult:
        """Send through the Messages API (200 = queued at Mailgun)."""
        name, account, client = sending_account(
            command,
            self._settings.accounts,
            self._clients,
            default=self._settings.default_account,
            label="mailgun account",
            credential="api_key",
            code="no_api_key",
        )
        fields, files = mapping.send_form(
            command,
            from_address=account.from_address,
            from_name=account.from_name,
            message_id_domain=self._settings.message_id_domain or account.domain,
        )
        provider_id = await client.send(fields, files)
        return SendResult(
            provider_message_id=provider_id,
            account=name,
            state=S.DELIVERY_STATE_QUEUED,
            provider_status="queued",
        )

    def _verify(self, request: WebhookRequest, timestamp: str, token: str, signature: str) -> str:
        name = request.path_params.get("account", "")
        account = self._settings.accounts.get(name)
        if account is None:
            raise AuthError("unknown account", status=403)
        webhooks.verify(
            account.webhook_signing_key.get_secret_value(),
            timestamp=timestamp,
            token=token,
            signature=signature,
            body=request.body,
            now=self._ctx.now().timestamp(),
            max_age=self._settings.signature_max_age,
            tokens=self._tokens,
        )
        return name

    async def on_inbound(self, request: WebhookRequest) -> Inbound:
        if request.path_params.get("account", "") not in self._settings.accounts:
            raise AuthError("unknown account", status=403)  # before parsing anything
        fields = await self.form_fields(request)
        account = self._verify(request, *mapping.signature_fields(fields))
        raw, mail_from, rcpt_to = mapping.inbound_mail(fields)
        return await self.inbound_mail(raw, account=account, mail_from=mail_from, rcpt_to=rcpt_to)

    async def on_events(self, request: WebhookRequest) -> Inbound:
        data, signature = mapping.event_signature(request.json())
        account = self._verify(
            request,
            signature.get("timestamp", ""),
            signature.get("token", ""),
            signature.get("signature", ""),
        )
        event = mapping.event(
            data,
            account=account,
            received_at=self._ctx.now(),
            raw=request.body,
            message_id_domain=self._settings.message_id_domain,
        )
        return Inbound(events=[event], reply=WebhookReply(status=200))
