"""A fake Vonage Messages API over real HTTP, built from Vonage's documented payloads.

It answers ``POST /v1/messages`` like Vonage (202 with ``{"message_uuid": ...}``,
or an RFC 7807 problem document), checks the Authorization header (Basic with
the configured key and secret, or a Bearer application JWT that verifies with
the configured public key), records every call, can be scripted to fail (429
with Retry-After, 5xx, a hang past the client timeout, a 4xx rejection), and
plays the message's life back to the request's ``webhook_url`` as signed
Messages API status webhooks: a real HS256 JWT with the signature secret,
carrying ``payload_hash`` = SHA-256 of the exact body it sends.

Use it by pointing ``connectors.sms.vonage.api_base_url`` at :attr:`url`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jwt
from aiohttp import web

from gateway.testing.fake_server import FakeProviderServer, ScriptedAnswer

#: Status webhooks played back after an accepted SMS, in order.
DEFAULT_STATUSES = ("submitted", "delivered")


def signed_webhook_headers(
    body: bytes,
    signature_secret: str,
    *,
    api_key: str,
    application_id: str | None = None,
    issued_at: float | None = None,
) -> dict[str, str]:
    """Headers of a Messages API webhook as Vonage signs it.

    ``Authorization: Bearer <JWT>``, HS256 with the signature secret; claims
    ``iat``, ``jti``, ``iss`` ("Vonage"), ``api_key``, ``application_id`` and
    ``payload_hash`` (hex SHA-256 of ``body``).
    """
    claims: dict[str, Any] = {
        "iat": int(time.time() if issued_at is None else issued_at),
        "jti": str(uuid.uuid4()),
        "iss": "Vonage",
        "api_key": api_key,
        "payload_hash": hashlib.sha256(body).hexdigest(),
    }
    if application_id:
        claims["application_id"] = application_id
    token = jwt.encode(claims, signature_secret, algorithm="HS256")
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def iso_now() -> str:
    """A timestamp as Vonage writes it (``2025-02-03T10:11:12.000Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True, kw_only=True)
class RecordedCall:
    """A send request as the fake received it."""

    body: dict[str, Any]
    authorization: str


@dataclass(frozen=True, kw_only=True)
class SentCallback:
    """A status webhook the fake delivered, and the answer it got."""

    message_uuid: str
    status: str
    http_status: int


def _problem(status: int, code: str, title: str, detail: str) -> ScriptedAnswer:
    return ScriptedAnswer(
        status=status,
        body={
            "type": f"https://developer.vonage.com/api-errors/messages#{code}",
            "title": title,
            "detail": detail,
            "instance": str(uuid.uuid4()),
        },
    )


