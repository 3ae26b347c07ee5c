"""voice.vonage over real HTTP: answer webhooks get the flow as NCCO, events are published.

Webhooks are signed as Vonage signs them (HS256 JWT with ``payload_hash``); the
tokens are also checked with Vonage's own ``vonage_jwt.verify_signature`` as an
oracle, so the tests do not rely on our verifier agreeing with our signer.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import jwt
import pytest
import yaml
from vonage_jwt import verify_signature  # type: ignore[import-untyped]

from connectors.voice import lifecycle
from connectors.voice.vonage import MANIFEST
from gateway.api.v1.call_pb2 import CallState
from gateway.api.v1.envelope_pb2 import Event
from gateway.runtime.bus import Delivery
from gateway.runtime.codec import decode_event
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service, enabled_connectors
from gateway.runtime.topology import EVENTS_EXCHANGE
from gateway.testing.conformance import check_manifest
from gateway.testing.fake_vonage import signed_webhook_headers
from tests.connectors.voice.schemas import check_ncco
from tests.connectors.voice.test_flow import FLOWS_YAML

APPLICATION_ID = str(uuid.UUID(int=6))
SECRET_ENV = "TEST_VONAGE_VOICE_SECRET"
OUR_NUMBER = "14155550100"
CALLER = "447700900123"


class VonageHarness:
    """voice.vonage in a service on the in-memory bus."""

    def __init__(self, service: Service, bus: InMemoryBus, secret: str) -> None:
        self.service, self.bus, self.secret = service, bus, secret
        self.http = aiohttp.ClientSession()
        self.events: asyncio.Queue[tuple[Event, str]] = asyncio.Queue()

    def url(self, route: str, account: str = "main", **query: str) -> str:
        base = f"{self.service.base_url}/webhooks/voice/vonage/{account}/{route}"
        return f"{base}?{urlencode(query)}" if query else base

    def headers(self, body: bytes, *, secret: str | None = None, **claims: Any) -> dict[str, str]:
        headers = signed_webhook_headers(
            body, secret or self.secret, api_key="abcd1234", application_id=APPLICATION_ID
        )
        token = headers["Authorization"].removeprefix("Bearer ")
        if claims:
            decoded = jwt.decode(token, options={"verify_signature": False})
            token = jwt.encode({**decoded, **claims}, secret or self.secret, algorithm="HS256")
            headers["Authorization"] = f"Bearer {token}"
        # Vonage's SDK agrees the token is signed with this secret.
        assert verify_signature(token, secret or self.secret)
        return headers

    async def post(self, url: str, payload: dict[str, Any], **kw: Any) -> tuple[int, str]:
        body = json.dumps(payload).encode()
        headers = kw.pop("headers", None) or self.headers(body, **kw)
        async with self.http.post(url, data=body, headers=headers) as resp:
            return resp.status, await resp.text()

    async def get(self, url: str, **kw: Any) -> tuple[int, str]:
        async with self.http.get(url, headers=self.headers(b"", **kw)) as resp:
            return resp.status, await resp.text()

    async def drain(self, settle: float = 0.2) -> list[tuple[Event, str]]:
        found = []
        while True:
            try:
                event, key = await asyncio.wait_for(self.events.get(), settle)
            except TimeoutError:
                return found
            assert check_manifest(MANIFEST, event) == []
            found.append((event, key))


@pytest.fixture
async def vonage() -> AsyncIterator[VonageHarness]:
    secret = secrets.token_hex(24)
    settings = RuntimeSettings.model_validate(
        {
            "http": {"host": "127.0.0.1", "port": 0},
            "broker": {"url": "memory://"},
            "connectors": {
                "voice.vonage": {
                    "accounts": {
                        "main": {
                            "application_id": APPLICATION_ID,
                            "signature_secret": {"env": SECRET_ENV},
                        }
                    },
                    "call_flows": yaml.safe_load(FLOWS_YAML),
                }
            },
        }
    )
    bus = InMemoryBus()
    service = Service(
        settings, enabled_connectors(settings, ["voice"]), bus=bus, environ={SECRET_ENV: secret}
    )
    await service.start()
    harness = VonageHarness(service, bus, secret)

    async def collect(delivery: Delivery) -> None:
        await harness.events.put((decode_event(delivery), delivery.routing_key))

    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["#.voice.vonage"])
    subscription = await bus.consume(queue, collect, prefetch=64)
    try:
        yield harness
    finally:
        await subscription.cancel()
        await harness.http.close()
        await service.stop()


def answer_query(leg: str) -> dict[str, str]:
    return {"to": OUR_NUMBER, "from": CALLER, "uuid": leg, "conversation_uuid": "CON-" + leg}


async def test_answer_webhook_returns_the_flow_as_ncco(vonage: VonageHarness) -> None:
    assert vonage.service.names == ["voice.vonage"]
    leg = str(uuid.uuid4())
    status, body = await vonage.get(vonage.url("answer", **answer_query(leg)))
    assert status == 200
    ncco = check_ncco(json.loads(body))
    assert [a["action"] for a in ncco] == ["talk", "stream", "talk", "input"]
    event_url = urlsplit(ncco[3]["eventUrl"][0])
    assert event_url.path == "/webhooks/voice/vonage/main/gather"
    assert parse_qs(event_url.query) == {"flow": ["support"], "step": ["welcome"], "call": [leg]}
    event, key = (await vonage.drain())[0]
    assert key == "call.answered.voice.vonage"
    assert event.call.call_id == leg
    assert getattr(event.call, "from") == "+" + CALLER
    assert event.call.to == "+" + OUR_NUMBER
    assert event.call.flow_step == "support/welcome"


async def test_input_routes_the_menu(vonage: VonageHarness) -> None:
    leg = str(uuid.uuid4())
    url = vonage.url("gather", flow="support", step="welcome", call=leg)
    payload = {
        **answer_query(leg),
        "dtmf": {"digits": "", "timed_out": False},
        "speech": {"results": [{"confidence": "0.88", "text": "sales"}]},
        "timestamp": "2026-11-23T12:00:00.000Z",
    }
    status, body = await vonage.post(url, payload)
    assert status == 200
    ncco = check_ncco(json.loads(body))
    assert ncco[0]["action"] == "connect"
    assert ncco[0]["endpoint"] == [{"type": "phone", "number": "447700900123"}]
    event, key = (await vonage.drain())[0]
    assert key == "call.input.voice.vonage"
    assert event.call.speech == "sales"
    assert event.attributes["voice.speech_confidence"] == "0.88"
    payload = {
        **payload,
        "dtmf": {"digits": "2"},
        "speech": {},
        "timestamp": "2026-11-23T12:00:09Z",
    }
    status, body = await vonage.post(url, payload)
    assert [a["action"] for a in check_ncco(json.loads(body))] == [
        "talk",
        "record",
        "talk",
        "talk",
    ]


async def test_record_event_is_a_call_recording(vonage: VonageHarness) -> None:
    leg, rec = str(uuid.uuid4()), str(uuid.uuid4())
    status, _ = await vonage.post(
        vonage.url("recording", flow="support", step="voicemail", call=leg),
        {
            "start_time": "2026-11-23T12:00:00Z",
            "recording_url": f"https://api.nexmo.com/v1/files/{rec}",
            "size": 12222,
            "recording_uuid": rec,
            "end_time": "2026-11-23T12:00:14Z",
            "conversation_uuid": "CON-" + leg,
            "timestamp": "2026-11-23T12:00:14Z",
        },
    )
    assert status == 204
    event, key = (await vonage.drain())[0]
    assert key == "call.recording.voice.vonage"
    assert event.call.call_id == leg
    assert event.call.recording.url.endswith(rec)
    assert event.call.recording.size_bytes == 12222


async def test_lifecycle_with_shuffled_and_duplicated_events(vonage: VonageHarness) -> None:
    leg = str(uuid.uuid4())
    base = {**answer_query(leg), "direction": "inbound"}
    events = [
        {**base, "status": "started", "timestamp": "2026-11-23T12:00:00Z"},
        {**base, "status": "ringing", "timestamp": "2026-11-23T12:00:01Z"},
        {**base, "status": "answered", "timestamp": "2026-11-23T12:00:02Z"},
        {**base, "status": "completed", "duration": "31", "timestamp": "2026-11-23T12:00:33Z"},
    ]
    replay = events * 3
    random.Random(6).shuffle(replay)
    results = await asyncio.gather(*(vonage.post(vonage.url("event"), p) for p in replay))
    assert {status for status, _ in results} == {204}
    published = await vonage.drain()
    assert sorted(key for _, key in published) == sorted(
        f"call.{s}.voice.vonage" for s in ("initiated", "ringing", "answered", "completed")
    )
    assert lifecycle.fold(e for e, _ in published) == CallState.CALL_STATE_COMPLETED


@pytest.mark.parametrize(
    "tamper",
    ["wrong secret", "body changed", "stale", "no token", "garbage token", "other application"],
)
async def test_tampered_webhooks_are_refused(vonage: VonageHarness, tamper: str) -> None:
    payload = {**answer_query(str(uuid.uuid4())), "status": "ringing"}
    body = json.dumps(payload).encode()
    headers = {
        "wrong secret": lambda: vonage.headers(body, secret=secrets.token_hex(24)),
        "body changed": lambda: vonage.headers(json.dumps({**payload, "to": "1"}).encode()),
        "stale": lambda: vonage.headers(body, iat=int(time.time()) - 3600),
        "no token": lambda: {"Content-Type": "application/json"},
        "garbage token": lambda: {"Authorization": "Bearer a.b.c"},
        "other application": lambda: vonage.headers(body, application_id=str(uuid.uuid4())),
    }[tamper]()
    for route in ("event", "answer"):
        async with vonage.http.post(vonage.url(route), data=body, headers=headers) as resp:
            assert resp.status in (401, 403), f"{route}: {tamper}"
    assert await vonage.drain(settle=0.1) == []


async def test_broker_outage_still_answers(vonage: VonageHarness) -> None:
    vonage.bus.available = False
    leg = str(uuid.uuid4())
    status, body = await vonage.get(vonage.url("answer", **answer_query(leg)))
    assert status == 200
    assert check_ncco(json.loads(body))[0]["action"] == "talk"
    vonage.bus.available = True
    event, key = await asyncio.wait_for(vonage.events.get(), 5.0)
    assert key == "call.answered.voice.vonage"
    assert event.call.call_id == leg


async def test_transcription_event_keeps_the_transcription_url(vonage: VonageHarness) -> None:
    leg, rec = str(uuid.uuid4()), str(uuid.uuid4())
    url = vonage.url("transcription", flow="support", step="voicemail", call=leg)
    payload = {
        "conversation_uuid": "CON-" + leg,
        "type": "transcription",
        "recording_uuid": rec,
        "status": "transcribed",
        "transcription_url": f"https://api.nexmo.com/v1/files/{rec}-transcript",
    }
    status, _ = await vonage.post(url, payload)
    assert status == 204
    event, key = (await vonage.drain())[0]
    assert key == "call.transcription.voice.vonage"
    assert event.call.call_id == leg
    assert event.attributes["vonage.transcription_url"].endswith("-transcript")
    # Without the call leg in the URL the event cannot be attributed: a clear 400.
    status, _ = await vonage.post(vonage.url("transcription", flow="support", step="x"), payload)
    assert status == 400
