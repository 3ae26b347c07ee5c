"""voice.twilio call commands against the fake Twilio Calls API over real HTTP.

First ``TwilioVoiceConnector.call`` alone: each action's request exactly as
Twilio receives it (form parameters, and the TwiML parsed, checked against the
documented verbs and compared with what Twilio's own helper library builds),
then which error type each provider answer becomes. The end-to-end tests run
the connector in a service: a placed call's status callbacks, signed by the
fake with the account's auth token, come back through the real webhook routes
as ``call.<state>`` events.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web
from pydantic import SecretStr
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]
from twilio.twiml.voice_response import Dial, VoiceResponse  # type: ignore[import-untyped]

from connectors.voice.twilio import MANIFEST, TwilioVoiceConnector, TwilioVoiceSettings
from connectors.voice.twilio.connector import STATUS_EVENTS
from gateway.api.v1.call_pb2 import (
    CallCommand,
    CallCommandOutcome,
    CallState,
    EnqueueCall,
    HangUpCall,
    PlaceCall,
    SpeakToCall,
    TransferCall,
)
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Direction
from gateway.contract import (
    AmbiguousSendError,
    CallControl,
    PermanentError,
    TransientError,
)
from gateway.runtime.codec import encode_call_command
from gateway.runtime.telemetry import get_logger
from gateway.runtime.topology import COMMANDS_EXCHANGE
from gateway.testing.fake_twilio import FakeTwilio
from tests.connectors.voice.conftest import (
    ACCOUNT_SID,
    OUR_NUMBER,
    TOKEN_ENV,
    Harness,
    start_harness,
    stop_harness,
)
from tests.connectors.voice.schemas import check_twiml
from tests.connectors.voice.test_flow import FLOWS_YAML

TOKEN = "f0" * 16
HOOKS = "https://hooks.example.com/webhooks/voice/twilio"
CALLEE = "+447700900123"
AGENT = "+447700900456"
SIP_DESK = "sip:desk-7@pbx.example.com"


@dataclass
class Context:
    """The runtime's ConnectorContext, reduced to what ``call`` needs."""

    http: aiohttp.ClientSession
    log: Any = field(default_factory=lambda: get_logger("test.voice.twilio"))

    def webhook_url(self, route: str, **path_params: str) -> str:
        return f"{HOOKS}/{path_params['account']}/{route}"

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def publish(self, events: Sequence[Event]) -> None:
        raise AssertionError("call commands publish nothing themselves")

    async def quarantine(self, event: Event) -> None:
        raise AssertionError("call commands quarantine nothing")


