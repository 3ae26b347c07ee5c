"""A fake SendGrid v3 Mail Send API over real HTTP, from SendGrid's documented answers.

``POST /v3/mail/send`` answers ``202`` with an ``X-Message-Id`` header like
SendGrid, or SendGrid's error body (``{"errors": [{"message", "field"}]}``);
every call is recorded, and the next answers can be scripted (429 with
Retry-After, 5xx, a 400 rejection, a hang past the client's timeout). It
plays back no Event Webhook callbacks by itself. Point
``connectors.email.sendgrid.api_base_url`` at :attr:`url`.
https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.testing.fake_server import FakeProviderServer, ScriptedAnswer


@dataclass(frozen=True, kw_only=True)
class RecordedSend:
    """A Mail Send request as the fake received it."""

    payload: dict[str, Any]
    authorization: str


class FakeSendGrid(FakeProviderServer):
    """Fake SendGrid Mail Send API on 127.0.0.1 (random port)."""

    default_status = 202

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v3/mail/send", self._send)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[RecordedSend] = []

    def rate_limit_next(self, retry_after: int = 1) -> None:
        """Answer the next send with 429 and Retry-After."""
        self.answer_next(
            ScriptedAnswer(
                status=429,
                body={"errors": [{"message": "too many requests", "field": None}]},
                headers={"Retry-After": str(retry_after)},
            )
        )

    def server_error_next(self, status: int = 500) -> None:
        """Answer the next send with a 5xx."""
        self.answer_next(
            ScriptedAnswer(status=status, body={"errors": [{"message": "internal error"}]})
        )

    def reject_next(self) -> None:
        """Answer the next send with SendGrid's 400 validation error."""
        self.answer_next(
            ScriptedAnswer(
                status=400,
                body={
                    "errors": [
                        {
                            "message": "Does not contain a valid address.",
                            "field": "personalizations.0.to.0.email",
                            "help": "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html",
                        }
                    ]
                },
            )
        )

    def hang_next(self, seconds: float) -> None:
        """Accept the next send but answer only after ``seconds``."""
        self.answer_next(ScriptedAnswer(status=202, delay=seconds))

    async def _send(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        try:
            payload = await request.json()
        except ValueError:
            return web.json_response({"errors": [{"message": "Bad Request"}]}, status=400)
        self.calls.append(RecordedSend(payload=payload, authorization=authorization))
        answer = self.next_answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if not authorization.startswith("Bearer "):
            return web.json_response(
                {"errors": [{"message": "The provided authorization grant is invalid"}]},
                status=401,
            )
        if answer.status != 202:
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        personalizations = payload.get("personalizations") if isinstance(payload, dict) else None
        if not personalizations or "from" not in payload or not payload.get("content"):
            return web.json_response(
                {"errors": [{"message": "personalizations, from and content are required"}]},
                status=400,
            )
        return web.Response(status=202, headers={"X-Message-Id": secrets.token_urlsafe(16)})
