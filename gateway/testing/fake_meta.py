"""A fake Meta Graph API over real HTTP, built from Meta's documented payloads.

It answers, under ``/<version>/``:

- ``POST /<phone-number-id>/messages`` like the WhatsApp Cloud API (a message
  id in ``messages[0].id``; ``{"success": true}`` for a mark-as-read);
- ``POST /<page-or-ig-id>/messages`` like the Messenger / Instagram Send API
  (``{"recipient_id", "message_id"}``; ``reply_to`` must carry a ``mid``) and
  its sender actions (``{"recipient_id"}``; ``react`` / ``unreact`` need
  ``payload.message_id``, ``react`` also ``payload.reaction``; never with a
  ``message``);
- ``GET /<media-id>`` like the media endpoint (``{"url", "mime_type", ...}``)
  for media registered with :meth:`FakeMeta.add_media`.

Every call is recorded (path, JSON body, token); the next answers can be
scripted: 429 with Retry-After, 5xx, Meta's 4xx error object, a throttling
error sent as a 400 (as Meta does), a hang. The bearer token must be one of
``tokens`` (else Meta's 190 ``OAuthException``). :func:`signed_headers` signs a
webhook body as Meta does (``X-Hub-Signature-256``).

Point a connector's ``graph_base_url`` at :attr:`url`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.testing.fake_server import FakeProviderServer, ScriptedAnswer

GRAPH_VERSION = "v21.0"


def signed_headers(body: bytes, app_secret: str) -> dict[str, str]:
    """Headers of a webhook POST as Meta sends it."""
    digest = hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"}


def graph_error(code: int, message: str, *, kind: str = "OAuthException") -> dict[str, Any]:
    """Meta's error object."""
    return {
        "error": {
            "message": message,
            "type": kind,
            "code": code,
            "fbtrace_id": uuid.uuid4().hex[:22],
        }
    }


@dataclass(frozen=True, kw_only=True)
class RecordedCall:
    """A request as the fake received it."""

    method: str
    path: str
    body: dict[str, Any]
    token: str


