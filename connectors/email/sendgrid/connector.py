"""SendGrid email connector: Inbound Parse and the Event Webhook.

Provider API: v3 (Mail Send, Event Webhook, Inbound Parse Webhook).
Docs: https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event and
https://www.twilio.com/docs/sendgrid/for-developers/parsing-email/setting-up-the-inbound-parse-webhook

Routes (under ``/webhooks/email/sendgrid``), one set per configured account:

- ``/{account}/inbound``: Inbound Parse (multipart/form-data), authenticated by
  the parse security policy's ECDSA signature (``parse_verification_key``) or,
  for parse hosts without a policy, by HTTP basic credentials in the URL;
- ``/{account}/events``: Event Webhook (JSON array, ECDSA-signed with
  ``event_verification_key``); every item becomes one event (statuses for
  processed / deferred / delivered / bounce / dropped, interactions for
  opens, clicks, spam reports and unsubscribes).

A route whose account has no credential for it refuses every request (403):
authentication fails closed.

Outbound: the v3 Mail Send API (``api_key`` per account), with the gateway's
message id as the custom arg ``gateway_message_id`` so Event Webhook items map
back to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.email.provider import EmailWebhookConnector, EmailWebhookSettings, sending_account
from connectors.email.sendgrid import mapping, webhooks
from connectors.email.sendgrid.client import DEFAULT_API_BASE, SendGridClient
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


class BasicCredentials(BaseModel):
    """HTTP basic credentials put in a webhook URL."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str = Field(min_length=1)
    password: Secret


class SendGridAccount(BaseModel):
    """One SendGrid account (or subuser)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Event Webhook verification key (base64 SPKI of the ECDSA P-256 public key).
    event_verification_key: str | None = None
    #: Public key of the Inbound Parse security policy.
    parse_verification_key: str | None = None
    #: Basic credentials of the Inbound Parse URL (without a signing policy).
    parse_basic_auth: BasicCredentials | None = None
    #: Mail Send API key (sends are refused for an account without one).
    api_key: Secret | None = None
    from_address: str = ""
    from_name: str = ""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not (
            self.event_verification_key
            or self.parse_verification_key
            or self.parse_basic_auth
            or self.api_key
        ):
            raise ValueError("configure a verification key, basic credentials or an api_key")
        if self.api_key is not None and "@" not in self.from_address:
            raise ValueError("an account with an api_key needs from_address")
        for key in (self.event_verification_key, self.parse_verification_key):
            if key:
                webhooks.load_verification_key(key)  # refuse to start on a bad key
        return self


class SendGridSettings(EmailWebhookSettings):
    """``connectors.email.sendgrid`` config section."""

    accounts: dict[str, SendGridAccount] = Field(min_length=1)
    api_base_url: str = DEFAULT_API_BASE
    default_account: str | None = None

    @model_validator(mode="after")
    def _default_known(self) -> Self:
        if self.default_account is not None and self.default_account not in self.accounts:
            raise ValueError(f"default_account {self.default_account!r} is not in accounts")
        return self


MANIFEST = ConnectorManifest(
    channel="email",
    provider="sendgrid",
    api_version="v3",
    docs_url="https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event",
    outbound_content=["email", "text"],
    inbound_content=["email"],
    # Webhook states, plus what the runtime reports for our sends (FAILED, EXPIRED).
    delivery_states=sorted(
        {
            *(state for state, _ in mapping.STATUS_MAP.values()),
            S.DELIVERY_STATE_FAILED,
            S.DELIVERY_STATE_EXPIRED,
        }
    ),
    event_types=["message.received", "message.status", "message.interaction"],
    idempotent_send=False,
)


class SendGridEmailConnector(EmailWebhookConnector):
    """SendGrid Inbound Parse and Event Webhook."""

    manifest = MANIFEST
    provider = mapping.PROVIDER

    def __init__(self, context: ConnectorContext, settings: SendGridSettings) -> None:
        super().__init__(context, settings)
        self._settings = settings
        self._clients: dict[str, SendGridClient] = {}
        self._keys: dict[tuple[str, str], ec.EllipticCurvePublicKey] = {}
        for name, account in settings.accounts.items():
            if account.event_verification_key:
                self._keys[(name, "events")] = webhooks.load_verification_key(
                    account.event_verification_key
                )
            if account.parse_verification_key:
                self._keys[(name, "inbound")] = webhooks.load_verification_key(
                    account.parse_verification_key
                )

    @classmethod
    def create(cls, context: ConnectorContext, settings: SendGridSettings) -> Self:
        """Factory named by the entry point's spec."""
        return cls(context, settings)

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        return (
            WebhookRoute(name="inbound", path="/{account}/inbound", handler=self.on_inbound),
            WebhookRoute(name="events", path="/{account}/events", handler=self.on_events),
        )

    def _authenticate(self, request: WebhookRequest, route: str) -> str:
        name = request.path_params.get("account", "")
        account = self._settings.accounts.get(name)
        if account is None:
            raise AuthError("unknown account", status=403)
        key = self._keys.get((name, route))
        if key is not None:
            webhooks.verify(
                request,
                key,
                now=self._ctx.now().timestamp(),
                max_age=self._settings.signature_max_age,
            )
        elif route == "inbound" and account.parse_basic_auth is not None:
            credentials = account.parse_basic_auth
            verify_basic_auth(
                request, credentials.username, credentials.password.get_secret_value()
            )
        else:
            raise AuthError(f"no credential configured for the {route} route", status=403)
        return name

    async def start(self) -> None:
        await super().start()
        for name, account in self._settings.accounts.items():
            if account.api_key is not None:
                self._clients[name] = SendGridClient(
                    self._ctx.http,
                    api_base=self._settings.api_base_url,
                    api_key=account.api_key.get_secret_value(),
                )

    async def stop(self) -> None:
        self._clients.clear()
        await super().stop()

    async def send(self, command: SendMessageCommand) -> SendResult:
        """Send through the v3 Mail Send API (202 = queued at SendGrid)."""
        name, account, client = sending_account(
            command,
            self._settings.accounts,
            self._clients,
            default=self._settings.default_account,
            label="sendgrid account",
            credential="api_key",
            code="no_api_key",
        )
        payload = mapping.mail_send_payload(
            command,
            from_address=account.from_address,
            from_name=account.from_name,
            message_id_domain=self._settings.message_id_domain or "sendgrid.invalid",
        )
        provider_id = await client.send(payload)
        return SendResult(
            provider_message_id=provider_id,
            account=name,
            state=S.DELIVERY_STATE_QUEUED,
            provider_status="202",
        )

    async def on_inbound(self, request: WebhookRequest) -> Inbound:
        account = self._authenticate(request, "inbound")
        fields = await self.form_fields(request)
        raw, mail_from, rcpt_to = mapping.inbound_mail(fields)
        return await self.inbound_mail(raw, account=account, mail_from=mail_from, rcpt_to=rcpt_to)

    async def on_events(self, request: WebhookRequest) -> Inbound:
        account = self._authenticate(request, "events")
        events = mapping.events_from_webhook(
            request.json(),
            account=account,
            received_at=self._ctx.now(),
            raw=request.body,
            message_id_domain=self._settings.message_id_domain,
        )
        return Inbound(events=events, reply=WebhookReply(status=200))
