"""A fake Vonage Messages API and Voice API over real HTTP, built from Vonage's documented payloads.

It answers ``POST /v1/messages`` like Vonage (202 with ``{"message_uuid": ...}``,
or an RFC 7807 problem document), checks the Authorization header (Basic with
the configured key and secret, or a Bearer application JWT that verifies with
the configured public key), records every call, can be scripted to fail (429
with Retry-After, 5xx, a hang past the client timeout, a 4xx rejection), and
plays the message's life back to the request's ``webhook_url`` as signed
Messages API status webhooks: a real HS256 JWT with the signature secret,
carrying ``payload_hash`` = SHA-256 of the exact body it sends.

Voice API (https://developer.vonage.com/en/api/voice): ``POST /v1/calls``
(a Bearer application JWT that verifies with the public key; the documented
body, else 400 with ``invalid_parameters``; 201 with ``uuid``, ``status``,
``direction``, ``conversation_uuid``) and ``PUT /v1/calls/{uuid}`` (transfer,
hangup, mute, earmuff: 204; 404 for unknown calls, 400 once a call ended).
A placed call plays its life to ``event_url`` as signed voice webhooks
(started, ringing, answered; completed on hangup or with
``complete_calls``), fetches its NCCO from ``answer_url`` (a signed GET, as
Vonage does) when it has one, and can play the record action of its NCCO.

Use it by pointing ``connectors.sms.vonage.api_base_url`` (or
``connectors.voice.vonage.api_base_url``) at :attr:`url`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
from aiohttp import web

from gateway.testing.fake_server import FakeProviderServer, ScriptedAnswer

#: Status webhooks played back after an accepted SMS, in order.
DEFAULT_STATUSES = ("submitted", "delivered")
#: Call events a placed call plays to its event_url, in order.
DEFAULT_CALL_STATUSES = ("started", "ringing", "answered")
#: NCCO actions the NCCO reference documents.
NCCO_ACTIONS = frozenset(
    {"record", "conversation", "connect", "talk", "stream", "input", "notify", "wait", "transfer"}
)
#: Fields of a create call request body (Voice API reference).
CREATE_CALL_FIELDS = frozenset(
    {
        "to",
        "from",
        "random_from_number",
        "ncco",
        "answer_url",
        "answer_method",
        "event_url",
        "event_method",
        "machine_detection",
        "advanced_machine_detection",
        "length_timer",
        "ringing_timer",
    }
)
MODIFY_ACTIONS = frozenset({"transfer", "hangup", "mute", "unmute", "earmuff", "unearmuff"})


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


@dataclass(frozen=True, kw_only=True)
class VoiceRequest:
    """A Voice API request as the fake received it."""

    method: str
    path: str
    body: Any
    authorization: str


@dataclass(kw_only=True)
class FakeCall:
    """A call the fake placed, and what it was told to run."""

    uuid: str
    conversation_uuid: str
    to: dict[str, Any]
    from_number: str
    event_url: str | None
    answer_url: str | None
    status: str = "started"
    #: Every NCCO the call ran: the create request's, the answer_url's, transfers'.
    nccos: list[list[dict[str, Any]]] = field(default_factory=list)
    #: Voice event webhooks delivered: (status, HTTP status of the answer).
    events_sent: list[tuple[str, int]] = field(default_factory=list)


def _voice_problem(status: int, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    slug = title.lower().replace(" ", "-")
    return {
        "type": f"https://developer.vonage.com/api-errors#{slug}",
        "title": title,
        "detail": detail,
        "instance": str(uuid.uuid4()),
        **extra,
    }


def _invalid(problems: list[tuple[str, str]]) -> web.Response:
    body = _voice_problem(
        400,
        "Bad Request",
        "The request failed due to validation errors",
        invalid_parameters=[{"name": name, "reason": reason} for name, reason in problems],
    )
    return web.json_response(body, status=400)


def _url_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], str)
        and value[0].startswith(("http://", "https://"))
    )


def create_call_problems(body: Any) -> list[tuple[str, str]]:
    """What is wrong with a create call body, per the Voice API reference."""
    if not isinstance(body, dict):
        return [("body", "must be a JSON object")]
    problems = [(name, "unknown parameter") for name in body if name not in CREATE_CALL_FIELDS]
    to = body.get("to")
    if not isinstance(to, list) or len(to) != 1 or not isinstance(to[0], dict):
        problems.append(("to", "must be a list of one endpoint"))
    else:
        endpoint = to[0]
        kind = endpoint.get("type")
        if kind == "phone":
            number = endpoint.get("number")
            if not (isinstance(number, str) and number.isdigit() and 7 <= len(number) <= 15):
                problems.append(("to[0].number", "must be 7-15 digits (E.164 without +)"))
        elif kind == "sip":
            uri = endpoint.get("uri")
            if not (isinstance(uri, str) and uri.startswith(("sip:", "sips:"))):
                problems.append(("to[0].uri", "must be a sip: URI"))
        else:
            problems.append(("to[0].type", f"unsupported endpoint type {kind!r}"))
    sender, random_from = body.get("from"), body.get("random_from_number")
    if sender is not None and random_from is True:
        problems.append(("from", "from and random_from_number cannot be used together"))
    elif sender is None and random_from is not True:
        problems.append(("from", "either from or random_from_number must be set"))
    elif sender is not None and not (
        isinstance(sender, dict)
        and sender.get("type") == "phone"
        and isinstance(sender.get("number"), str)
        and sender["number"].isdigit()
    ):
        problems.append(("from", "must be {type: phone, number: E.164 digits}"))
    if ("ncco" in body) == ("answer_url" in body):
        problems.append(("ncco", "exactly one of ncco and answer_url must be set"))
    if "ncco" in body:
        ncco = body["ncco"]
        if not isinstance(ncco, list) or not ncco:
            problems.append(("ncco", "must be a non-empty list of actions"))
        else:
            for index, action in enumerate(ncco):
                if not isinstance(action, dict) or action.get("action") not in NCCO_ACTIONS:
                    problems.append((f"ncco[{index}].action", "unknown NCCO action"))
    if "answer_url" in body and not _url_list(body["answer_url"]):
        problems.append(("answer_url", "must be a list of one URL"))
    if "event_url" in body and not _url_list(body["event_url"]):
        problems.append(("event_url", "must be a list of one URL"))
    for name in ("answer_method", "event_method"):
        if name in body and body[name] not in ("GET", "POST"):
            problems.append((name, "must be GET or POST"))
    timer = body.get("ringing_timer")
    if timer is not None and not (isinstance(timer, int) and 1 <= timer <= 120):
        problems.append(("ringing_timer", "must be 1-120"))
    return problems


def modify_call_problems(body: Any) -> list[tuple[str, str]]:
    """What is wrong with a modify call body, per the Voice API reference."""
    if not isinstance(body, dict) or body.get("action") not in MODIFY_ACTIONS:
        return [("action", f"must be one of {sorted(MODIFY_ACTIONS)}")]
    if body["action"] != "transfer":
        return [(name, "unknown parameter") for name in body if name != "action"]
    destination = body.get("destination")
    if not isinstance(destination, dict) or destination.get("type") != "ncco":
        return [("destination", "must be {type: ncco, ncco: [...]} or {type: ncco, url: [...]}")]
    if ("ncco" in destination) == ("url" in destination):
        return [("destination", "exactly one of ncco and url")]
    ncco = destination.get("ncco")
    if "ncco" in destination and (
        not isinstance(ncco, list)
        or not ncco
        or any(not isinstance(a, dict) or a.get("action") not in NCCO_ACTIONS for a in ncco)
    ):
        return [("destination.ncco", "must be a non-empty list of NCCO actions")]
    if "url" in destination and not _url_list(destination["url"]):
        return [("destination.url", "must be a list of one URL")]
    return []


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
        router.add_post("/v1/calls", self._create_call)
        router.add_put("/v1/calls/{uuid}", self._modify_call)

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
        call_statuses: tuple[str, ...] = DEFAULT_CALL_STATUSES,
        complete_calls: bool = False,
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
        #: Voice API: events a placed call plays; complete_calls ends it after them.
        self.call_statuses = call_statuses
        self.complete_calls = complete_calls
        self.voice_requests: list[VoiceRequest] = []
        self.voice_calls: dict[str, FakeCall] = {}
        self._stopping = False

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

    def _application_jwt(self, header: str) -> bool:
        """A Bearer application JWT: RS256 with the application's key, as the Voice API needs."""
        scheme, _, value = header.partition(" ")
        if scheme != "Bearer" or self.public_key is None:
            return False
        try:
            claims = jwt.decode(
                value,
                self.public_key,
                algorithms=["RS256"],
                options={"require": ["iat", "jti", "application_id"]},
            )
        except jwt.PyJWTError:
            return False
        return bool(claims.get("application_id") == self.application_id)

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

    # -- Voice API -------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """As the base, but nothing new starts once stopping: a request still in
        flight then (a scripted hang) must not start webhooks after the session closed."""
        if self._stopping:
            coro.close()
            return
        super().spawn(coro)

    async def start(self) -> None:
        """Start as the base does (spawning again after a stop)."""
        self._stopping = False
        await super().start()

    async def stop(self) -> None:
        """Stop spawning, then stop as the base does."""
        self._stopping = True
        await super().stop()

    async def _voice_request(self, request: web.Request) -> tuple[Any, web.Response | None]:
        """Record the request; an error response when auth or scripting says so."""
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        authorization = request.headers.get("Authorization", "")
        self.voice_requests.append(
            VoiceRequest(
                method=request.method, path=request.path, body=body, authorization=authorization
            )
        )
        if not self._application_jwt(authorization):
            problem = _voice_problem(401, "Unauthorized", "Invalid or missing application JWT.")
            return body, web.json_response(problem, status=401)
        answer = self.next_answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if answer.status != self.default_status:
            response = web.json_response(answer.body, status=answer.status, headers=answer.headers)
            return body, response
        if body is None:
            return body, _invalid([("body", "is not JSON")])
        return body, None

    async def _create_call(self, request: web.Request) -> web.Response:
        body, refused = await self._voice_request(request)
        if refused is not None:
            return refused
        problems = create_call_problems(body)
        if problems:
            return _invalid(problems)
        call = FakeCall(
            uuid=str(uuid.uuid4()),
            conversation_uuid=f"CON-{uuid.uuid4()}",
            to=body["to"][0],
            from_number=(body.get("from") or {}).get("number", "14155550999"),
            event_url=body["event_url"][0] if "event_url" in body else None,
            answer_url=body["answer_url"][0] if "answer_url" in body else None,
        )
        if "ncco" in body:
            call.nccos.append(body["ncco"])
        self.voice_calls[call.uuid] = call
        self.spawn(self._play_call(call))
        return web.json_response(
            {
                "uuid": call.uuid,
                "status": "started",
                "direction": "outbound",
                "conversation_uuid": call.conversation_uuid,
            },
            status=201,
        )

    async def _modify_call(self, request: web.Request) -> web.Response:
        body, refused = await self._voice_request(request)
        if refused is not None:
            return refused
        call = self.voice_calls.get(request.match_info["uuid"])
        if call is None:
            problem = _voice_problem(
                404, "Not Found", f"Call {request.match_info['uuid']} was not found."
            )
            return web.json_response(problem, status=404)
        problems = modify_call_problems(body)
        if problems:
            return _invalid(problems)
        if call.status == "completed":
            problem = _voice_problem(400, "Bad Request", "The call is not in progress.")
            return web.json_response(problem, status=400)
        if body["action"] == "hangup":
            call.status = "completed"
            self.spawn(self._send_call_event(call, "completed"))
        elif body["action"] == "transfer" and "ncco" in body["destination"]:
            call.nccos.append(body["destination"]["ncco"])
        return web.Response(status=204)

    def call_event_payload(self, call: FakeCall, status: str) -> dict[str, Any]:
        """A voice event webhook body, as documented for an outbound call."""
        to = call.to.get("number") or call.to.get("uri", "")
        payload: dict[str, Any] = {
            "from": call.from_number,
            "to": to,
            "uuid": call.uuid,
            "conversation_uuid": call.conversation_uuid,
            "status": status,
            "direction": "outbound",
            "timestamp": iso_now(),
        }
        if status == "completed":
            payload |= {
                "duration": "12",
                "rate": "0.01270000",
                "price": "0.00254000",
                "network": "23410",
                "start_time": iso_now(),
                "end_time": iso_now(),
            }
        return payload

    async def _play_call(self, call: FakeCall) -> None:
        for status in self.call_statuses:
            await asyncio.sleep(self.callback_delay)
            call.status = status
            if status == "answered" and call.answer_url:
                await self._fetch_answer(call)
            await self._send_call_event(call, status)
        if self.complete_calls and call.status != "completed":
            await asyncio.sleep(self.callback_delay)
            call.status = "completed"
            await self._send_call_event(call, "completed")

    async def _send_call_event(self, call: FakeCall, status: str) -> None:
        if not call.event_url:
            return
        http_status = await self.post_voice_webhook(
            call.event_url, self.call_event_payload(call, status)
        )
        call.events_sent.append((status, http_status))

    async def _fetch_answer(self, call: FakeCall) -> None:
        # Vonage appends the call's parameters to the answer_url's own query.
        assert call.answer_url is not None
        to = call.to.get("number") or call.to.get("uri", "")
        query = urlencode(
            {
                "to": to,
                "from": call.from_number,
                "uuid": call.uuid,
                "conversation_uuid": call.conversation_uuid,
            }
        )
        url = f"{call.answer_url}{'&' if '?' in call.answer_url else '?'}{query}"
        headers = signed_webhook_headers(
            b"", self.signature_secret, api_key=self.api_key, application_id=self.application_id
        )
        headers.pop("Content-Type")
        async with self.session.get(url, headers=headers) as resp:
            if resp.status == 200:
                call.nccos.append(await resp.json(content_type=None))
            call.events_sent.append(("answer_url", resp.status))

    async def play_recording(self, call_uuid: str, *, size: int = 16_000) -> int:
        """Run the last record action of the call's latest NCCO: POST its signed
        record event (as documented) to the action's eventUrl; the HTTP status."""
        call = self.voice_calls[call_uuid]
        record = next(a for a in reversed(call.nccos[-1]) if a.get("action") == "record")
        recording_uuid = str(uuid.uuid4())
        payload = {
            "start_time": "2026-11-23T12:00:00Z",
            "recording_url": f"{self.url}/v1/files/{recording_uuid}",
            "size": size,
            "recording_uuid": recording_uuid,
            "end_time": "2026-11-23T12:00:21Z",
            "conversation_uuid": call.conversation_uuid,
            "timestamp": iso_now(),
        }
        return await self.post_voice_webhook(record["eventUrl"][0], payload)

    async def post_voice_webhook(self, url: str, payload: dict[str, Any]) -> int:
        """POST a JSON voice webhook signed as Vonage signs them; the HTTP status."""
        body = json.dumps(payload).encode()
        headers = signed_webhook_headers(
            body, self.signature_secret, api_key=self.api_key, application_id=self.application_id
        )
        async with self.session.post(url, data=body, headers=headers) as resp:
            return resp.status
