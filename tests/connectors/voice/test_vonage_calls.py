"""voice.vonage call control: place, transfer, enqueue, speak, hang up, against the fake
Voice API over real HTTP, in a real service on the in-memory bus.

Oracles independent of our code: every request body is validated with Vonage's own
Python SDK models (``vonage_voice.models``) and the NCCO reference schema in
``schemas.check_ncco``; the fake verifies the application JWT with the public key and
accepts tokens minted by Vonage's ``vonage_jwt.JwtClient``; the fake signs the voice
webhooks the way Vonage does (HS256 with ``payload_hash``), which the connector verifies.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from vonage_jwt import JwtClient  # type: ignore[import-untyped]
from vonage_voice.models import (  # type: ignore[import-untyped]
    Connect,
    Conversation,
    CreateCallRequest,
    Record,
    Stream,
    Talk,
)

from connectors.voice import lifecycle
from connectors.voice.vonage import MANIFEST, VonageVoiceConnector
from gateway.api.v1.call_pb2 import (
    CallCommand,
    CallState,
    EnqueueCall,
    HangUpCall,
    PlaceCall,
    SpeakToCall,
    TransferCall,
)
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Direction
from gateway.contract import CallControl, CallResult
from gateway.runtime.bus import Delivery
from gateway.runtime.codec import decode_event
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service, enabled_connectors
from gateway.runtime.topology import EVENTS_EXCHANGE
from gateway.testing.conformance import check_manifest
from gateway.testing.fake_vonage import FakeVonage
from tests.connectors.voice.schemas import check_ncco
from tests.connectors.voice.test_flow import FLOWS_YAML

APPLICATION_ID = str(uuid.UUID(int=66))
API_KEY = "abcd1234"
SECRET_ENV = "TEST_VONAGE_VOICE_CALLS_SECRET"
OUR_NUMBER = "+14155550100"
CUSTOMER = "+447700900123"


class RsaKey:
    """An application key pair (PEM)."""

    def __init__(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        self.public = (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )


@pytest.fixture(scope="module")
def key() -> RsaKey:
    """One application key for the module (RSA generation is the slow part)."""
    return RsaKey()


class CallHarness:
    """voice.vonage in a service, the fake Voice API, and the events published."""

    def __init__(self, service: Service, bus: InMemoryBus, fake: FakeVonage) -> None:
        self.service, self.bus, self.fake = service, bus, fake
        self.events: asyncio.Queue[tuple[Event, str]] = asyncio.Queue()

    @property
    def connector(self) -> VonageVoiceConnector:
        connector = self.service.hosted[0].connector
        assert isinstance(connector, VonageVoiceConnector)
        return connector

    async def call(self, **action: Any) -> CallResult:
        """Run one call command through the connector."""
        command = CallCommand(
            command_id=str(uuid.uuid4()), channel="voice", provider="vonage", **action
        )
        return await self.connector.call(command)

    def route(self, name: str) -> str:
        return f"{self.service.base_url}/webhooks/voice/vonage/main/{name}"

    async def next_event(self, timeout: float = 5.0) -> tuple[Event, str]:
        event, key = await asyncio.wait_for(self.events.get(), timeout)
        assert check_manifest(MANIFEST, event) == []
        return event, key

    async def events_until(self, routing_key: str) -> list[tuple[Event, str]]:
        """Events published up to and including the first with ``routing_key``."""
        found: list[tuple[Event, str]] = []
        while not found or found[-1][1] != routing_key:
            found.append(await self.next_event())
        return found

    async def drain(self, settle: float = 0.2) -> list[tuple[Event, str]]:
        found = []
        while True:
            try:
                found.append(await self.next_event(settle))
            except TimeoutError:
                return found


def section(fake: FakeVonage, key_file: Path, **overrides: Any) -> dict[str, Any]:
    """The voice.vonage config section pointing at ``fake``."""
    account = {
        "application_id": APPLICATION_ID,
        "signature_secret": {"env": SECRET_ENV},
        "private_key": {"file": str(key_file)},
        "caller_number": OUR_NUMBER,
    }
    return {
        "accounts": {"main": account},
        "call_flows": yaml.safe_load(FLOWS_YAML),
        "api_base_url": fake.url,
        **overrides,
    }


async def start(
    fake: FakeVonage, key: RsaKey, tmp_path: Path, *, provider_timeout: float = 5.0, **kw: Any
) -> CallHarness:
    key_file = tmp_path / "vonage-private.key"
    key_file.write_text(key.private)
    settings = RuntimeSettings.model_validate(
        {
            "http": {"host": "127.0.0.1", "port": 0},
            "broker": {"url": "memory://"},
            "send": {
                "provider_timeout": provider_timeout,
                "initial_backoff": 0,
                "max_backoff": 0.01,
            },
            "connectors": {"voice.vonage": section(fake, key_file, **kw)},
        }
    )
    bus = InMemoryBus()
    service = Service(
        settings,
        enabled_connectors(settings, ["voice"]),
        bus=bus,
        environ={SECRET_ENV: fake.signature_secret},
    )
    await service.start()
    harness = CallHarness(service, bus, fake)

    async def collect(delivery: Delivery) -> None:
        await harness.events.put((decode_event(delivery), delivery.routing_key))

    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["#.voice.vonage"])
    await bus.consume(queue, collect, prefetch=64)
    return harness


def new_fake(key: RsaKey, **kw: Any) -> FakeVonage:
    return FakeVonage(
        api_key=API_KEY,
        signature_secret=secrets.token_hex(24),
        application_id=APPLICATION_ID,
        public_key=key.public,
        **kw,
    )


@asynccontextmanager
async def running(key: RsaKey, tmp_path: Path, **kw: Any) -> AsyncIterator[CallHarness]:
    """A fresh fake Voice API and the connector's service on it (``kw``: :func:`start`'s),
    stopped on leaving."""
    async with new_fake(key) as fake:
        harness = await start(fake, key, tmp_path, **kw)
        try:
            yield harness
        finally:
            await harness.service.stop()


@pytest.fixture
async def calls(key: RsaKey, tmp_path: Path) -> AsyncIterator[CallHarness]:
    """The connector and a fake whose calls stay live until hung up."""
    async with running(key, tmp_path) as harness:
        yield harness


# -- oracles -----------------------------------------------------------------------------


def sdk_create_call(body: dict[str, Any]) -> Any:
    """Vonage's SDK model of a create call request; raises on anything it rejects.

    The SDK names ``from`` ``from_`` on input (it serialises it back as ``from``).
    """
    data = {("from_" if k == "from" else k): v for k, v in body.items()}
    if "ncco" in data:
        data["ncco"] = [sdk_action(a) for a in data["ncco"]]
    return CreateCallRequest.model_validate(data)


_SDK_ACTIONS: dict[str, Any] = {
    "talk": Talk,
    "stream": Stream,
    "record": Record,
    "connect": Connect,
    "conversation": Conversation,
}


def sdk_action(action: dict[str, Any]) -> Any:
    """Vonage's SDK model of one NCCO action (``from`` -> ``from_`` as above)."""
    model = _SDK_ACTIONS[action["action"]]
    fields = {("from_" if k == "from" else k): v for k, v in action.items() if k != "action"}
    return model.model_validate(fields)


