"""Messenger and Instagram messaging connector (Messenger Platform, Graph API v21.0).

Docs: https://developers.facebook.com/docs/messenger-platform

One class serves both channels (``messenger.meta`` and ``instagram.meta``):
they share the webhook envelope (``entry[] x messaging[]``), the signature and
the Send API, and differ in the webhook ``object`` ("page" / "instagram") and
in what they report (Instagram reports read but not delivered).

Route (under ``/webhooks/<channel>/meta``): GET for the subscription
handshake, POST for notifications (``X-Hub-Signature-256``). Accounts are
pages (Messenger) or Instagram professional accounts, found by ``entry.id``.

Outbound: ``POST /<page-or-ig-id>/messages`` with the account's page access token:
messages (``reply_to`` becomes the Send API's ``reply_to.mid``), and sender
actions chosen by ``<channel>.action`` metadata -- ``mark_seen``,
``typing_on``/``typing_off``, and ``reaction`` (``react``/``unreact`` on
``reply_to``); see :mod:`connectors.social.messenger.outbound`.
Delivery and read webhooks name the Meta message id only (the Send API echoes
no metadata on them): status events carry ``provider_message_id``, not the
gateway message id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.social.messenger import mapping, outbound
from connectors.social.meta import signature
from connectors.social.meta.envelope import envelope
from connectors.social.meta.graph import GraphClient
from connectors.social.meta.settings import MetaAppSettings
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
DEDUP_TTL_SECONDS = 8 * 24 * 3600


class PageAccount(BaseModel):
    """A Facebook page (Messenger) or an Instagram professional account."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Page id, or Instagram account id: ``entry.id`` of its webhooks.
    page_id: str = Field(pattern=r"^[0-9]{5,32}$")
    access_token: Secret


class MessagingSettings(MetaAppSettings):
    """``connectors.messenger.meta`` / ``connectors.instagram.meta`` config section."""

    accounts: dict[str, PageAccount] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.default_account is not None and self.default_account not in self.accounts:
            raise ValueError(f"default_account {self.default_account!r} is not in accounts")
        return self


def manifest(channel: str) -> ConnectorManifest:
    """What the connector of ``channel`` can do."""
    reported = (
        {S.DELIVERY_STATE_READ}  # Instagram: read receipts, no delivery receipts
        if channel == "instagram"
        else {S.DELIVERY_STATE_DELIVERED}  # Messenger: read is a watermark (message.read)
    )
    return ConnectorManifest(
        channel=channel,
        provider=mapping.PROVIDER,
        api_version="v21.0",
        docs_url=(
            "https://developers.facebook.com/docs/messenger-platform/instagram"
            if channel == "instagram"
            else "https://developers.facebook.com/docs/messenger-platform"
        ),
        outbound_content=["text", "media", "choice"],
        inbound_content=list(mapping.INBOUND_CONTENT),
        delivery_states=sorted(
            {S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_FAILED, S.DELIVERY_STATE_EXPIRED, *reported}
        ),
        event_types=list(mapping.EVENT_TYPES),
        limits=ConnectorLimits(
            max_text_length=outbound.MAX_TEXT_LENGTH,
            max_attachments=1,
            max_attachment_bytes=25 * 1024 * 1024,
            max_recipients=1,
        ),
        idempotent_send=False,
    )


class MessagingConnector:
    """Messenger or Instagram in (webhooks) and out (Send API)."""

    channel = "messenger"
    manifest = manifest("messenger")

    def __init__(self, context: ConnectorContext, settings: MessagingSettings) -> None:
        self._ctx = context
        self._settings = settings
        self._by_page = {a.page_id: k for k, a in settings.accounts.items()}
        self._graph: GraphClient | None = None

    @classmethod
    def create(cls, context: ConnectorContext, settings: MessagingSettings) -> Self:
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

    def _account_of(self, page_id: str) -> str:
        key = self._by_page.get(page_id)
        if key is None:
            self._ctx.log.warning(f"{self.channel} webhook for an unconfigured account", id=page_id)
            return page_id
        return key

    async def on_webhook(self, request: WebhookRequest) -> Inbound:
        if request.method == "GET":
            reply = signature.verification_reply(
                request, self._settings.verify_token.get_secret_value()
            )
            return Inbound(events=(), reply=reply)
        signature.verify_signature(request, self._settings.app_secret.get_secret_value())
        batch = mapping.map_webhook(
            envelope(request, mapping.OBJECTS[self.channel]),
            channel=self.channel,
            account_of=self._account_of,
            received_at=self._ctx.now(),
        )
        for reason in batch.skipped:
            self._ctx.log.debug(f"{self.channel} webhook item not published", reason=reason)
        return Inbound(events=batch.events, reply=WebhookReply(status=200))

    async def send(self, command: SendMessageCommand) -> SendResult:
        key = (
            command.account or self._settings.default_account or next(iter(self._settings.accounts))
        )
        account = self._settings.accounts.get(key)
        if account is None:
            raise PermanentError(f"unknown {self.channel} account {key!r}", code="unknown_account")
        payload = outbound.build_payload(command, self.channel)
        assert self._graph is not None, "start() the connector first"
        answer = await self._graph.call(
            "POST",
            f"/{account.page_id}/messages",
            token=account.access_token.get_secret_value(),
            payload=payload,
        )
        if "sender_action" in payload:
            return SendResult(
                provider_message_id=f"{payload['sender_action']}:{command.message_id}",
                account=key,
                state=S.DELIVERY_STATE_SENT,
                provider_status=str(payload["sender_action"]),
            )
        mid = answer.get("message_id")
        if not isinstance(mid, str) or not mid:
            raise AmbiguousSendError(f"meta answered 2xx without a {self.channel} message_id")
        return SendResult(provider_message_id=mid, account=key, state=S.DELIVERY_STATE_SENT)


class InstagramConnector(MessagingConnector):
    """Instagram messaging: the Messenger connector with Instagram's object and manifest."""

    channel = "instagram"
    manifest = manifest("instagram")
