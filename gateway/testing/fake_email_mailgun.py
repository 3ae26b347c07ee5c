"""A fake Mailgun Messages API over real HTTP, from Mailgun's documented answers.

``POST /v3/{domain}/messages`` (basic auth ``api:<key>``, a multipart or
urlencoded form) answers ``200 {"id": "<...@domain>", "message": "Queued.
Thank you."}`` like Mailgun, ``401`` without credentials, or a scripted answer
(429, 5xx, ``400 {"message": ...}``, a hang). It plays back no webhooks.
Point ``connectors.email.mailgun.api_base_url`` at :attr:`url`.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from dataclasses import dataclass

from aiohttp import web
from multidict import MultiDict

from gateway.testing.fake_server import FakeProviderServer, ScriptedAnswer


@dataclass(frozen=True, kw_only=True)
class RecordedSend:
    """A send as the fake received it: text fields, and files by field name."""

    domain: str
    fields: MultiDict[str]
    files: list[tuple[str, str, bytes]]
    login: str


class FakeMailgun(FakeProviderServer):
    """Fake Mailgun API on 127.0.0.1 (random port)."""

    default_status = 200
    client_max_size = 30 * 1024 * 1024

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v3/{domain}/messages", self._send)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[RecordedSend] = []

    def rate_limit_next(self, retry_after: int = 1) -> None:
        """Answer the next send with 429 and Retry-After."""
        self.answer_next(
            ScriptedAnswer(
                status=429,
                body={"message": "Too Many Requests"},
                headers={"Retry-After": str(retry_after)},
            )
        )

    def server_error_next(self, status: int = 500) -> None:
        """Answer the next send with a 5xx."""
        self.answer_next(ScriptedAnswer(status=status, body={"message": "Internal Server Error"}))

    def reject_next(self) -> None:
        """Answer the next send with Mailgun's 400."""
        self.answer_next(
            ScriptedAnswer(status=400, body={"message": "to parameter is not a valid address."})
        )

    def hang_next(self, seconds: float) -> None:
        """Accept the next send but answer only after ``seconds``."""
        self.answer_next(ScriptedAnswer(status=200, delay=seconds))

    async def _send(self, request: web.Request) -> web.Response:
        domain = request.match_info["domain"]
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        try:
            user, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            user, secret = "", ""
        login = user if scheme.lower() == "basic" and user == "api" and secret else ""
        form = await request.post()
        fields: MultiDict[str] = MultiDict()
        files: list[tuple[str, str, bytes]] = []
        for name, value in form.items():
            if isinstance(value, web.FileField):
                files.append((name, value.filename, value.file.read()))
            else:
                fields.add(name, str(value))
        self.calls.append(RecordedSend(domain=domain, fields=fields, files=files, login=login))
        answer = self.next_answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if not login:
            return web.Response(status=401, text="Forbidden")
        if answer.status != 200:
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        if "from" not in fields or "to" not in fields:
            return web.json_response({"message": "from and to are required"}, status=400)
        return web.json_response(
            {"id": f"<{uuid.uuid4().hex}@{domain}>", "message": "Queued. Thank you."}
        )
