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
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import MultiDict


@dataclass(frozen=True, kw_only=True)
class ScriptedAnswer:
    """One scripted answer to the next send."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True, kw_only=True)
class RecordedSend:
    """A send as the fake received it: text fields, and files by field name."""

    domain: str
    fields: MultiDict[str]
    files: list[tuple[str, str, bytes]]
    login: str


class FakeMailgun:
    """Fake Mailgun API on 127.0.0.1 (random port)."""

    def __init__(self) -> None:
        self.calls: list[RecordedSend] = []
        self._script: deque[ScriptedAnswer] = deque()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def answer_next(self, answer: ScriptedAnswer) -> None:
        """Queue a scripted answer."""
        self._script.append(answer)

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

    async def start(self) -> None:
        """Listen on a random port."""
        app = web.Application(client_max_size=30 * 1024 * 1024)
        app.router.add_post("/v3/{domain}/messages", self._send)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = next(a[1] for a in self._runner.addresses if isinstance(a, tuple))
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Stop the server."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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
        answer = self._script.popleft() if self._script else ScriptedAnswer(status=200)
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
