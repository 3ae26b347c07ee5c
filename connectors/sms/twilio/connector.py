"""Twilio Programmable Messaging connector (SMS and MMS).

Provider API: Messages REST API, version 2010-04-01.
Docs: https://www.twilio.com/docs/messaging/api/message-resource

Routes (under ``/webhooks/sms/twilio``), one set per configured account:
- ``/{account}/inbound``: incoming message webhook (form, or JSON with
  ``bodySHA256``); answered with empty TwiML once the event is confirmed.
- ``/{account}/status``: status callbacks; the gateway's message id rides in
  the ``mid`` query parameter of the StatusCallback URL it gave Twilio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from multidict import MultiDict, MultiMapping
from pydantic import BaseModel, ConfigDict, Field

from connectors.sms.addresses import sms_address
from connectors.sms.encoding import attributes as encoding_attributes
from connectors.sms.twilio import mapping, webhooks
from connectors.sms.twilio.client import DEFAULT_API_BASE, TwilioClient
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

EMPTY_TWIML = b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
MAX_MEDIA = 10


class TwilioAccount(BaseModel):
    """One Twilio account (or sub-account) and the numbers it owns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    auth_token: Secret
    #: Our numbers on this account; the first is the default sender.
    numbers: list[str] = []
    #: Send through a Messaging Service instead of a From number.
    messaging_service_sid: str | None = None


class TwilioSettings(BaseModel):
    """``connectors.sms.twilio`` config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accounts: dict[str, TwilioAccount] = Field(min_length=1)
    api_base_url: str = DEFAULT_API_BASE
    default_account: str | None = None


MANIFEST = ConnectorManifest(
    channel="sms",
    provider="twilio",
    api_version="2010-04-01",
    docs_url="https://www.twilio.com/docs/messaging/api/message-resource",
    outbound_content=["text", "media"],
    inbound_content=["text", "media"],
    # Callback states, plus the outcomes the runtime reports for our sends:
    # FAILED (send errors) and EXPIRED (a command past its expires_at).
    delivery_states=sorted(
        {
            *mapping.STATUS_MAP.values(),
            DeliveryState.DELIVERY_STATE_FAILED,
            DeliveryState.DELIVERY_STATE_EXPIRED,
        }
    ),
    event_types=["message.received", "message.status"],
    limits=ConnectorLimits(max_text_length=1600, max_attachments=MAX_MEDIA, max_recipients=1),
    idempotent_send=False,
)


class TwilioSmsConnector:
    """Twilio SMS/MMS in and out."""

    manifest = MANIFEST

    def __init__(self, context: ConnectorContext, settings: TwilioSettings) -> None:
        self._ctx = context
        self._settings = settings
        self._clients: dict[str, TwilioClient] = {}

    @classmethod
    def create(cls, context: ConnectorContext, settings: TwilioSettings) -> Self:
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
            WebhookRoute(name="status", path="/{account}/status", handler=self.on_status),
        )

    async def start(self) -> None:
        for key, account in self._settings.accounts.items():
            self._clients[key] = TwilioClient(
                self._ctx.http,
                api_base=self._settings.api_base_url,
                account_sid=account.account_sid,
                auth_token=account.auth_token.get_secret_value(),
            )

    async def stop(self) -> None:
        self._clients.clear()

    # -- inbound ---------------------------------------------------------------

    def _authenticate(self, request: WebhookRequest) -> tuple[str, MultiMapping[str], RawPayload]:
        key = request.path_params.get("account", "")
        account = self._settings.accounts.get(key)
        if account is None:
            # Same answer as a bad signature: do not reveal which keys exist.
            raise AuthError("unknown account", status=403)
        webhooks.verify(request, account.auth_token.get_secret_value())
        params, raw = _params(request)
        if params.get("AccountSid") and params["AccountSid"] != account.account_sid:
            raise AuthError("AccountSid does not match the account of this URL", status=403)
        return key, params, raw

    async def on_inbound(self, request: WebhookRequest) -> Inbound:
        key, params, raw = self._authenticate(request)
        event = mapping.inbound_message(params, account=key, raw=raw, received_at=self._ctx.now())
        return Inbound(
            events=[event], reply=WebhookReply(body=EMPTY_TWIML, content_type="text/xml")
        )

    async def on_status(self, request: WebhookRequest) -> Inbound:
        key, params, raw = self._authenticate(request)
        event = mapping.status_callback(
            params,
            account=key,
            message_id=request.query.get("mid", ""),
            raw=raw,
            received_at=self._ctx.now(),
        )
        return Inbound(events=[event], reply=WebhookReply(status=204))

    # -- outbound --------------------------------------------------------------

    def _account_for(self, command: SendMessageCommand) -> str:
        key = (
            command.account or self._settings.default_account or next(iter(self._settings.accounts))
        )
        if key not in self._settings.accounts:
            raise PermanentError(f"unknown twilio account {key!r}", code="unknown_account")
        return key

    async def send(self, command: SendMessageCommand) -> SendResult:
        key = self._account_for(command)
        account = self._settings.accounts[key]
        message = command.message
        if len(message.recipients) != 1:
            raise PermanentError("an SMS has exactly one recipient", code="invalid_recipient")
        try:
            to = sms_address(message.recipients[0].address)
        except BadRequestError as exc:
            raise PermanentError(str(exc), code="invalid_recipient") from exc
        body = message.text.body if message.HasField("text") else message.media.caption
        media = [a.url for a in message.attachments if a.url]
        if not body and not media:
            raise PermanentError("nothing to send: no text and no media", code="empty_message")
        if len(media) > MAX_MEDIA:
            raise PermanentError(
                f"twilio takes at most {MAX_MEDIA} media per message", code="too_many_media"
            )
        form: list[tuple[str, str]] = [("To", to)]
        if message.sender.address:
            form.append(("From", message.sender.address))
        elif account.messaging_service_sid:
            form.append(("MessagingServiceSid", account.messaging_service_sid))
        elif account.numbers:
            form.append(("From", account.numbers[0]))
        else:
            raise PermanentError(f"account {key!r} has no number to send from", code="no_sender")
        if body:
            form.append(("Body", body))
        form.extend(("MediaUrl", url) for url in media)
        callback = self._ctx.webhook_url("status", account=key)
        # The send span's traceparent rides the URL, so callbacks link to it.
        form.append(("StatusCallback", traced_callback_url(f"{callback}?mid={command.message_id}")))
        resource = await self._clients[key].create_message(form)
        provider_status = str(resource.get("status", "queued"))
        segments = resource.get("num_segments")
        attributes = encoding_attributes(body) if body else {}
        return SendResult(
            provider_message_id=str(resource["sid"]),
            account=key,
            state=mapping.STATUS_MAP.get(provider_status, DeliveryState.DELIVERY_STATE_QUEUED),
            provider_status=provider_status,
            segments=int(segments)
            if isinstance(segments, str | int) and str(segments).isdigit()
            else 0,
            attributes=attributes,
        )


def _params(request: WebhookRequest) -> tuple[MultiMapping[str], RawPayload]:
    content_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if content_type == "application/json":
        body = request.json()
        if not isinstance(body, dict):
            raise BadRequestError("JSON webhook body must be an object")
        params: MultiMapping[str] = MultiDict((k, str(v)) for k, v in body.items() if v is not None)
        return params, RawPayload(content_type="application/json", data=request.body)
    if request.method == "GET":
        return request.query, RawPayload(content_type="text/uri-list", data=request.url.encode())
    return request.form, RawPayload(content_type=mapping.FORM, data=request.body)
