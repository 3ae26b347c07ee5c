"""A fake Telegram Bot API over real HTTP, built from the Bot API documentation.

``POST /bot<token>/<method>`` with a JSON body answers like Telegram:
``{"ok": true, "result": ...}`` (a Message for send methods, ``true`` for
``answerCallbackQuery`` / ``setWebhook``) or ``{"ok": false, "error_code",
"description", "parameters"}``. Every call is recorded; the next answers can
be scripted (429 with ``parameters.retry_after``, 5xx, a 400, a hang). An
unknown token gets Telegram's 401 "Unauthorized". :func:`update_headers`
gives the headers Telegram sends with a webhook.

Point ``connectors.telegram.bot.api_base_url`` at :attr:`url`.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.testing.fake_server import FakeProviderServer, ScriptedAnswer

SEND_METHODS = frozenset(
    {
        "sendMessage",
        "sendPhoto",
        "sendDocument",
        "sendVideo",
        "sendAudio",
        "sendVoice",
        "sendSticker",
        "sendLocation",
        "editMessageText",
    }
)
TRUE_METHODS = frozenset({"answerCallbackQuery", "setWebhook", "deleteWebhook"})


def update_headers(secret_token: str) -> dict[str, str]:
    """Headers of a webhook update as Telegram sends it."""
    return {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": secret_token}


@dataclass(frozen=True, kw_only=True)
class RecordedCall:
    """A Bot API call as the fake received it."""

    method: str
    params: dict[str, Any]
    token: str


def _error(code: int, description: str, **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return body


class FakeTelegram(FakeProviderServer):
    """Fake Bot API on 127.0.0.1 (random port)."""

    default_status = 200

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/bot{token}/{method}", self._call)

    def __init__(self, *, tokens: tuple[str, ...], bot_id: int = 7000000001) -> None:
        super().__init__()
        self.tokens = tokens
        self.bot_id = bot_id
        #: Every call with a known token, in order (setWebhook included).
        self.all_calls: list[RecordedCall] = []
        self._ids = itertools.count(100)

    @property
    def calls(self) -> list[RecordedCall]:
        """The send calls (every method but webhook management)."""
        return [c for c in self.all_calls if c.method not in ("setWebhook", "deleteWebhook")]

    def rate_limit_next(self, retry_after: int = 1) -> None:
        """429 with ``parameters.retry_after``."""
        self.answer_next(
            ScriptedAnswer(
                status=429,
                body=_error(
                    429, f"Too Many Requests: retry after {retry_after}", retry_after=retry_after
                ),
            )
        )

    def server_error_next(self, status: int = 500) -> None:
        """A 5xx."""
        self.answer_next(
            ScriptedAnswer(status=status, body=_error(status, "Internal Server Error"))
        )

    def reject_next(self, description: str = "Bad Request: chat not found") -> None:
        """A 400 (permanent)."""
        self.answer_next(ScriptedAnswer(status=400, body=_error(400, description)))

    def hang_next(self, seconds: float) -> None:
        """Answer the next call only after ``seconds``."""
        self.answer_next(ScriptedAnswer(status=200, delay=seconds))

    async def _call(self, request: web.Request) -> web.Response:
        token, method = request.match_info["token"], request.match_info["method"]
        if not any(hmac.compare_digest(token.encode(), t.encode()) for t in self.tokens):
            return web.json_response(_error(401, "Unauthorized"), status=401)
        try:
            params = json.loads(await request.read())
        except ValueError:
            params = None
        if not isinstance(params, dict):
            return web.json_response(_error(400, "Bad Request: no JSON object"), status=400)
        self.all_calls.append(RecordedCall(method=method, params=params, token=token))
        answer = self.next_answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if answer.status != 200:
            return web.json_response(answer.body, status=answer.status)
        if method in TRUE_METHODS:
            return web.json_response({"ok": True, "result": True})
        if method not in SEND_METHODS:
            return web.json_response(_error(404, "Not Found"), status=404)
        chat_id = params.get("chat_id")
        if chat_id is None or (method != "sendLocation" and not _has_content(method, params)):
            return web.json_response(_error(400, "Bad Request: message text is empty"), status=400)
        message_id = params.get("message_id") if method == "editMessageText" else next(self._ids)
        chat_key = int(chat_id) if str(chat_id).lstrip("-").isdigit() else chat_id
        result: dict[str, Any] = {
            "message_id": message_id,
            "from": {"id": self.bot_id, "is_bot": True, "first_name": "Gateway Bot"},
            "chat": {"id": chat_key, "type": "private"},
            "date": int(time.time()),
        }
        if "text" in params:
            result["text"] = params["text"]
        return web.json_response({"ok": True, "result": result})


def _has_content(method: str, params: dict[str, Any]) -> bool:
    field = {
        "sendMessage": "text",
        "editMessageText": "text",
        "sendPhoto": "photo",
        "sendDocument": "document",
        "sendVideo": "video",
        "sendAudio": "audio",
        "sendVoice": "voice",
        "sendSticker": "sticker",
    }[method]
    return bool(params.get(field))