def settings(api_base_url: str, **extra: Any) -> TwilioVoiceSettings:
    return TwilioVoiceSettings.model_validate(
        {
            "accounts": {
                "main": {
                    "account_sid": ACCOUNT_SID,
                    "auth_token": SecretStr(TOKEN),
                    "caller_number": "+1 415 555 0100",
                },
                "bare": {"account_sid": "AC" + "d4" * 16, "auth_token": SecretStr(TOKEN)},
            },
            "call_flows": yaml.safe_load(FLOWS_YAML),
            "api_base_url": api_base_url,
            **extra,
        }
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    # No call progress: calls stay queued (live) and no callback leaves the fake.
    async with FakeTwilio(auth_token=TOKEN, call_progress=()) as server:
        yield server


@pytest.fixture
async def connector(fake: FakeTwilio) -> AsyncIterator[TwilioVoiceConnector]:
    timeout = aiohttp.ClientTimeout(total=0.5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        twilio = TwilioVoiceConnector.create(Context(http=session), settings(fake.url))
        await twilio.start()
        yield twilio
        await twilio.stop()


def command(account: str = "", **action: Any) -> CallCommand:
    """A call command with one action, e.g. ``command(hang_up=HangUpCall(...))``."""
    return CallCommand(
        command_id=str(uuid.uuid4()), channel="voice", provider="twilio", account=account, **action
    )


def place(**fields: Any) -> CallCommand:
    sender = fields.pop("sender", "")
    call = PlaceCall(to=fields.pop("to", CALLEE), **fields)
    setattr(call, "from", sender)  # 'from' is a Python keyword
    return command(place=call)


def twiml_of(form_twiml: str) -> ET.Element:
    """A Twiml parameter parsed and checked against the documented verbs."""
    return check_twiml(form_twiml.encode())


def canonical(element: ET.Element) -> tuple[Any, ...]:
    return (
        element.tag,
        sorted(element.attrib.items()),
        (element.text or "").strip(),
        [canonical(child) for child in element],
    )


def same_as_sdk(form_twiml: str, response: VoiceResponse) -> bool:
    """Our TwiML equals what Twilio's helper library builds (parsed trees)."""
    ours = canonical(twiml_of(form_twiml))
    return ours == canonical(ET.fromstring(str(response).encode()))


async def live_call(connector: TwilioVoiceConnector, fake: FakeTwilio) -> str:
    """Place a call through the fake and have the callee answer it."""
    result = await connector.call(place(flow="support"))
    fake.placed[result.call_id].status = "in-progress"
    fake.call_requests.clear()
    return result.call_id


# -- what Twilio receives ------------------------------------------------------------------


def test_connector_implements_call_control_and_lists_its_actions() -> None:
    assert issubclass(TwilioVoiceConnector, CallControl)
    assert list(MANIFEST.call_actions) == ["place", "transfer", "enqueue", "speak", "hang_up"]


async def test_place_with_a_flow_points_twilio_at_the_flows_start_step(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    result = await connector.call(place(flow="support", ring_timeout_seconds=25, record=True))
    (request,) = fake.call_requests
    assert request.account_sid == ACCOUNT_SID
    assert request.call_sid == ""
    expected_auth = base64.b64encode(f"{ACCOUNT_SID}:{TOKEN}".encode()).decode()
    assert request.authorization == f"Basic {expected_auth}"
    form = request.form
    assert form["To"] == CALLEE
    assert form["From"] == OUR_NUMBER  # the account's caller_number, as E.164
    url = urlsplit(form["Url"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == f"{HOOKS}/main/step"
    assert parse_qs(url.query) == {"flow": ["support"], "step": ["welcome"]}
    assert form["Method"] == "POST"
    assert "Twiml" not in form
    assert form["StatusCallback"] == f"{HOOKS}/main/status"
    assert form["StatusCallbackMethod"] == "POST"
    # One parameter per event, as Twilio documents a list parameter.
    assert form.getall("StatusCallbackEvent") == ["initiated", "ringing", "answered", "completed"]
    assert form["Timeout"] == "25"
    assert form["Record"] == "true"
    assert form["RecordingStatusCallback"] == f"{HOOKS}/main/recording"
    assert form["RecordingStatusCallbackMethod"] == "POST"
    call = fake.placed[result.call_id]
    assert result.call_id.startswith("CA")
    assert len(result.call_id) == 34
    assert result.account == "main"
    assert result.provider_status == "queued"
    assert (call.to, call.sender) == (CALLEE, OUR_NUMBER)


async def test_place_with_say_hands_twilio_the_twiml_and_hangs_up(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    text = "Your table at Acme is ready."
    await connector.call(
        place(say=text, language="en-GB", voice="Polly.Amy", sender="+1 415 555 0199")
    )
    (request,) = fake.call_requests
    form = request.form
    assert form["From"] == "+14155550199"  # the command's, not the default
    assert not {"Url", "Timeout", "Record", "RecordingStatusCallback"} & set(form)
    expected = VoiceResponse()
    expected.say(text, voice="Polly.Amy", language="en-GB", loop=1)
    expected.hangup()
    assert same_as_sdk(form["Twiml"], expected)


async def test_place_with_play_url_to_a_sip_endpoint(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    await connector.call(place(to=SIP_DESK, play_url="https://cdn.example.com/notice.mp3"))
    form = fake.call_requests[0].form
    assert form["To"] == SIP_DESK
    expected = VoiceResponse()
    expected.play("https://cdn.example.com/notice.mp3", loop=1)
    expected.hangup()
    assert same_as_sdk(form["Twiml"], expected)


async def test_transfer_dials_the_number_with_the_caller_id(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    sid = await live_call(connector, fake)
    result = await connector.call(
        command(transfer=TransferCall(call_id=sid, to="+44 7700 900456", caller_id=OUR_NUMBER))
    )
    (request,) = fake.call_requests
    assert request.call_sid == sid
    assert list(request.form) == ["Twiml"]
    dial = Dial(caller_id=OUR_NUMBER, timeout=30)
    dial.number(AGENT)
    expected = VoiceResponse()
    expected.append(dial)
    assert same_as_sdk(request.form["Twiml"], expected)
    assert (result.call_id, result.provider_status) == (sid, "in-progress")
    assert fake.placed[sid].documents == [request.form["Twiml"]]


async def test_transfer_to_sip_keeps_the_calls_caller_id(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    sid = await live_call(connector, fake)
    await connector.call(command(transfer=TransferCall(call_id=sid, to=SIP_DESK)))
    dial = Dial(timeout=30)
    dial.sip(SIP_DESK)
    expected = VoiceResponse()
    expected.append(dial)
    assert same_as_sdk(fake.call_requests[0].form["Twiml"], expected)


async def test_enqueue_uses_the_queues_hold_route_from_the_flows(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    sid = await live_call(connector, fake)
    await connector.call(command(enqueue=EnqueueCall(call_id=sid, queue="agents")))
    root = twiml_of(fake.call_requests[0].form["Twiml"])
    (enqueue,) = root
    assert (enqueue.tag, enqueue.text) == ("Enqueue", "agents")
    wait = urlsplit(enqueue.attrib["waitUrl"])
    assert f"{wait.scheme}://{wait.netloc}{wait.path}" == f"{HOOKS}/main/hold"
    # The flow step that queues callers into "agents" with hold music.
    assert parse_qs(wait.query) == {"flow": ["support"], "step": ["agents"]}
    assert enqueue.attrib["waitUrlMethod"] == "POST"


async def test_enqueue_into_a_queue_without_hold_music_leaves_twilios_default(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    sid = await live_call(connector, fake)
    await connector.call(command(enqueue=EnqueueCall(call_id=sid, queue="billing")))
    expected = VoiceResponse()
    expected.enqueue("billing")
    assert same_as_sdk(fake.call_requests[0].form["Twiml"], expected)


async def test_speak_then_continues_the_flow_step(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    sid = await live_call(connector, fake)
    await connector.call(
        command(
            speak=SpeakToCall(
                call_id=sid, say="One moment please.", voice="alice", then_step="support/goodbye"
            )
        )
    )
    root = twiml_of(fake.call_requests[0].form["Twiml"])
    assert [verb.tag for verb in root] == ["Say", "Redirect"]
    assert root[0].attrib == {"loop": "1", "voice": "alice"}
    redirect = urlsplit(root[1].text or "")
    assert f"{redirect.scheme}://{redirect.netloc}{redirect.path}" == f"{HOOKS}/main/step"
    assert parse_qs(redirect.query) == {"flow": ["support"], "step": ["goodbye"]}
    assert root[1].attrib == {"method": "POST"}


async def test_speak_without_a_next_step_plays_and_hangs_up(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    sid = await live_call(connector, fake)
    await connector.call(
        command(speak=SpeakToCall(call_id=sid, play_url="https://cdn.example.com/bye.mp3"))
    )
    expected = VoiceResponse()
    expected.play("https://cdn.example.com/bye.mp3", loop=1)
    expected.hangup()
    assert same_as_sdk(fake.call_requests[0].form["Twiml"], expected)


async def test_hang_up_completes_the_call(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    sid = await live_call(connector, fake)
    result = await connector.call(command(hang_up=HangUpCall(call_id=sid)))
    (request,) = fake.call_requests
    assert list(request.form.items()) == [("Status", "completed")]
    assert (result.call_id, result.provider_status) == (sid, "completed")
    assert fake.placed[sid].status == "completed"


async def test_commands_act_with_the_named_or_default_account(fake: FakeTwilio) -> None:
    async with aiohttp.ClientSession() as session:
        twilio = TwilioVoiceConnector(
            Context(http=session), settings(fake.url, default_account="bare")
        )
        await twilio.start()
        cmd = place(flow="support", sender=OUR_NUMBER)
        assert (await twilio.call(cmd)).account == "bare"
        cmd.account = "main"
        assert (await twilio.call(cmd)).account == "main"
        await twilio.stop()
    assert [r.account_sid for r in fake.call_requests] == ["AC" + "d4" * 16, ACCOUNT_SID]


# -- commands that cannot work never reach Twilio ------------------------------------------

SID = "CA" + "0f" * 16


@pytest.mark.parametrize(
    ("cmd", "code"),
    [
        (place(to="", flow="support"), "invalid_target"),
        # National format: Twilio would guess a country; we refuse to.
        (place(to="07700 900123", flow="support"), "invalid_target"),
        (place(to="+44 12", flow="support"), "invalid_target"),
        (place(to="tel:+447700900123", flow="support"), "invalid_target"),
        (place(to="sip:", flow="support"), "invalid_target"),
        (command(transfer=TransferCall(call_id=SID, to="support desk")), "invalid_target"),
        (command(transfer=TransferCall(call_id=SID, to=AGENT, caller_id="x")), "invalid_caller_id"),
        (place(flow="support", sender="our line"), "invalid_caller_id"),
        (command(account="bare", place=PlaceCall(to=CALLEE, flow="support")), "no_caller_number"),
        (command(account="nobody", hang_up=HangUpCall(call_id=SID)), "unknown_account"),
        (place(flow="sales-campaign"), "unknown_flow"),
        (place(), "missing_script"),
        (place(say="hi", ring_timeout_seconds=601), "invalid_timeout"),
        (place(play_url="ftp://cdn.example.com/a.mp3"), "invalid_script"),
        (place(play_url="https://cdn.example.com/" + "a" * 4000), "twiml_too_long"),
        (command(speak=SpeakToCall(call_id=SID)), "missing_script"),
        (
            command(speak=SpeakToCall(call_id=SID, say="hi", then_step="support")),
            "unknown_flow_step",
        ),
        (command(enqueue=EnqueueCall(call_id=SID, queue="agents desk")), "invalid_queue"),
        (command(hang_up=HangUpCall(call_id="CA123/../../Messages")), "invalid_call_id"),
        (command(), "unsupported_action"),
    ],
    ids=[
        "empty target",
        "national number",
        "impossible number",
        "tel uri",
        "empty sip uri",
        "transfer to words",
        "transfer caller id",
        "place from",
        "no caller number",
        "unknown account",
        "unknown flow",
        "no script",
        "ring timeout",
        "play url scheme",
        "twiml too long",
        "speak nothing",
        "then step",
        "queue name",
        "call id",
        "no action",
    ],
)
async def test_invalid_commands_fail_permanently_without_calling_twilio(
    fake: FakeTwilio, connector: TwilioVoiceConnector, cmd: CallCommand, code: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        await connector.call(cmd)
    assert caught.value.code == code
    assert fake.call_requests == []


# -- provider answers -> error types -------------------------------------------------------


async def test_unknown_call_is_call_not_found(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    with pytest.raises(PermanentError) as caught:
        await connector.call(command(hang_up=HangUpCall(call_id=SID)))
    assert caught.value.code == "call_not_found"
    assert len(fake.call_requests) == 1


@pytest.mark.parametrize(
    "action",
    [
        {"hang_up": HangUpCall()},
        {"transfer": TransferCall(to=AGENT)},
        {"enqueue": EnqueueCall(queue="agents")},
        {"speak": SpeakToCall(say="Hello?")},
    ],
    ids=["hang_up", "transfer", "enqueue", "speak"],
)
async def test_a_call_that_ended_is_not_in_progress(
    fake: FakeTwilio, connector: TwilioVoiceConnector, action: dict[str, Any]
) -> None:
    sid = await live_call(connector, fake)
    fake.end_call(sid)
    ((name, message),) = action.items()
    message.call_id = sid
    with pytest.raises(PermanentError) as caught:
        await connector.call(command(**{name: message}))
    assert caught.value.code == "call_not_in_progress"
    assert "21220" in str(caught.value)


async def test_validation_error_is_permanent_with_twilios_code(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    fake.reject_next(code=21215, message="Account not authorized to call +447700900123.")
    with pytest.raises(PermanentError) as caught:
        await connector.call(place(say="hi"))
    assert caught.value.code == "21215"


@pytest.mark.parametrize("action", ["place", "hang_up"])
async def test_rate_limit_is_transient_with_retry_after(
    fake: FakeTwilio, connector: TwilioVoiceConnector, action: str
) -> None:
    cmd = place(say="hi") if action == "place" else command(hang_up=HangUpCall(call_id=SID))
    fake.rate_limit_next(retry_after=7)
    with pytest.raises(TransientError) as caught:
        await connector.call(cmd)
    assert caught.value.code == "rate_limited"
    assert caught.value.retry_after == 7.0


@pytest.mark.parametrize("status", [500, 503])
async def test_server_error_is_transient(
    fake: FakeTwilio, connector: TwilioVoiceConnector, status: int
) -> None:
    fake.server_error_next(status)
    with pytest.raises(TransientError) as caught:
        await connector.call(place(flow="support"))
    assert not isinstance(caught.value, AmbiguousSendError)
    assert caught.value.code == f"http_{status}"


async def test_timeout_after_placing_is_ambiguous(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    fake.hang_next(1.5)
    with pytest.raises(AmbiguousSendError):
        await connector.call(place(flow="support"))
    # Twilio got the request: the call may exist, so it must not be placed again.
    assert len(fake.call_requests) == 1


async def test_timeout_after_a_hang_up_is_transient(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    sid = await live_call(connector, fake)
    fake.hang_next(1.5)
    with pytest.raises(TransientError) as caught:
        await connector.call(command(hang_up=HangUpCall(call_id=sid)))
    # Ending a call again does nothing twice: retry it.
    assert not isinstance(caught.value, AmbiguousSendError)
    assert caught.value.code == "update_unconfirmed"


async def test_timeout_after_a_transfer_is_ambiguous(
    fake: FakeTwilio, connector: TwilioVoiceConnector
) -> None:
    sid = await live_call(connector, fake)
    fake.hang_next(1.5)
    with pytest.raises(AmbiguousSendError):
        await connector.call(command(transfer=TransferCall(call_id=sid, to="+14155550199")))
    # Repeating new TwiML would ring the transfer target again: never repeated.
    assert sum(1 for r in fake.call_requests if r.call_sid == sid) == 1


@pytest.mark.parametrize("action", ["place", "transfer"])
async def test_refused_connection_is_transient_not_ambiguous(
    fake: FakeTwilio, connector: TwilioVoiceConnector, action: str
) -> None:
    await fake.stop()  # nothing listens any more: the request never left
    cmd = (
        place(flow="support")
        if action == "place"
        else command(transfer=TransferCall(call_id=SID, to=AGENT))
    )
    with pytest.raises(TransientError) as caught:
        await connector.call(cmd)
    assert not isinstance(caught.value, AmbiguousSendError)
    assert caught.value.code == "connect_failed"


async def test_fake_refuses_a_create_without_the_documented_parameters(fake: FakeTwilio) -> None:
    url = f"{fake.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
    base = {"To": CALLEE, "From": OUR_NUMBER, "Url": f"{HOOKS}/main/step"}
    async with aiohttp.ClientSession() as session:
        for missing, code in (("To", 21201), ("From", 21213), ("Url", 21205)):
            form = {k: v for k, v in base.items() if k != missing}
            async with session.post(url, data=form) as resp:
                assert resp.status == 400
                assert (await resp.json())["code"] == code
        async with session.post(url, data={**base, "StatusCallbackEvent": "picked-up"}) as resp:
            assert resp.status == 400
    assert fake.placed == {}


async def test_fake_call_progress_is_signed_as_twilios_sdk_validates(fake: FakeTwilio) -> None:
    """The fake's callbacks pass Twilio's own RequestValidator (independent of our signer)."""
    received: list[tuple[str, dict[str, str], str]] = []

    async def capture(request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        received.append((str(request.url), form, request.headers["X-Twilio-Signature"]))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/status", capture)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    fake.call_progress = ("initiated", "ringing", "answered", "completed")
    try:
        form = [
            ("To", CALLEE),
            ("From", OUR_NUMBER),
            ("Twiml", "<Response><Hangup/></Response>"),
            ("StatusCallback", f"http://127.0.0.1:{port}/status?traceparent=x"),
            *(("StatusCallbackEvent", event) for event in STATUS_EVENTS),
        ]
        async with aiohttp.ClientSession() as session:
            url = f"{fake.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
            async with session.post(url, data=form) as resp:
                assert resp.status == 201
                sid = (await resp.json())["sid"]
        for _ in range(200):
            if len(received) == 4:
                break
            await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()
    assert [form["CallStatus"] for _, form, _ in received] == [
        "initiated",
        "ringing",
        "in-progress",
        "completed",
    ]
    validator = RequestValidator(TOKEN)
    for url, params, signature in received:
        assert params["CallSid"] == sid
        assert params["Direction"] == "outbound-api"
        assert validator.validate(url, params, signature)
        assert not validator.validate(url, {**params, "CallStatus": "busy"}, signature)
    assert received[-1][1]["CallDuration"].isdigit()


# -- end to end: a placed call's lifecycle comes back as CallEvents ---------------------------


@pytest.fixture
async def calling() -> AsyncIterator[tuple[Harness, FakeTwilio, TwilioVoiceConnector]]:
    """voice.twilio in a service (in-memory bus) calling through the fake over HTTP."""
    async with FakeTwilio(auth_token="", callback_delay=0.02) as server:
        harness = await start_harness(
            "memory://",
            api_base_url=server.url,
            accounts={
                "main": {
                    "account_sid": ACCOUNT_SID,
                    "auth_token": {"env": TOKEN_ENV},
                    "caller_number": OUR_NUMBER,
                }
            },
        )
        # The fake signs with the token the service reads from its environment.
        server.auth_token = harness.token
        try:
            (hosted,) = harness.service.hosted
            assert isinstance(hosted.connector, TwilioVoiceConnector)
            yield harness, server, hosted.connector
        finally:
            await stop_harness(harness)


async def call_events(harness: Harness, sid: str, count: int) -> list[tuple[Event, str]]:
    found: list[tuple[Event, str]] = []
    while len(found) < count:
        event, key = await harness.next_event()
        if event.call.call_id == sid:
            found.append((event, key))
    return found


async def test_placed_call_lifecycle_arrives_as_call_events(
    calling: tuple[Harness, FakeTwilio, TwilioVoiceConnector],
) -> None:
    harness, fake, connector = calling
    result = await connector.call(place(flow="support", record=True))
    sid = result.call_id
    events = await call_events(harness, sid, 5)
    assert [key for _, key in events] == [
        "call.initiated.voice.twilio",
        "call.ringing.voice.twilio",
        "call.answered.voice.twilio",
        "call.completed.voice.twilio",
        # The whole-call recording, reported once the call ended.
        "call.recording.voice.twilio",
    ]
    recording, _ = events.pop()
    ((recording_sid, recording_status),) = fake.placed[sid].recordings
    assert recording_status == 204
    assert recording.call.recording.provider_media_id == recording_sid
    assert recording.call.recording.url.endswith(f"/Recordings/{recording_sid}")
    states = [event.call.state for event, _ in events]
    assert states == [
        CallState.CALL_STATE_INITIATED,
        CallState.CALL_STATE_RINGING,
        CallState.CALL_STATE_ANSWERED,
        CallState.CALL_STATE_COMPLETED,
    ]
    for event, _ in events:
        assert event.call.direction == Direction.DIRECTION_OUTBOUND
        assert getattr(event.call, "from") == OUR_NUMBER
        assert event.call.to == CALLEE
        assert event.correlation_id == sid
        assert event.account == "main"
        assert event.attributes["twilio.callback_source"] == "call-progress-events"
    call = fake.placed[sid]
    # Every signed callback was accepted by the status route (204 once confirmed).
    assert call.callbacks == [
        ("initiated", 204),
        ("ringing", 204),
        ("in-progress", 204),
        ("completed", 204),
    ]
    # On answer Twilio fetched the step route and ran the flow's start step.
    (document,) = call.documents
    assert [verb.tag for verb in check_twiml(document.encode())] == ["Say", "Play", "Gather"]


async def test_hanging_up_a_live_call_reports_it_completed(
    calling: tuple[Harness, FakeTwilio, TwilioVoiceConnector],
) -> None:
    harness, fake, connector = calling
    fake.call_progress = ("initiated", "ringing", "answered")  # the callee stays on the line
    sid = (await connector.call(place(say="Your parcel is at the door."))).call_id
    await call_events(harness, sid, 3)
    result = await connector.call(command(hang_up=HangUpCall(call_id=sid)))
    assert result.provider_status == "completed"
    ((event, key),) = await call_events(harness, sid, 1)
    assert key == "call.completed.voice.twilio"
    assert event.call.duration.seconds >= 0
    # The call ended: a second hang-up is refused as not in progress, and no
    # further event is published for it.
    with pytest.raises(PermanentError) as caught:
        await connector.call(command(hang_up=HangUpCall(call_id=sid)))
    assert caught.value.code == "call_not_in_progress"
    await asyncio.sleep(0.1)
    assert [e for e, _ in await harness.drain(0.1) if e.call.call_id == sid] == []


async def until(
    harness: Harness, command_id: str, sid: str = "", call_states: int = 0
) -> tuple[Event, list[Event]]:
    """Events until a command's call.command outcome and ``call_states`` events of
    call ``sid`` arrived (the two race: callbacks are not ordered after the outcome)."""
    found: Event | None = None
    calls: list[Event] = []
    while found is None or len(calls) < call_states:
        event, key = await harness.next_event()
        if event.type == "call.command" and event.causation_id == command_id:
            assert key == "call.command.voice.twilio"
            found = event
        elif sid and event.call.call_id == sid:
            calls.append(event)
    return found, calls


async def test_call_commands_through_the_runtime_worker(
    calling: tuple[Harness, FakeTwilio, TwilioVoiceConnector],
) -> None:
    harness, fake, _ = calling
    fake.call_progress = ("initiated", "ringing", "answered")
    cmd = place(flow="support")
    cmd.metadata["agent"] = "a-17"
    # As a downstream service sends it: on channels.commands, routing key call.voice.twilio.
    routing_key, message = encode_call_command(cmd)
    assert routing_key == "call.voice.twilio"
    await harness.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=1)
    placed, _ = await until(harness, cmd.command_id)
    result = placed.call_command
    assert result.outcome == CallCommandOutcome.CALL_COMMAND_OUTCOME_ACCEPTED
    assert result.action == "place"
    assert result.provider_status == "queued"
    assert placed.account == "main"
    assert placed.attributes["agent"] == "a-17"
    (sid,) = fake.placed
    assert result.call_id == sid

    # A call Twilio does not know: FAILED, permanent, Twilio asked exactly once.
    missing = command(hang_up=HangUpCall(call_id="CA" + "9e" * 16))
    routing_key, message = encode_call_command(missing)
    await harness.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=1)
    # The placed call's initiated, ringing and answered events arrive meanwhile.
    failed, lifecycle = await until(harness, missing.command_id, sid, 3)
    assert [e.call.state for e in lifecycle] == [
        CallState.CALL_STATE_INITIATED,
        CallState.CALL_STATE_RINGING,
        CallState.CALL_STATE_ANSWERED,
    ]
    assert failed.call_command.outcome == CallCommandOutcome.CALL_COMMAND_OUTCOME_FAILED
    assert failed.call_command.reason_code == "call_not_found"
    assert failed.call_command.permanent
    assert failed.call_command.call_id == "CA" + "9e" * 16
    assert [r.call_sid for r in fake.call_requests] == ["", "CA" + "9e" * 16]

    # Hanging up the placed call: ACCEPTED, and its completed event.
    hang_up = command(hang_up=HangUpCall(call_id=sid))
    routing_key, message = encode_call_command(hang_up)
    await harness.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=1)
    done, (completed,) = await until(harness, hang_up.command_id, sid, 1)
    assert done.call_command.outcome == CallCommandOutcome.CALL_COMMAND_OUTCOME_ACCEPTED
    assert (done.call_command.call_id, done.call_command.provider_status) == (sid, "completed")
    assert completed.call.state == CallState.CALL_STATE_COMPLETED