class FakeVonage(FakeProviderServer):
    """Fake Vonage Messages API on 127.0.0.1 (random port)."""

    default_status = 202

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/messages", self._send)

    def __init__(
        self,
        *,
        api_key: str,
        signature_secret: str,
        api_secret: str | None = None,
        application_id: str | None = None,
        public_key: str | None = None,
        callback_statuses: tuple[str, ...] = DEFAULT_STATUSES,
        callback_delay: float = 0.01,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.api_secret = api_secret
        self.signature_secret = signature_secret
        self.application_id = application_id
        self.public_key = public_key
        self.callback_statuses = callback_statuses
        self.callback_delay = callback_delay
        self.calls: list[RecordedCall] = []
        self.callbacks_sent: list[SentCallback] = []

    # -- scripting ---------------------------------------------------------------

    def rate_limit_next(self, retry_after: int = 1) -> None:
        """Answer the next call with 429 and a Retry-After header."""
        answer = _problem(429, "1000", "Throttled", "You have exceeded the submission capacity.")
        self.answer_next(
            ScriptedAnswer(status=429, body=answer.body, headers={"Retry-After": str(retry_after)})
        )

    def server_error_next(self, status: int = 500) -> None:
        """Answer the next call with a 5xx."""
        self.answer_next(_problem(status, "1030", "Internal error", "Error in the platform."))

    def reject_next(self, status: int = 422, code: str = "1150") -> None:
        """Answer the next call with Vonage's 4xx problem document."""
        self.answer_next(
            _problem(
                status, code, "Invalid params", "The value of one or more parameters is invalid."
            )
        )

    def hang_next(self, seconds: float) -> None:
        """Accept the next call but answer only after ``seconds`` (a timeout for the client)."""
        self.answer_next(ScriptedAnswer(status=202, delay=seconds))

    # -- server ------------------------------------------------------------------

    def _authorized(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme == "Basic" and self.api_secret is not None:
            expected = aiohttp.encode_basic_auth(self.api_key, self.api_secret)
            return hmac.compare_digest(header.encode(), expected.encode())
        if scheme == "Bearer" and self.public_key is not None:
            try:
                claims = jwt.decode(value, self.public_key, algorithms=["RS256"])
            except jwt.PyJWTError:
                return False
            return bool(claims.get("application_id") == self.application_id and claims.get("jti"))
        return False

    async def _send(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            problem = _problem(400, "1010", "Bad request", "The request body is not JSON.")
            return web.json_response(problem.body, status=400)
        self.calls.append(RecordedCall(body=body, authorization=authorization))
        if not self._authorized(authorization):
            problem = _problem(401, "unauthorized", "Unauthorized", "Invalid credentials.")
            return web.json_response(problem.body, status=401)
        answer = self.next_answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if answer.status != 202:
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        missing = [k for k in ("to", "from", "channel", "message_type") if not body.get(k)]
        if missing or body.get("channel") != "sms":
            problem = _problem(
                422, "1010", "Missing params", f"Missing or invalid: {', '.join(missing)}"
            )
            return web.json_response(problem.body, status=422)
        message_uuid = str(uuid.uuid4())
        callback = body.get("webhook_url")
        if isinstance(callback, str) and callback:
            self.spawn(self._play_callbacks(callback, message_uuid, body))
        return web.json_response({"message_uuid": message_uuid}, status=202)

    async def _play_callbacks(self, url: str, message_uuid: str, sent: dict[str, Any]) -> None:
        for status in self.callback_statuses:
            await asyncio.sleep(self.callback_delay)
            await self.send_status(
                url,
                message_uuid=message_uuid,
                status=status,
                to=str(sent["to"]),
                sender=str(sent["from"]),
                client_ref=sent.get("client_ref"),
            )

    def status_payload(
        self,
        *,
        message_uuid: str,
        status: str,
        to: str,
        sender: str,
        client_ref: object = None,
        error_code: str | None = None,
    ) -> dict[str, Any]:
        """A Messages API SMS status webhook body, as documented."""
        payload: dict[str, Any] = {
            "message_uuid": message_uuid,
            "to": to,
            "from": sender,
            "timestamp": iso_now(),
            "status": status,
            "channel": "sms",
        }
        if isinstance(client_ref, str) and client_ref:
            payload["client_ref"] = client_ref
        if status == "submitted":
            payload["usage"] = {"currency": "EUR", "price": "0.0333"}
            payload["destination"] = {"network_code": "23410"}
            payload["sms"] = {"count_total": "1"}
        if error_code:
            payload["error"] = {
                "type": f"https://developer.vonage.com/api-errors/messages#{error_code}",
                "title": error_code,
                "detail": "Message was not delivered.",
                "instance": str(uuid.uuid4()),
            }
        return payload

    async def send_status(
        self,
        url: str,
        *,
        message_uuid: str,
        status: str,
        to: str,
        sender: str,
        client_ref: object = None,
        error_code: str | None = None,
    ) -> int:
        """POST one signed status webhook, as Vonage does; returns the HTTP status."""
        payload = self.status_payload(
            message_uuid=message_uuid,
            status=status,
            to=to,
            sender=sender,
            client_ref=client_ref,
            error_code=error_code,
        )
        return await self.post_signed(url, payload, message_uuid=message_uuid, status=status)

    async def post_signed(
        self, url: str, payload: dict[str, Any], *, message_uuid: str = "", status: str = ""
    ) -> int:
        """POST any JSON payload as a signed Messages API webhook; returns the HTTP status."""
        body = json.dumps(payload).encode()
        headers = signed_webhook_headers(
            body,
            self.signature_secret,
            api_key=self.api_key,
            application_id=self.application_id,
        )
        async with self.session.post(url, data=body, headers=headers) as resp:
            self.callbacks_sent.append(
                SentCallback(message_uuid=message_uuid, status=status, http_status=resp.status)
            )
            return resp.status
