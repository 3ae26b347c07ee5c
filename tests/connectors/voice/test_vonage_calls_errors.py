"""voice.vonage call commands: Vonage's error answers and refused commands.

Each Vonage answer (scripted on the fake, or the fake's own 404/400/401) maps to the
error type the runtime retries by; commands the connector can tell are wrong never
reach Vonage.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from vonage_voice.models import CreateCallRequest, Talk  # type: ignore[import-untyped]

from connectors.sms.vonage.client import ApplicationJwt
from gateway.api.v1.call_pb2 import (
    EnqueueCall,
    HangUpCall,
    PlaceCall,
    SpeakToCall,
    TransferCall,
)
from gateway.contract import AmbiguousSendError, PermanentError, TransientError
from gateway.testing.fake_server import ScriptedAnswer
from tests.connectors.voice.test_vonage_calls import (
    APPLICATION_ID,
    CUSTOMER,
    SECRET_ENV,
    CallHarness,
    RsaKey,
    live_call,
    new_fake,
    running,
)


@pytest.fixture(scope="module")
def key() -> RsaKey:
    return RsaKey()


@pytest.fixture
async def calls(key: RsaKey, tmp_path: Path) -> AsyncIterator[CallHarness]:
    """A short provider timeout, so a hanging Vonage is a timeout."""
    async with running(key, tmp_path, provider_timeout=0.5) as harness:
        yield harness


def problem(status: int, kind: str, title: str, **extra: Any) -> ScriptedAnswer:
    return ScriptedAnswer(
        status=status,
        body={"type": kind, "title": title, **extra},
        headers={"Retry-After": "3"} if status in (429, 503) else {},
    )


PLACE = {"place": PlaceCall(to=CUSTOMER, say="Hello.")}

MATRIX = [
    pytest.param(
        problem(
            400,
            "https://developer.vonage.com/api-errors#bad-request",
            "Bad Request",
            invalid_parameters=[{"name": "to[0].number", "reason": "unreachable"}],
        ),
        PermanentError,
        "bad-request",
        "to[0].number: unreachable",
        id="400 problem document",
    ),
    pytest.param(
        problem(400, "BAD_REQUEST", "", error_title="Bad Request"),
        PermanentError,
        "bad_request",
        "Bad Request",
        id="400 older answer",
    ),
    pytest.param(
        problem(422, "https://developer.vonage.com/api-errors#unprocessable-entity", "Invalid"),
        PermanentError,
        "unprocessable-entity",
        "Invalid",
        id="422",
    ),
    pytest.param(
        problem(403, "https://developer.vonage.com/api-errors#forbidden", "Forbidden"),
        PermanentError,
        "auth",
        "Forbidden",
        id="403",
    ),
    pytest.param(
        problem(429, "https://developer.vonage.com/api-errors#throttled", "Throttled"),
        TransientError,
        "rate_limited",
        "Throttled",
        id="429",
    ),
    pytest.param(
        problem(500, "https://developer.vonage.com/api-errors#internal-error", "Internal"),
        TransientError,
        "http_500",
        "Internal",
        id="500",
    ),
    pytest.param(
        problem(503, "https://developer.vonage.com/api-errors#unavailable", "Unavailable"),
        TransientError,
        "http_503",
        "Unavailable",
        id="503",
    ),
]


@pytest.mark.parametrize(("answer", "error", "code", "text"), MATRIX)
async def test_vonage_answers_map_to_error_types(
    calls: CallHarness, answer: ScriptedAnswer, error: type[Exception], code: str, text: str
) -> None:
    calls.fake.answer_next(answer)
    with pytest.raises(error) as raised:
        await calls.call(**PLACE)
    assert getattr(raised.value, "code", None) == code
    assert text in str(raised.value)
    if answer.status in (429, 503):
        assert isinstance(raised.value, TransientError)
        assert raised.value.retry_after == 3
    assert len(calls.fake.voice_requests) == 1


async def test_unknown_call_is_call_not_found(calls: CallHarness) -> None:
    for action in (
        {"transfer": TransferCall(call_id="nope", to=CUSTOMER)},
        {"enqueue": EnqueueCall(call_id="nope", queue="agents")},
        {"speak": SpeakToCall(call_id="nope", say="Hi.")},
        {"hang_up": HangUpCall(call_id="nope")},
    ):
        with pytest.raises(PermanentError) as raised:
            await calls.call(**action)
        assert raised.value.code == "call_not_found", action
    assert [r.path for r in calls.fake.voice_requests] == ["/v1/calls/nope"] * 4


async def test_ended_call_is_a_permanent_bad_request(calls: CallHarness) -> None:
    call_id = await live_call(calls)
    await calls.call(hang_up=HangUpCall(call_id=call_id))
    with pytest.raises(PermanentError) as raised:
        await calls.call(speak=SpeakToCall(call_id=call_id, say="Still there?"))
    assert raised.value.code == "bad-request"
    assert "not in progress" in str(raised.value)


async def test_credentials_vonage_refuses_are_auth(calls: CallHarness) -> None:
    # The fake knows the application by another id: our (valid) JWT does not verify.
    calls.fake.application_id = "ffffffff-0000-4000-8000-000000000000"
    with pytest.raises(PermanentError) as raised:
        await calls.call(**PLACE)
    assert raised.value.code == "auth"
    assert calls.fake.voice_calls == {}


async def test_lost_create_answer_is_ambiguous_and_not_repeated(calls: CallHarness) -> None:
    calls.fake.answer_next(ScriptedAnswer(status=calls.fake.default_status, delay=1.5))
    with pytest.raises(AmbiguousSendError):
        await calls.call(**PLACE)
    # Vonage got the create exactly once; the connector never retries it itself.
    assert [r.path for r in calls.fake.voice_requests] == ["/v1/calls"]


async def test_lost_hangup_answer_is_transient(calls: CallHarness) -> None:
    call_id = await live_call(calls)
    calls.fake.answer_next(ScriptedAnswer(status=calls.fake.default_status, delay=1.5))
    with pytest.raises(TransientError) as raised:
        await calls.call(hang_up=HangUpCall(call_id=call_id))
    assert raised.value.code == "timeout"
    # A transfer is not idempotent (it would ring its target again): ambiguous.
    calls.fake.answer_next(ScriptedAnswer(status=calls.fake.default_status, delay=1.5))
    with pytest.raises(AmbiguousSendError):
        await calls.call(transfer=TransferCall(call_id=call_id, to=CUSTOMER))


async def test_connection_refused_is_transient(key: RsaKey, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with running(key, tmp_path, api_base_url=f"http://127.0.0.1:{port}") as harness:
        with pytest.raises(TransientError) as raised:
            await harness.call(**PLACE)
        assert raised.value.code == "connect_failed"


REFUSED = [
    pytest.param({"place": PlaceCall(to="12345", say="Hi.")}, "invalid_target", id="short"),
    pytest.param({"place": PlaceCall(to="call me", say="Hi.")}, "invalid_target", id="text"),
    pytest.param({"place": PlaceCall(to="", say="Hi.")}, "invalid_target", id="empty"),
    pytest.param({"place": PlaceCall(to="sip:", say="Hi.")}, "invalid_target", id="bad sip"),
    pytest.param(
        {"transfer": TransferCall(call_id="c", to="sip:a b@x")}, "invalid_target", id="sip space"
    ),
    pytest.param(
        {"place": PlaceCall(to=CUSTOMER, say="Hi.", **{"from": "ours"})},
        "invalid_from",
        id="from",
    ),
    pytest.param(
        {"place": PlaceCall(to=CUSTOMER, say="Hi.", ring_timeout_seconds=121)},
        "invalid_ring_timeout",
        id="ring timeout",
    ),
    pytest.param(
        {"place": PlaceCall(to=CUSTOMER, say="Hi.", voice="Kimberly")},
        "invalid_voice",
        id="voice name",
    ),
    pytest.param({"place": PlaceCall(to=CUSTOMER, say="x" * 1501)}, "invalid_say", id="long say"),
    pytest.param(
        {"place": PlaceCall(to=CUSTOMER, play_url="ftp://x/a.mp3")},
        "invalid_audio_url",
        id="play url",
    ),
    pytest.param({"place": PlaceCall(to=CUSTOMER, flow="nope")}, "unknown_flow", id="flow"),
    pytest.param({"place": PlaceCall(to=CUSTOMER)}, "invalid_command", id="no script"),
    pytest.param(
        {"speak": SpeakToCall(call_id="c", say="Hi.", then_step="support/nope")},
        "unknown_step",
        id="then_step",
    ),
    pytest.param(
        {"enqueue": EnqueueCall(call_id="c", queue="no spaces")}, "invalid_queue", id="queue"
    ),
    pytest.param({"hang_up": HangUpCall()}, "invalid_command", id="no call id"),
    pytest.param({}, "invalid_command", id="no action"),
]


@pytest.mark.parametrize(("action", "code"), REFUSED)
async def test_wrong_commands_never_reach_vonage(
    calls: CallHarness, action: dict[str, Any], code: str
) -> None:
    with pytest.raises(PermanentError) as raised:
        await calls.call(**action)
    assert raised.value.code == code
    assert calls.fake.voice_requests == []


async def test_account_without_private_key_cannot_control_calls(
    key: RsaKey, tmp_path: Path
) -> None:
    # Answers calls (signature secret) but has no key to sign Voice API calls.
    accounts = {"main": {"application_id": APPLICATION_ID, "signature_secret": {"env": SECRET_ENV}}}
    async with running(key, tmp_path, accounts=accounts) as harness:
        with pytest.raises(PermanentError) as raised:
            await harness.call(**PLACE)
        assert raised.value.code == "not_configured"
        with pytest.raises(PermanentError) as raised:
            await harness.call(account="other", **PLACE)
        assert raised.value.code == "unknown_account"


async def test_fake_voice_api_holds_to_the_documented_bodies(key: RsaKey) -> None:
    """The fake accepts what Vonage's SDK serialises and refuses undocumented bodies,
    so the connector's requests passing it means something."""
    sdk_body = CreateCallRequest(
        to=[{"type": "phone", "number": "447700900123"}],
        from_={"type": "phone", "number": "14155550100"},
        ncco=[Talk(text="Hello.")],
        event_url=["https://hooks.example.com/event"],
    ).model_dump(by_alias=True, exclude_none=True, mode="json")
    wrong = [
        {},
        {**sdk_body, "answer_url": ["https://hooks.example.com/answer"]},
        {**sdk_body, "random_from_number": True},
        {**sdk_body, "to": [{"type": "phone", "number": "+447700900123"}]},
        {**sdk_body, "ringing_timer": 121},
        {**sdk_body, "callback": "https://hooks.example.com/x"},
    ]
    async with new_fake(key) as fake, aiohttp.ClientSession() as http:
        token = ApplicationJwt(APPLICATION_ID, key.private).token()
        headers = {"Authorization": f"Bearer {token}"}

        async def post(path: str, body: Any, method: str = "POST") -> tuple[int, Any]:
            async with http.request(method, fake.url + path, json=body, headers=headers) as resp:
                return resp.status, await resp.json(content_type=None)

        status, created = await post("/v1/calls", sdk_body)
        assert status == 201
        assert set(created) == {"uuid", "status", "direction", "conversation_uuid"}
        for body in wrong:
            status, problem = await post("/v1/calls", body)
            assert status == 400, body
            assert problem["title"] == "Bad Request"
            assert problem["invalid_parameters"], body
        call = f"/v1/calls/{created['uuid']}"
        for body in (
            {"action": "explode"},
            {"action": "transfer", "destination": {"type": "ncco", "ncco": [{"action": "x"}]}},
            {"action": "hangup", "extra": 1},
        ):
            status, _ = await post(call, body, method="PUT")
            assert status == 400, body
        status, _ = await post("/v1/calls/unknown", {"action": "hangup"}, method="PUT")
        assert status == 404
        headers["Authorization"] = "Bearer " + token[:-6] + "AAAAAA"
        status, _ = await post("/v1/calls", sdk_body)
        assert status == 401
