"""Telegram Bot API connector.

Docs: https://core.telegram.org/bots/api

Route (under ``/webhooks/telegram/bot``): ``/{account}`` per configured bot,
POST only. Telegram sends the ``secret_token`` given to ``setWebhook`` in
``X-Telegram-Bot-Api-Secret-Token``; it is compared in constant time, and a
bot without one cannot be configured (a secret URL alone is weaker). Each
update is one event whose id derives from ``update_id``, so Telegram's
retries (for up to about 24 hours) give one event.

Outbound: ``sendMessage`` (inline keyboards), ``sendPhoto`` / ``sendDocument``
and other media, ``sendLocation``, ``editMessageText`` and
``answerCallbackQuery``; a 429's ``retry_after`` is the retry delay.
:meth:`TelegramConnector.set_webhook` registers the route with Telegram.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.social.telegram import mapping, outbound
from connectors.social.telegram.client import DEFAULT_API_BASE, TelegramClient
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorLimits, ConnectorManifest
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.contract import (
    AmbiguousSendError,
    AuthError,
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
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
#: Telegram retries an update for up to about a day.
DEDUP_TTL_SECONDS = 26 * 3600
#: The update kinds the connector maps (setWebhook's allowed_updates).
ALLOWED_UPDATES = (
    "message",
    "edited_message",
    "channel_post",
    "edited_channel_post",
    "callback_query",
)


class TelegramBot(BaseModel):
    """One bot: its token and the webhook secret token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: Secret
    #: Sent by Telegram in X-Telegram-Bot-Api-Secret-Token (1-256 of A-Z a-z 0-9 _ -).
    secret_token: Secret

    @model_validator(mode="after")
    def _valid_secret(self) -> Self:
        value = self.secret_token.get_secret_value()
        if not 1 <= len(value) <= 256 or not all(
            c.isascii() and (c.isalnum() or c in "_-") for c in value
        ):
            raise ValueError("secret_token must be 1-256 characters of A-Z, a-z, 0-9, _ and -")
        return self


class TelegramSettings(BaseModel):
    """``connectors.telegram.bot`` config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bots: dict[str, TelegramBot] = Field(min_length=1)
    api_base_url: str = DEFAULT_API_BASE
    default_account: str | None = None

    @model_validator(mode="after")
    def _default_known(self) -> Self:
        if self.default_account is not None and self.default_account not in self.bots:
            raise ValueError(f"default_account {self.default_account!r} is not in bots")
        return self


MANIFEST = ConnectorManifest(
    channel=mapping.CHANNEL,
    provider=mapping.PROVIDER,
    api_version="Bot API 7+",
    docs_url="https://core.telegram.org/bots/api",
    outbound_content=["text", "media", "location", "choice"],
    inbound_content=list(mapping.INBOUND_CONTENT),
    # Telegram reports no delivery or read receipts: only the send outcome.
    delivery_states=sorted(
        {S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_FAILED, S.DELIVERY_STATE_EXPIRED}
    ),
    event_types=list(mapping.EVENT_TYPES),
    limits=ConnectorLimits(
        max_text_length=outbound.MAX_TEXT_LENGTH,
        max_attachments=1,
        max_attachment_bytes=50 * 1024 * 1024,
        max_recipients=1,
    ),
    idempotent_send=False,
)


class TelegramConnector:
    """Telegram bots in (webhooks) and out (Bot API)."""

    manifest = MANIFEST

    def __init__(self, context: ConnectorContext, settings: TelegramSettings) -> None:
        self._ctx = context
        self._settings = settings
        self._clients: dict[str, TelegramClient] = {}

    @classmethod
    def create(cls, context: ConnectorContext, settings: TelegramSettings) -> Self:
        """Factory named by the entry point's spec."""
        return cls(context, settings)

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        return (WebhookRoute(name="update", path="/{account}", handler=self.on_update),)

    async def start(self) -> None:
        for key, bot in self._settings.bots.items():
            self._clients[key] = TelegramClient(
                self._ctx.http,
                api_base=self._settings.api_base_url,
                token=bot.token.get_secret_value(),
            )

    async def stop(self) -> None:
        self._clients.clear()

    async def on_update(self, request: WebhookRequest) -> Inbound:
        key = request.path_params.get("account", "")
        bot = self._settings.bots.get(key)
        if bot is None:
            raise AuthError("unknown bot", status=403)
        given = request.headers.get(SECRET_HEADER, "")
        if not given:
            raise AuthError(f"missing {SECRET_HEADER}")
        if not hmac.compare_digest(given.encode(), bot.secret_token.get_secret_value().encode()):
            raise AuthError(f"wrong {SECRET_HEADER}", status=403)
        event = mapping.map_update(request.json(), account=key, received_at=self._ctx.now())
        if event is None:
            self._ctx.log.debug("telegram update kind not published", bot=key)
            return Inbound(events=(), reply=WebhookReply(status=200))
        return Inbound(events=[event], reply=WebhookReply(status=200))

    def _account_for(self, command: SendMessageCommand) -> str:
        key = command.account or self._settings.default_account or next(iter(self._settings.bots))
        if key not in self._settings.bots:
            raise PermanentError(f"unknown telegram bot {key!r}", code="unknown_account")
        return key

    async def send(self, command: SendMessageCommand) -> SendResult:
        key = self._account_for(command)
        method, params = outbound.build_call(command)
        result = await self._clients[key].call(method, params)
        if method == "answerCallbackQuery":
            return SendResult(
                provider_message_id=f"callback:{params['callback_query_id']}",
                account=key,
                state=S.DELIVERY_STATE_SENT,
                provider_status="answered",
            )
        if method == "editMessageText" and result is True:
            # Inline messages answer True instead of the edited message.
            return SendResult(
                provider_message_id=command.message.reply_to,
                account=key,
                state=S.DELIVERY_STATE_SENT,
            )
        if not isinstance(result, dict):
            raise AmbiguousSendError(f"telegram {method}: result is not a message")
        chat, message_id = result.get("chat"), result.get("message_id")
        if not isinstance(chat, dict) or not isinstance(message_id, int) or "id" not in chat:
            raise AmbiguousSendError(f"telegram {method}: result without chat/message_id")
        return SendResult(
            provider_message_id=mapping.message_key(chat["id"], message_id),
            account=key,
            state=S.DELIVERY_STATE_SENT,
            provider_status="sent" if method != "editMessageText" else "edited",
        )

    async def set_webhook(self, account: str, url: str, *, drop_pending: bool = False) -> Any:
        """Register ``url`` as ``account``'s webhook with its secret token."""
        bot = self._settings.bots.get(account)
        if bot is None or account not in self._clients:
            raise PermanentError(f"unknown telegram bot {account!r}", code="unknown_account")
        return await self._clients[account].call(
            "setWebhook",
            {
                "url": url,
                "secret_token": bot.secret_token.get_secret_value(),
                "allowed_updates": list(ALLOWED_UPDATES),
                "drop_pending_updates": drop_pending,
            },
        )

    def webhook_url(self, account: str) -> str:
        """The public URL of ``account``'s update route."""
        return self._ctx.webhook_url("update", account=account)