class FakeMeta(FakeProviderServer):
    """Fake Graph API on 127.0.0.1 (random port)."""

    default_status = 200

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(f"/{self.version}/{{node}}/messages", self._send)
        router.add_get(f"/{self.version}/{{node}}", self._media)

    def __init__(self, *, tokens: tuple[str, ...], version: str = GRAPH_VERSION) -> None:
        super().__init__()
        self.tokens = tokens
        self.version = version
        #: Every send call (POST .../messages), in order.
        self.calls: list[RecordedCall] = []
        #: Every media lookup (GET /<media-id>).
        self.media_lookups: list[RecordedCall] = []
        self.media: dict[str, dict[str, Any]] = {}

    # -- scripting ---------------------------------------------------------------

    def rate_limit_next(self, retry_after: int = 1) -> None:
        """429 with Retry-After and Meta's throttling code 130429."""
        self.answer_next(
            ScriptedAnswer(
                status=429,
                body=graph_error(130429, "(#130429) Rate limit hit"),
                headers={"Retry-After": str(retry_after)},
            )
        )

    def throttle_next(self) -> None:
        """Throttling as Meta often reports it: a 400 with code 80007."""
        self.answer_next(
            ScriptedAnswer(status=400, body=graph_error(80007, "(#80007) Rate limit issues"))
        )

    def server_error_next(self, status: int = 500) -> None:
        """A 5xx with Meta's "service temporarily unavailable" error."""
        self.answer_next(
            ScriptedAnswer(status=status, body=graph_error(2, "Service temporarily unavailable"))
        )

    def reject_next(self, code: int = 100, message: str = "(#100) Invalid parameter") -> None:
        """A 400 with Meta's error object (permanent)."""
        self.answer_next(ScriptedAnswer(status=400, body=graph_error(code, message)))

    def hang_next(self, seconds: float) -> None:
        """Answer the next call only after ``seconds``."""
        self.answer_next(ScriptedAnswer(status=200, delay=seconds))

    def add_media(self, media_id: str, *, url: str, mime_type: str, size: int = 0) -> None:
        """Register a media id the media endpoint resolves to ``url``."""
        self.media[media_id] = {
            "messaging_product": "whatsapp",
            "url": url,
            "mime_type": mime_type,
            "sha256": hashlib.sha256(media_id.encode()).hexdigest(),
            "file_size": size,
            "id": media_id,
        }

    # -- server ------------------------------------------------------------------

    def _token(self, request: web.Request) -> str | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer":
            return None
        for known in self.tokens:
            if hmac.compare_digest(token.encode(), known.encode()):
                return token
        return None

    async def _send(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response(graph_error(100, "(#100) body is not JSON"), status=400)
        token = self._token(request)
        self.calls.append(
            RecordedCall(method="POST", path=request.path, body=body, token=token or "")
        )
        if token is None:
            return web.json_response(graph_error(190, "Invalid OAuth access token"), status=401)
        answer = self.next_answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if answer.status != 200:
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        if body.get("messaging_product") == "whatsapp":
            return self._whatsapp(body)
        recipient = body.get("recipient")
        if not isinstance(recipient, dict) or not recipient.get("id"):
            return web.json_response(graph_error(100, "(#100) recipient is required"), status=400)
        if "message" not in body and "sender_action" not in body:
            return web.json_response(graph_error(100, "(#100) message is required"), status=400)
        if "sender_action" in body:
            return self._sender_action(body, recipient["id"])
        reply_to = body.get("reply_to")
        if reply_to is not None and not (isinstance(reply_to, dict) and reply_to.get("mid")):
            return web.json_response(graph_error(100, "(#100) reply_to needs a mid"), status=400)
        return web.json_response(
            {"recipient_id": recipient["id"], "message_id": "m_" + uuid.uuid4().hex}
        )

    def _sender_action(self, body: dict[str, Any], recipient_id: str) -> web.Response:
        """Sender actions as the Messenger docs describe them: alone (no message), and
        ``react`` / ``unreact`` with ``payload.message_id`` (``react`` also ``reaction``)."""
        action = body["sender_action"]
        if "message" in body:
            return web.json_response(
                graph_error(100, "(#100) sender_action cannot be sent with a message"), status=400
            )
        if action in ("react", "unreact"):
            payload = body.get("payload")
            if not isinstance(payload, dict) or not payload.get("message_id"):
                return web.json_response(
                    graph_error(100, "(#100) payload.message_id is required"), status=400
                )
            if action == "react" and not payload.get("reaction"):
                return web.json_response(
                    graph_error(100, "(#100) payload.reaction is required"), status=400
                )
        elif action not in ("mark_seen", "typing_on", "typing_off"):
            return web.json_response(
                graph_error(100, f"(#100) unknown sender_action {action!r}"), status=400
            )
        return web.json_response({"recipient_id": recipient_id})

    def _whatsapp(self, body: dict[str, Any]) -> web.Response:
        if body.get("status") == "read":
            if not body.get("message_id"):
                return web.json_response(graph_error(100, "(#100) message_id required"), status=400)
            return web.json_response({"success": True})
        to = body.get("to")
        kind = body.get("type")
        if not isinstance(to, str) or not to.isdigit() or not isinstance(kind, str):
            return web.json_response(
                graph_error(100, "(#100) Invalid parameter: to / type"), status=400
            )
        if kind not in body:
            return web.json_response(
                graph_error(131008, f"(#131008) Required parameter is missing: {kind}"),
                status=400,
            )
        return web.json_response(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": to}],
                "messages": [{"id": "wamid." + uuid.uuid4().hex.upper()}],
            }
        )

    async def _media(self, request: web.Request) -> web.Response:
        token = self._token(request)
        node = request.match_info["node"]
        self.media_lookups.append(
            RecordedCall(method="GET", path=request.path, body={}, token=token or "")
        )
        if token is None:
            return web.json_response(graph_error(190, "Invalid OAuth access token"), status=401)
        media = self.media.get(node)
        if media is None:
            return web.json_response(
                graph_error(100, f"(#100) Unsupported get request. Object {node} does not exist"),
                status=400,
            )
        return web.json_response(media)
