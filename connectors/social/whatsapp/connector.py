"""WhatsApp Cloud API connector (Meta Graph API v21.0).

Docs: https://developers.facebook.com/docs/whatsapp/cloud-api

Route (under ``/webhooks/whatsapp/meta``): one callback URL for the app,
GET for Meta's subscription handshake and POST for notifications, signed with
``X-Hub-Signature-256`` (app secret). A notification batches ``entry[] x
changes[] x messages[]/statuses[]``; every item is one event, and the answer
is 2xx only once all are confirmed (a retry re-emits only what is missing).
Events name our account by its configured key (found by ``phone_number_id``).
Edits (``message.edited``) and revokes (``message.deleted``) arrive only for
WhatsApp Business app numbers onboarded to the Cloud API ("Coexistence"), as
Meta documents them; see :mod:`connectors.social.whatsapp.mapping`.

Outbound: ``POST /<phone-number-id>/messages`` with the account's access
token; ``biz_opaque_callback_data`` = the gateway message id, which Meta
echoes on every status.

The 24-hour customer-service window: outside it WhatsApp only delivers
template messages. The connector remembers, IN MEMORY, when each customer
last wrote to each account (from inbound webhooks this process handled) and
refuses a non-template send outside the window up front with
``PermanentError(code="outside_service_window")``. A restart, or a webhook
handled by another replica, forgets: the check then fails closed (only
templates go out until the customer writes again).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.social.media import FetchedMedia, SafeFetcher
from connectors.social.meta import signature
from connectors.social.meta.envelope import envelope
from connectors.social.meta.graph import GraphClient
from connectors.social.meta.settings import MetaAppSettings
from connectors.social.whatsapp import mapping, outbound
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorLimits, ConnectorManifest
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.contract import (
    AmbiguousSendError,
    ConnectorContext,
    Inbound,
    PermanentError,
    Secret,
    SendResult,
    WebhookReply,
    WebhookRequest,
    WebhookRoute,
)

S = DeliveryState

#: Meta keeps retrying an unacknowledged webhook for up to 7 days.
DEDUP_TTL_SECONDS = 8 * 24 * 3600
SERVICE_WINDOW = timedelta(hours=24)
#: Bound on remembered (account, customer) pairs; the oldest are dropped first.
MAX_TRACKED_CUSTOMERS = 200_000


class WhatsAppAccount(BaseModel):
    """One WhatsApp business phone number."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    phone_number_id: str = Field(pattern=r"^[0-9]{5,32}$")
    access_token: Secret
    #: The WhatsApp Business Account id (informational).
    waba_id: str | None = None


