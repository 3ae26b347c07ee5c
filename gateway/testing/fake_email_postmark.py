"""A fake Postmark email API over real HTTP, from Postmark's documented answers.

``POST /email`` answers ``200`` with ``{"To", "SubmittedAt", "MessageID",
"ErrorCode": 0, "Message": "OK"}`` like Postmark, ``401`` without a server
token, or a scripted answer (429, 5xx, ``422`` with ``ErrorCode`` 300, a hang).
It plays back no webhooks by itself. Point ``connectors.email.postmark.api_base_url``
at :attr:`url`. https://postmarkapp.com/developer/user-guide/send-email-with-api
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.testing.fake_server import FakeProviderServer, ScriptedAnswer


@dataclass(frozen=True, kw_only=True)
class RecordedSend:
    """A send request as the fake received it."""

    payload: dict[str, Any]
    token: str


class FakePostmark(FakeProviderServer):
    """Fake Postmark API on 127.0.0.1 (random port)."""

    default_status = 200

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/email", self._send)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[RecordedSend] = []

    def rate_limit_next(self, retry_after: int = 1) -> None:
        """Answer the next send with 429 and Retry-After."""
        self.answer_next(
            ScriptedAnswer(
                status=429,
                body={"ErrorCode": 429, "Message": "Rate limit exceeded"},
                headers={"Retry-After": str(retry_after)},
            )
        )

    def server_error_next(self, status: int = 500) -> None:
        """Answer the next send with a 5xx."""
        self.answer_next(ScriptedAnswer(status=status, body={"ErrorCode": 0, "Message": "Error"}))

    def reject_next(self) -> None:
        """Answer the next send with Postmark's 422 for an invalid request."""
        self.answer_next(
            ScriptedAnswer(
                status=422,
                body={"ErrorCode": 300, "Message": "Invalid 'To' address: 'not-an-address'."},
            )
        )

    def hang_next(self, seconds: float) -> None:
        """Accept the next send but answer only after ``seconds``."""
        self.answer_next(ScriptedAnswer(status=200, delay=seconds))

    async def _send(self, request: web.Request) -> web.Response:
        token = request.headers.get("X-Postmark-Server-Token", "")
        try:
            payload = await request.json()
        except ValueError:
            return web.json_response({"ErrorCode": 402, "Message": "Invalid JSON"}, status=422)
        self.calls.append(RecordedSend(payload=payload, token=token))
        answer = self.next_answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if not token:
            return web.json_response(
                {"ErrorCode": 10, "Message": "No Account or Server API tokens were supplied"},
                status=401,
            )
        if answer.status != 200:
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        if not isinstance(payload, dict) or not payload.get("From") or not payload.get("To"):
            return web.json_response(
                {"ErrorCode": 300, "Message": "Invalid email request"}, status=422
            )
        return web.json_response(
            {
                "To": payload["To"],
                "SubmittedAt": datetime.now(UTC).isoformat(),
                "MessageID": str(uuid.uuid4()),
                "ErrorCode": 0,
                "Message": "OK",
            }
        )
