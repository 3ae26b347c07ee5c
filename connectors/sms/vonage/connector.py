"""Vonage SMS connector: SMS API webhooks in, Messages API (v1) out.

Provider APIs: Messages API v1 (send, inbound and status webhooks) and the SMS
API's inbound-SMS and delivery-receipt webhooks (accounts that still route
SMS webhooks to the SMS API).
Docs: https://developer.vonage.com/en/api/messages and
https://developer.vonage.com/en/messaging/sms/guides/inbound-sms

Routes (under ``/webhooks/sms/vonage``), one set per configured account:

- ``/{account}/inbound`` (GET or POST): SMS API inbound SMS, signed with
  ``sig`` (md5hash, or HMAC md5/sha1/sha256/sha512, as set in the dashboard)
  and held to a ``timestamp`` window.
- ``/{account}/dlr`` (GET or POST): SMS API delivery receipts, signed the same way.
- ``/{account}/messages/inbound`` and ``/{account}/messages/status`` (POST):
  Messages API webhooks with a Bearer JWT (HS256, the signature secret) whose
  ``payload_hash`` must be the SHA-256 of the body.

A concatenated inbound SMS reaches the SMS API webhook as one request per
part. Each part is published as its own ``message.received`` event carrying
``sms.concat_ref`` / ``sms.concat_part`` / ``sms.concat_total`` and
``sequence`` = part number: parts may arrive hours apart or on different
replicas, and holding the first ones back until the last arrives would need
shared state and delay a 2xx that Vonage retries for 24 h. Consumers that want
the whole text group on ``concat_ref``. (The Messages API reassembles parts
itself and sends one webhook.)

Outbound goes through the Messages API with ``client_ref`` = the gateway's
message id and a per-message ``webhook_url`` pointing at this account's
status route, so statuses come back here whatever the dashboard says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from connectors.sms.addresses import sms_address
from connectors.sms.encoding import analyze
from connectors.sms.encoding import attributes as encoding_attributes
from connectors.sms.vonage import mapping, webhooks
from connectors.sms.vonage.client import DEFAULT_API_BASE, ApplicationJwt, VonageClient
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorLimits, ConnectorManifest
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import RawPayload
from gateway.contract import (
    AuthError,
    BadRequestError,
    ConnectorContext,
    Inbound,
    PermanentError,
    Secret,
    SendResult,
    WebhookReply,
    WebhookRequest,
    WebhookRoute,
)
from gateway.contract.callbacks import traced_callback_url

#: The Messages API's limit for SMS text.
MAX_TEXT_LENGTH = 1000
#: Vonage's limit for ``client_ref`` (v1).
MAX_CLIENT_REF = 100


class VonageAccount(BaseModel):
    """One Vonage account: its API credentials, webhook secret and numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key: str = Field(pattern=r"^[0-9A-Za-z]{4,64}$")
    #: Basic auth for sends (needed unless an application JWT is configured).
    api_secret: Secret | None = None
    #: Application JWT auth for sends (RS256 with the application's private key).
    application_id: str | None = None
    private_key: Secret | None = None
    #: Signs SMS API webhooks (``sig``) and Messages API webhook JWTs.
    signature_secret: Secret
    #: The dashboard's signature method for SMS API webhooks. ``none`` accepts
    #: unsigned SMS API webhooks (anyone who knows the URL can inject messages);
    #: it must be chosen explicitly and is logged as a warning at start.
    signature_method: Literal["md5hash", "md5", "sha1", "sha256", "sha512", "none"] = "md5hash"
    #: Our numbers (E.164) or sender ids on this account; the first is the default sender.
    numbers: list[str] = []

    @field_validator("numbers")
    @classmethod
    def _valid_numbers(cls, numbers: list[str]) -> list[str]:
        try:
            return [sms_address(n) for n in numbers]
        except BadRequestError as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _send_credentials(self) -> Self:
        if (self.application_id is None) != (self.private_key is None):
            raise ValueError("application_id and private_key go together")
        if self.api_secret is None and self.application_id is None:
            raise ValueError("set api_secret, or application_id and private_key, to send")
        return self