class MediaFetchSettings(BaseModel):
    """Caps and exemptions of inbound media downloads (see ``connectors.social.media``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    timeout: float = Field(default=30.0, gt=0)
    #: Allow plain-http media URLs (Meta serves https; tests and proxies may not).
    allow_http: bool = False
    #: Networks exempted from the SSRF checks (an internal media proxy). Use knowingly.
    allowed_networks: list[str] = []


class WhatsAppSettings(MetaAppSettings):
    """``connectors.whatsapp.meta`` config section."""

    accounts: dict[str, WhatsAppAccount] = Field(min_length=1)
    media: MediaFetchSettings = MediaFetchSettings()
    #: Refuse non-template sends outside the 24-hour customer-service window.
    enforce_service_window: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.default_account is not None and self.default_account not in self.accounts:
            raise ValueError(f"default_account {self.default_account!r} is not in accounts")
        ids = [a.phone_number_id for a in self.accounts.values()]
        if len(ids) != len(set(ids)):
            raise ValueError("two accounts share a phone_number_id")
        return self


MANIFEST = ConnectorManifest(
    channel=mapping.CHANNEL,
    provider=mapping.PROVIDER,
    api_version="v21.0",
    docs_url="https://developers.facebook.com/docs/whatsapp/cloud-api",
    outbound_content=["text", "media", "location", "contact", "choice", "template"],
    inbound_content=list(mapping.INBOUND_CONTENT),
    delivery_states=sorted(
        {S.DELIVERY_STATE_EXPIRED, S.DELIVERY_STATE_ACCEPTED, *mapping.STATUS_MAP.values()}
    ),
    event_types=list(mapping.EVENT_TYPES),
    limits=ConnectorLimits(
        max_text_length=outbound.MAX_TEXT_LENGTH,
        max_attachments=1,
        max_attachment_bytes=100 * 1024 * 1024,
        max_recipients=1,
    ),
    idempotent_send=False,
)


class WhatsAppConnector:
    """WhatsApp Cloud API in (webhooks) and out (Graph API messages)."""

    manifest = MANIFEST

    def __init__(self, context: ConnectorContext, settings: WhatsAppSettings) -> None:
        self._ctx = context
        self._settings = settings
        self._by_phone_id = {a.phone_number_id: k for k, a in settings.accounts.items()}
        self._graph: GraphClient | None = None
        #: (account, customer E.164) -> when the customer last wrote.
        self._last_inbound: dict[tuple[str, str], datetime] = {}

    @classmethod
    def create(cls, context: ConnectorContext, settings: WhatsAppSettings) -> Self:
        """Factory named by the entry point's spec."""
        return cls(context, settings)

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        return (
            WebhookRoute(name="webhook", path="", handler=self.on_webhook, methods=("GET", "POST")),
        )

    async def start(self) -> None:
        self._graph = GraphClient(
            self._ctx.http,
            base_url=self._settings.graph_base_url,
            version=self._settings.graph_version,
        )

    async def stop(self) -> None:
        self._graph = None

    async def fetch_media(self, account: str, media_id: str) -> FetchedMedia:
        """Download an inbound media item by its Meta media id.

        Resolves the id through the Graph media endpoint (a short-lived URL
        that needs the access token), then fetches that URL SSRF-safely with
        the configured size and time caps. Events carry the media id only:
        the URL expires within minutes and is useless without our token.
        """
        settings = self._settings.accounts.get(account)
        if settings is None:
            raise PermanentError(f"unknown whatsapp account {account!r}", code="unknown_account")
        if not media_id.isdigit():
            raise PermanentError(f"not a Meta media id: {media_id!r}", code="invalid_media_id")
        assert self._graph is not None, "start() the connector first"
        token = settings.access_token.get_secret_value()
        info = await self._graph.call("GET", f"/{media_id}", token=token)
        url = info.get("url")
        if not isinstance(url, str) or not url:
            raise PermanentError("the media endpoint answered without a url", code="no_media_url")
        media = self._settings.media
        fetcher = SafeFetcher(
            max_bytes=media.max_bytes,
            timeout=media.timeout,
            allow_http=media.allow_http,
            allowed_networks=media.allowed_networks,
        )
        return await fetcher.fetch(url, headers={"Authorization": f"Bearer {token}"})

    # -- inbound ---------------------------------------------------------------

    def _account_of(self, phone_number_id: str) -> str:
        key = self._by_phone_id.get(phone_number_id)
        if key is None:
            # Signed by our app, so genuine: a number added to the app but not
            # to our config. Published under its id rather than refused (a
            # refusal would make Meta retry the whole batch for 7 days).
            self._ctx.log.warning(
                "whatsapp webhook for an unconfigured phone number", phone_number_id=phone_number_id
            )
            return phone_number_id
        return key

    async def on_webhook(self, request: WebhookRequest) -> Inbound:
        if request.method == "GET":
            reply = signature.verification_reply(
                request, self._settings.verify_token.get_secret_value()
            )
            return Inbound(events=(), reply=reply)
        signature.verify_signature(request, self._settings.app_secret.get_secret_value())
        batch = mapping.map_webhook(
            envelope(request, mapping.OBJECT),
            account_of=self._account_of,
            received_at=self._ctx.now(),
        )
        for reason in batch.skipped:
            self._ctx.log.info("whatsapp webhook item not published", reason=reason)
        for account, customer, when in batch.customer_messages:
            self.customer_wrote(account, customer, when)
        return Inbound(events=batch.events, reply=WebhookReply(status=200))

    # -- the customer-service window ---------------------------------------------

    def customer_wrote(self, account: str, customer: str, when: datetime) -> None:
        """Record an inbound message (opens or extends the 24-hour window)."""
        key = (account, customer)
        previous = self._last_inbound.pop(key, None)
        self._last_inbound[key] = max(when, previous) if previous else when
        if len(self._last_inbound) > MAX_TRACKED_CUSTOMERS:
            # dicts keep insertion order and a write re-inserts: the first is the stalest.
            del self._last_inbound[next(iter(self._last_inbound))]

    def window_open(self, account: str, customer: str) -> bool:
        """True while the customer's last message is less than 24 hours old."""
        last = self._last_inbound.get((account, customer))
        return last is not None and self._ctx.now() - last < SERVICE_WINDOW

    # -- outbound --------------------------------------------------------------

    def _account_for(self, command: SendMessageCommand) -> str:
        key = (
            command.account or self._settings.default_account or next(iter(self._settings.accounts))
        )
        if key not in self._settings.accounts:
            raise PermanentError(f"unknown whatsapp account {key!r}", code="unknown_account")
        return key

    async def send(self, command: SendMessageCommand) -> SendResult:
        key = self._account_for(command)
        account = self._settings.accounts[key]
        payload = outbound.build_payload(command)
        action = outbound.action(command)
        if (
            self._settings.enforce_service_window
            and action != "mark_read"
            and not outbound.is_template(command)
        ):
            customer = outbound.recipient(command)
            if not self.window_open(key, customer):
                raise PermanentError(
                    "outside the WhatsApp 24-hour customer-service window: the customer has not "
                    "written in the last 24 hours (as far as this connector saw), so only a "
                    "template message can be sent",
                    code="outside_service_window",
                )
        assert self._graph is not None, "start() the connector first"
        answer = await self._graph.call(
            "POST",
            f"/{account.phone_number_id}/messages",
            token=account.access_token.get_secret_value(),
            payload=payload,
        )
        if action == "mark_read":
            if answer.get("success") is not True:
                raise AmbiguousSendError("meta answered mark-as-read without success")
            return SendResult(
                provider_message_id=command.message.reply_to,
                account=key,
                state=S.DELIVERY_STATE_SENT,
                provider_status="read_receipt_sent",
            )
        messages = answer.get("messages")
        first = messages[0] if isinstance(messages, list) and messages else None
        wamid = first.get("id") if isinstance(first, dict) else None
        if not isinstance(wamid, str) or not wamid:
            raise AmbiguousSendError("meta answered 2xx without a message id")
        assert isinstance(first, dict)
        status = first.get("message_status")
        return SendResult(
            provider_message_id=wamid,
            account=key,
            # Meta accepted it; the "sent" status webhook follows.
            state=S.DELIVERY_STATE_ACCEPTED,
            provider_status=status if isinstance(status, str) and status else "accepted",
        )
