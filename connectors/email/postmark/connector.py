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
Outbound email goes through ``email.smtp`` (Postmark's SMTP service).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from pydantic import BaseModel, ConfigDict, Field

from connectors.email.postmark import mapping
from connectors.email.provider import EmailWebhookConnector, EmailWebhookSettings
from connectors.email.webhooks import verify_basic_auth
from gateway.api.v1.connector_pb2 import ConnectorManifest
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.contract import (
    AuthError,
    ConnectorContext,
    Inbound,
    Secret,
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


class PostmarkSettings(EmailWebhookSettings):
    """``connectors.email.postmark`` config section."""

    accounts: dict[str, PostmarkAccount] = Field(min_length=1)


MANIFEST = ConnectorManifest(
    channel="email",
    provider="postmark",
    api_version="2024",
    docs_url="https://postmarkapp.com/developer/webhooks/webhooks-overview",
    outbound_content=[],
    inbound_content=["email"],
    delivery_states=sorted(
        {S.DELIVERY_STATE_QUEUED, S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_FAILED}
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

    @classmethod
    def create(cls, context: ConnectorContext, settings: PostmarkSettings) -> Self:
        """Factory named by the entry point's spec."""
        return cls(context, settings)

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        return (
            WebhookRoute(name="inbound", path="/{account}/inbound", handler=self.on_inbound),
            WebhookRoute(name="events", path="/{account}/events", handler=self.on_events),
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