class VonageSettings(BaseModel):
    """``connectors.sms.vonage`` config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accounts: dict[str, VonageAccount] = Field(min_length=1)
    api_base_url: str = DEFAULT_API_BASE
    default_account: str | None = None
    #: How old a webhook's signature timestamp (``timestamp`` / JWT ``iat``) may be.
    signature_max_age: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _default_known(self) -> Self:
        if self.default_account is not None and self.default_account not in self.accounts:
            raise ValueError(f"default_account {self.default_account!r} is not in accounts")
        return self


MANIFEST = ConnectorManifest(
    channel="sms",
    provider="vonage",
    api_version="v1",
    docs_url="https://developer.vonage.com/en/api/messages",
    outbound_content=["text"],
    inbound_content=["text"],
    delivery_states=sorted(
        {
            DeliveryState.DELIVERY_STATE_ACCEPTED,
            DeliveryState.DELIVERY_STATE_EXPIRED,
            *mapping.DLR_STATUS_MAP.values(),
            *mapping.MESSAGES_STATUS_MAP.values(),
        }
    ),
    event_types=["message.received", "message.status"],
    limits=ConnectorLimits(max_text_length=MAX_TEXT_LENGTH, max_attachments=0, max_recipients=1),
    idempotent_send=False,
)


def _digits(address: str) -> str:
    # Vonage wants international numbers without the leading "+".
    return address.removeprefix("+")


class VonageSmsConnector:
    """Vonage SMS in (SMS API and Messages API webhooks) and out (Messages API)."""

    manifest = MANIFEST

    def __init__(self, context: ConnectorContext, settings: VonageSettings) -> None:
        self._ctx = context
        self._settings = settings
        self._clients: dict[str, VonageClient] = {}

    @classmethod
    def create(cls, context: ConnectorContext, settings: VonageSettings) -> Self:
        """Factory named by the entry point's spec."""
        return cls(context, settings)

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        return (
            WebhookRoute(
                name="inbound",
                path="/{account}/inbound",
                handler=self.on_inbound,
                methods=("POST", "GET"),
            ),
            WebhookRoute(
                name="dlr", path="/{account}/dlr", handler=self.on_dlr, methods=("POST", "GET")
            ),
            WebhookRoute(
                name="messages_inbound",
                path="/{account}/messages/inbound",
                handler=self.on_messages_inbound,
            ),
            WebhookRoute(
                name="messages_status",
                path="/{account}/messages/status",
                handler=self.on_messages_status,
            ),
        )

    async def start(self) -> None:
        for key, account in self._settings.accounts.items():
            application_jwt = None
            if account.application_id is not None and account.private_key is not None:
                application_jwt = ApplicationJwt(
                    account.application_id, account.private_key.get_secret_value()
                )
                application_jwt.token()  # a bad key stops start-up, not the first send
            self._clients[key] = VonageClient(
                self._ctx.http,
                api_base=self._settings.api_base_url,
                api_key=account.api_key,
                api_secret=account.api_secret.get_secret_value() if account.api_secret else None,
                application_jwt=application_jwt,
            )
            if account.signature_method == "none":
                self._ctx.log.warning(
                    "vonage SMS API webhooks of this account are NOT authenticated "
                    "(signature_method: none)",
                    account=key,
                )

    async def stop(self) -> None:
        self._clients.clear()

    # -- inbound ---------------------------------------------------------------

    def _account(self, request: WebhookRequest) -> tuple[str, VonageAccount]:
        key = request.path_params.get("account", "")
        account = self._settings.accounts.get(key)
        if account is None:
            # Same answer as a bad signature: do not reveal which keys exist.
            raise AuthError("unknown account", status=403)
        return key, account

    def _legacy(self, request: WebhookRequest) -> tuple[str, dict[str, str], RawPayload]:
        key, account = self._account(request)
        params, raw = webhooks.legacy_params(request)
        if account.signature_method != "none":
            webhooks.verify_signature(
                params,
                account.signature_secret.get_secret_value(),
                account.signature_method,
                now=self._ctx.now().timestamp(),
                max_age=self._settings.signature_max_age,
            )
        if params.get("api-key") and params["api-key"] != account.api_key:
            raise AuthError("api-key does not match the account of this URL", status=403)
        return key, params, raw

    def _messages(self, request: WebhookRequest) -> tuple[str, dict[str, Any], RawPayload]:
        key, account = self._account(request)
        claims = webhooks.verify_jwt(
            request,
            account.signature_secret.get_secret_value(),
            now=self._ctx.now().timestamp(),
            max_age=self._settings.signature_max_age,
        )
        # The token is signed with this account's secret; its claims must not
        # name another account or application either.
        if claims.get("api_key") not in (None, account.api_key):
            raise AuthError("JWT api_key does not match the account of this URL", status=403)
        if account.application_id and claims.get("application_id") not in (
            None,
            account.application_id,
        ):
            raise AuthError("JWT application_id does not match this account", status=403)
        return key, webhooks.json_object(request), webhooks.raw_json(request)

    async def on_inbound(self, request: WebhookRequest) -> Inbound:
        key, params, raw = self._legacy(request)
        event = mapping.inbound_sms(params, account=key, raw=raw, received_at=self._ctx.now())
        return Inbound(events=[event], reply=WebhookReply(status=204))

    async def on_dlr(self, request: WebhookRequest) -> Inbound:
        key, params, raw = self._legacy(request)
        event = mapping.delivery_receipt(params, account=key, raw=raw, received_at=self._ctx.now())
        return Inbound(events=[event], reply=WebhookReply(status=204))

    async def on_messages_inbound(self, request: WebhookRequest) -> Inbound:
        key, body, raw = self._messages(request)
        event = mapping.messages_inbound(body, account=key, raw=raw, received_at=self._ctx.now())
        return Inbound(events=[event], reply=WebhookReply(status=200))

    async def on_messages_status(self, request: WebhookRequest) -> Inbound:
        key, body, raw = self._messages(request)
        event = mapping.messages_status(body, account=key, raw=raw, received_at=self._ctx.now())
        return Inbound(events=[event], reply=WebhookReply(status=200))

    # -- outbound --------------------------------------------------------------

    def _account_for(self, command: SendMessageCommand) -> str:
        key = (
            command.account or self._settings.default_account or next(iter(self._settings.accounts))
        )
        if key not in self._settings.accounts:
            raise PermanentError(f"unknown vonage account {key!r}", code="unknown_account")
        return key

    async def send(self, command: SendMessageCommand) -> SendResult:
        key = self._account_for(command)
        account = self._settings.accounts[key]
        message = command.message
        if len(message.recipients) != 1:
            raise PermanentError("an SMS has exactly one recipient", code="invalid_recipient")
        try:
            to = sms_address(message.recipients[0].address)
            sender = sms_address(message.sender.address) if message.sender.address else ""
        except BadRequestError as exc:
            raise PermanentError(str(exc), code="invalid_address") from exc
        if not sender:
            if not account.numbers:
                raise PermanentError(
                    f"account {key!r} has no number to send from", code="no_sender"
                )
            sender = account.numbers[0]
        if message.attachments or message.HasField("media"):
            raise PermanentError("vonage SMS carries text only", code="unsupported_content")
        body = message.text.body if message.HasField("text") else ""
        if not body:
            raise PermanentError("nothing to send: no text", code="empty_message")
        if len(body) > MAX_TEXT_LENGTH:
            raise PermanentError(
                f"vonage takes at most {MAX_TEXT_LENGTH} characters per SMS", code="text_too_long"
            )
        info = analyze(body)
        payload: dict[str, object] = {
            "message_type": "text",
            "channel": "sms",
            "to": _digits(to),
            "from": _digits(sender),
            "text": body,
            # Say which encoding we counted segments for, rather than let Vonage guess.
            "sms": {"encoding_type": "unicode" if info.encoding == "UCS-2" else "text"},
            # The send span's traceparent rides the URL, so status webhooks link to it.
            "webhook_url": traced_callback_url(
                self._ctx.webhook_url("messages_status", account=key)
            ),
            "webhook_version": "v1",
        }
        if 0 < len(command.message_id) <= MAX_CLIENT_REF:
            payload["client_ref"] = command.message_id
        message_uuid = await self._clients[key].send_message(payload)
        return SendResult(
            provider_message_id=message_uuid,
            account=key,
            state=DeliveryState.DELIVERY_STATE_ACCEPTED,
            provider_status="accepted",
            segments=info.segments,
            attributes=encoding_attributes(body),
        )