def sdk_ncco(ncco: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check an NCCO with the reference schema and the SDK's models; return it."""
    check_ncco(ncco)
    for action in ncco:
        if action["action"] in _SDK_ACTIONS:
            sdk_action(action)
    return ncco


def transferred_ncco(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The NCCO of a modify call transfer body, checked."""
    assert body["action"] == "transfer"
    assert body["destination"]["type"] == "ncco"
    assert set(body["destination"]) == {"type", "ncco"}
    return sdk_ncco(body["destination"]["ncco"])


async def placed_call(harness: CallHarness, **place: Any) -> CallResult:
    return await harness.call(place=PlaceCall(**place))


async def live_call(harness: CallHarness) -> str:
    """A placed call, answered (its events consumed)."""
    result = await placed_call(harness, to=CUSTOMER, say="Hello.")
    await harness.events_until("call.answered.voice.vonage")
    return result.call_id


# -- place ---------------------------------------------------------------------------------


async def test_connector_implements_call_control(calls: CallHarness) -> None:
    assert isinstance(calls.connector, CallControl)
    assert list(MANIFEST.call_actions) == ["place", "transfer", "enqueue", "speak", "hang_up"]


async def test_place_say_posts_the_documented_create_call(calls: CallHarness) -> None:
    result = await placed_call(
        calls,
        to="+44 7700 900123",
        say="Your order has shipped.",
        language="en-GB",
        voice="2",
        ring_timeout_seconds=25,
    )
    (request,) = calls.fake.voice_requests
    assert (request.method, request.path) == ("POST", "/v1/calls")
    assert request.body == {
        "to": [{"type": "phone", "number": "447700900123"}],
        "from": {"type": "phone", "number": "14155550100"},
        "event_url": [calls.route("event")],
        "event_method": "POST",
        "ncco": [
            {
                "action": "talk",
                "text": "Your order has shipped.",
                "loop": 1,
                "bargeIn": False,
                "language": "en-GB",
                "style": 2,
            }
        ],
        "ringing_timer": 25,
    }
    sdk_create_call(request.body)
    created = next(iter(calls.fake.voice_calls.values()))
    assert result == CallResult(
        call_id=created.uuid,
        account="main",
        provider_status="started",
        attributes={
            "vonage.conversation_uuid": created.conversation_uuid,
            "vonage.direction": "outbound",
        },
    )


async def test_application_jwt_matches_vonage_jwt_client(calls: CallHarness, key: RsaKey) -> None:
    await placed_call(calls, to=CUSTOMER, play_url="https://cdn.example.com/notice.mp3")
    (request,) = calls.fake.voice_requests
    scheme, _, token = request.authorization.partition(" ")
    assert scheme == "Bearer"
    ours = jwt.decode(token, key.public, algorithms=["RS256"])
    sdk_token = JwtClient(APPLICATION_ID, key.private).generate_application_jwt().decode()
    theirs = jwt.decode(sdk_token, key.public, algorithms=["RS256"])
    # The same claims as Vonage's own client, with the same lifetime and header.
    assert set(ours) == set(theirs) == {"application_id", "iat", "jti", "exp"}
    assert ours["application_id"] == theirs["application_id"] == APPLICATION_ID
    assert ours["exp"] - ours["iat"] == theirs["exp"] - theirs["iat"]
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert ours["jti"] != theirs["jti"]
    # The fake accepts a token of Vonage's client too: its verifier is not ours.
    assert calls.fake._application_jwt(f"Bearer {sdk_token}")
    assert not calls.fake._application_jwt("Bearer " + sdk_token[:-4] + "AAAA")
    assert request.body["ncco"] == [
        {
            "action": "stream",
            "streamUrl": ["https://cdn.example.com/notice.mp3"],
            "loop": 1,
            "bargeIn": False,
        }
    ]


async def test_place_flow_runs_the_flow_from_the_answer_route(calls: CallHarness) -> None:
    result = await placed_call(
        calls, to="sip:alice@pbx.example.com", **{"from": "+1 415 555 0177"}, flow="support"
    )
    (request,) = calls.fake.voice_requests
    body = request.body
    sdk_create_call(body)
    assert "ncco" not in body
    assert body["to"] == [{"type": "sip", "uri": "sip:alice@pbx.example.com"}]
    assert body["from"] == {"type": "phone", "number": "14155550177"}
    assert body["answer_method"] == "GET"
    answer = urlsplit(body["answer_url"][0])
    assert answer.path == "/webhooks/voice/vonage/main/answer"
    assert parse_qs(answer.query) == {"placed": ["1"], "flow": ["support"]}
    # The fake fetched the NCCO (a signed GET) once the callee answered.
    await calls.events_until("call.answered.voice.vonage")
    call = calls.fake.voice_calls[result.call_id]
    assert ("answer_url", 200) in call.events_sent
    ncco = sdk_ncco(call.nccos[-1])
    assert [a["action"] for a in ncco] == ["talk", "stream", "talk", "input"]
    gather = urlsplit(ncco[-1]["eventUrl"][0])
    assert parse_qs(gather.query) == {
        "flow": ["support"],
        "step": ["welcome"],
        "call": [result.call_id],
        "out": ["1"],
    }


async def test_place_with_record_records_the_whole_call(calls: CallHarness) -> None:
    result = await placed_call(calls, to=CUSTOMER, say="This call is recorded.", record=True)
    body = calls.fake.voice_requests[0].body
    sdk_create_call(body)
    query = parse_qs(urlsplit(body["answer_url"][0]).query)
    assert query == {"placed": ["1"], "record": ["1"], "say": ["This call is recorded."]}
    await calls.events_until("call.answered.voice.vonage")
    ncco = sdk_ncco(calls.fake.voice_calls[result.call_id].nccos[-1])
    assert [a["action"] for a in ncco] == ["record", "talk"]
    # No end condition: the recording runs on under the talk until the call ends.
    assert not {"endOnSilence", "endOnKey", "timeOut"} & set(ncco[0])
    assert parse_qs(urlsplit(ncco[0]["eventUrl"][0]).query) == {
        "call": [result.call_id],
        "out": ["1"],
    }
    assert await calls.fake.play_recording(result.call_id) == 204
    event, key = (await calls.drain())[0]
    assert key == "call.recording.voice.vonage"
    assert event.call.call_id == result.call_id
    assert event.call.direction == Direction.DIRECTION_OUTBOUND
    assert event.call.recording.content_type == "audio/mpeg"
    assert event.call.flow_step == ""


async def test_placed_call_lifecycle_end_to_end(calls: CallHarness) -> None:
    """Place -> signed event webhooks -> call.initiated .. call.completed CallEvents."""
    result = await placed_call(calls, to=CUSTOMER, flow="support")
    published = await calls.events_until("call.answered.voice.vonage")
    assert [key for _, key in published] == [
        "call.initiated.voice.vonage",
        "call.ringing.voice.vonage",
        "call.answered.voice.vonage",
    ]
    await calls.call(hang_up=HangUpCall(call_id=result.call_id))
    completed, key = await calls.next_event()
    assert key == "call.completed.voice.vonage"
    events = [e for e, _ in published] + [completed]
    for event in events:
        assert event.call.call_id == result.call_id
        assert event.call.direction == Direction.DIRECTION_OUTBOUND
        assert event.call.to == CUSTOMER
        assert getattr(event.call, "from") == OUR_NUMBER
    assert completed.call.duration.seconds == 12
    assert lifecycle.fold(events) == CallState.CALL_STATE_COMPLETED
    # Every webhook the fake delivered was accepted (signature verified).
    statuses = dict(calls.fake.voice_calls[result.call_id].events_sent)
    assert statuses == {
        "started": 204,
        "ringing": 204,
        "answer_url": 200,
        "answered": 204,
        "completed": 204,
    }
    # The answer route's call.answered and the event webhook's are one event.
    assert await calls.drain() == []


# -- live call control ----------------------------------------------------------------------


async def test_transfer_connects_the_call(calls: CallHarness) -> None:
    call_id = await live_call(calls)
    result = await calls.call(transfer=TransferCall(call_id=call_id, to="+44 7700 900999"))
    assert result == CallResult(call_id=call_id, account="main")
    request = calls.fake.voice_requests[-1]
    assert (request.method, request.path) == ("PUT", f"/v1/calls/{call_id}")
    assert transferred_ncco(request.body) == [
        {
            "action": "connect",
            "endpoint": [{"type": "phone", "number": "447700900999"}],
            "from": "14155550100",
        }
    ]
    await calls.call(
        transfer=TransferCall(
            call_id=call_id, to="sip:desk@pbx.example.com", caller_id="+14155550177"
        )
    )
    assert transferred_ncco(calls.fake.voice_requests[-1].body) == [
        {
            "action": "connect",
            "endpoint": [{"type": "sip", "uri": "sip:desk@pbx.example.com"}],
            "from": "14155550177",
        }
    ]
    assert calls.fake.voice_calls[call_id].nccos[-1][0]["endpoint"][0]["type"] == "sip"


async def test_enqueue_holds_the_call_in_a_named_conversation(calls: CallHarness) -> None:
    call_id = await live_call(calls)
    await calls.call(enqueue=EnqueueCall(call_id=call_id, queue="agents"))
    # The hold music of the flow step that enqueues into the same queue.
    assert transferred_ncco(calls.fake.voice_requests[-1].body) == [
        {
            "action": "conversation",
            "name": "agents",
            "startOnEnter": False,
            "musicOnHoldUrl": ["https://cdn.example.com/hold.mp3"],
        }
    ]
    await calls.call(enqueue=EnqueueCall(call_id=call_id, queue="billing"))
    assert transferred_ncco(calls.fake.voice_requests[-1].body) == [
        {"action": "conversation", "name": "billing", "startOnEnter": False}
    ]


async def test_speak_then_continues_with_a_flow_step(calls: CallHarness) -> None:
    call_id = await live_call(calls)
    await calls.call(
        speak=SpeakToCall(
            call_id=call_id, say="An agent will call you back.", then_step="support/voicemail"
        )
    )
    ncco = transferred_ncco(calls.fake.voice_requests[-1].body)
    assert [a["action"] for a in ncco] == ["talk", "talk", "record", "talk", "talk"]
    assert ncco[0]["text"] == "An agent will call you back."
    record = parse_qs(urlsplit(ncco[2]["eventUrl"][0]).query)
    assert record == {"flow": ["support"], "step": ["voicemail"], "call": [call_id]}
    # Without then_step the NCCO ends after the prompt: Vonage hangs up.
    await calls.call(speak=SpeakToCall(call_id=call_id, play_url="https://cdn.example.com/bye.mp3"))
    assert transferred_ncco(calls.fake.voice_requests[-1].body) == [
        {
            "action": "stream",
            "streamUrl": ["https://cdn.example.com/bye.mp3"],
            "loop": 1,
            "bargeIn": False,
        }
    ]


async def test_hang_up_ends_the_call(calls: CallHarness) -> None:
    call_id = await live_call(calls)
    result = await calls.call(hang_up=HangUpCall(call_id=call_id))
    assert result.call_id == call_id
    request = calls.fake.voice_requests[-1]
    assert (request.method, request.path, request.body) == (
        "PUT",
        f"/v1/calls/{call_id}",
        {"action": "hangup"},
    )
    event, key = await calls.next_event()
    assert key == "call.completed.voice.vonage"
    assert event.call.call_id == call_id
