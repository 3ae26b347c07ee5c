"""voice.twilio over real HTTP: call flows answered as TwiML, call events published."""

from __future__ import annotations

import asyncio
import random
from urllib.parse import parse_qs, urlsplit

from connectors.voice import lifecycle
from gateway.api.v1.call_pb2 import CallState
from gateway.api.v1.content_pb2 import MediaKind
from gateway.api.v1.message_pb2 import Direction
from gateway.runtime.memory_bus import InMemoryBus
from tests.connectors.voice.conftest import (
    ACCOUNT_SID,
    CALLER,
    OUR_NUMBER,
    Harness,
    call_params,
    call_sid,
)
from tests.connectors.voice.schemas import check_twiml

RECORDING_URL = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Recordings/RE" + "1" * 32


async def test_service_for_voice_hosts_voice_twilio(harness: Harness) -> None:
    assert harness.service.names == ["voice.twilio"]


async def test_incoming_call_is_answered_with_the_numbers_flow(harness: Harness) -> None:
    sid = call_sid()
    status, content_type, body = await harness.call(harness.url("incoming"), call_params(sid))
    assert status == 200
    assert content_type == "text/xml"
    root = check_twiml(body.encode())
    assert [c.tag for c in root] == ["Say", "Play", "Gather"]
    gather = root[2]
    action = urlsplit(gather.attrib["action"])
    assert action.path == "/webhooks/voice/twilio/main/gather"
    assert parse_qs(action.query) == {"flow": ["support"], "step": ["welcome"]}
    event, key = await harness.next_event()
    assert key == "call.ringing.voice.twilio"
    assert event.type == "call.ringing"
    assert event.channel == "voice"
    assert event.call.call_id == sid
    assert getattr(event.call, "from") == CALLER
    assert event.call.to == OUR_NUMBER
    assert event.call.direction == Direction.DIRECTION_INBOUND
    assert event.call.state == CallState.CALL_STATE_RINGING
    assert event.call.flow_step == "support/welcome"
    assert event.correlation_id == sid


async def test_gather_routes_the_menu_and_publishes_the_input(harness: Harness) -> None:
    sid = call_sid()
    url = harness.url("gather", flow="support", step="welcome")
    status, _, body = await harness.call(
        url,
        call_params(sid, "in-progress", Digits="2"),
        headers={"I-Twilio-Idempotency-Token": "t1"},
    )
    assert status == 200
    assert [c.tag for c in check_twiml(body.encode())] == ["Say", "Record"]
    event, key = await harness.next_event()
    assert key == "call.input.voice.twilio"
    assert event.call.dtmf == "2"
    assert event.call.state == CallState.CALL_STATE_ANSWERED
    assert event.call.flow_step == "support/welcome"
    assert event.attributes["voice.next_step"] == "voicemail"
    # Speech routes too ("Sales." -> the forward step).
    status, _, body = await harness.call(
        url,
        call_params(sid, "in-progress", SpeechResult="Sales.", Confidence="0.91"),
        headers={"I-Twilio-Idempotency-Token": "t2"},
    )
    assert [c.tag for c in check_twiml(body.encode())] == ["Dial"]
    event, _ = await harness.next_event()
    assert event.call.speech == "Sales."
    assert event.attributes["voice.speech_confidence"] == "0.91"
    # A retry of the first request (same idempotency token) publishes nothing new.
    await harness.call(
        url,
        call_params(sid, "in-progress", Digits="2"),
        headers={"I-Twilio-Idempotency-Token": "t1"},
    )
    assert await harness.drain() == []


async def test_no_input_goes_to_the_default_step(harness: Harness) -> None:
    url = harness.url("gather", flow="support", step="welcome")
    status, _, body = await harness.call(url, call_params(call_sid(), "in-progress"))
    assert status == 200
    assert [c.tag for c in check_twiml(body.encode())] == ["Say", "Hangup"]


async def test_voicemail_is_a_recording_event_and_a_message(harness: Harness) -> None:
    sid = call_sid()
    params = call_params(
        sid,
        "in-progress",
        RecordingUrl=RECORDING_URL,
        RecordingSid="RE" + "1" * 32,
        RecordingDuration="14",
        Digits="#",
    )
    status, _, body = await harness.call(
        harness.url("record", flow="support", step="voicemail"), params
    )
    assert status == 200
    # 'then: thanks' -> Say + Redirect to goodbye.
    root = check_twiml(body.encode())
    assert [c.tag for c in root] == ["Say", "Redirect"]
    assert "step=goodbye" in (root[1].text or "")
    published = {key: event for event, key in await harness.drain()}
    recording = published["call.recording.voice.twilio"]
    assert recording.call.recording.url == RECORDING_URL
    assert recording.call.recording.content_type == "audio/x-wav"
    assert recording.attributes["voice.recording_duration_seconds"] == "14"
    voicemail = published["message.received.voice.twilio"]
    assert voicemail.message.media.kind == MediaKind.MEDIA_KIND_AUDIO
    assert [a.url for a in voicemail.message.attachments] == [RECORDING_URL]
    assert voicemail.message.sender.address == CALLER
    assert voicemail.attributes["voice.call_id"] == sid


async def test_recording_status_and_transcription_callbacks(harness: Harness) -> None:
    sid, rec = call_sid(), "RE" + "2" * 32
    status, _, _ = await harness.call(
        harness.url("recording", flow="support", step="voicemail"),
        {
            "AccountSid": ACCOUNT_SID,
            "CallSid": sid,
            "RecordingSid": rec,
            "RecordingUrl": RECORDING_URL,
            "RecordingStatus": "completed",
            "RecordingDuration": "9",
            "RecordingChannels": "1",
            "RecordingSource": "RecordVerb",
        },
    )
    assert status == 204
    event, key = await harness.next_event()
    assert key == "call.recording.voice.twilio"
    assert event.call.recording.url == RECORDING_URL
    assert event.call.flow_step == "support/voicemail"
    assert event.attributes["voice.recording_source"] == "RecordVerb"
    status, _, _ = await harness.call(
        harness.url("transcription", flow="support", step="voicemail"),
        call_params(
            sid,
            "completed",
            TranscriptionSid="TR" + "3" * 32,
            TranscriptionText="Please call me back",
            TranscriptionStatus="completed",
            TranscriptionUrl="https://api.twilio.com/t",
            RecordingSid=rec,
            RecordingUrl=RECORDING_URL,
        ),
    )
    assert status == 204
    event, key = await harness.next_event()
    assert key == "call.transcription.voice.twilio"
    assert event.call.transcription == "Please call me back"


async def test_redirect_and_hold_routes(harness: Harness) -> None:
    _, _, body = await harness.call(
        harness.url("step", flow="support", step="goodbye"), call_params(call_sid(), "in-progress")
    )
    assert [c.tag for c in check_twiml(body.encode())] == ["Say", "Hangup"]
    _, _, body = await harness.call(
        harness.url("hold", flow="support", step="agents"), call_params(call_sid(), "queued")
    )
    assert [c.tag for c in check_twiml(body.encode())] == ["Play"]
    status, _, _ = await harness.call(
        harness.url("step", flow="support", step="nope"), call_params(call_sid(), "in-progress")
    )
    assert status == 400


async def test_lifecycle_with_shuffled_and_duplicated_callbacks(harness: Harness) -> None:
    sid = call_sid()
    callbacks = [
        call_params(sid, "initiated", SequenceNumber="0", CallbackSource="call-progress-events"),
        call_params(sid, "ringing", SequenceNumber="1"),
        call_params(sid, "in-progress", SequenceNumber="2"),
        call_params(sid, "completed", SequenceNumber="3", CallDuration="42"),
    ]
    replay = callbacks * 3
    random.Random(6).shuffle(replay)
    results = await asyncio.gather(*(harness.call(harness.url("status"), p) for p in replay))
    assert {status for status, _, _ in results} == {204}
    published = await harness.drain()
    # Each state once, whatever the order and repeats.
    assert sorted(key for _, key in published) == sorted(
        f"call.{s}.voice.twilio" for s in ("initiated", "ringing", "answered", "completed")
    )
    events = [event for event, _ in published]
    assert lifecycle.fold(events) == CallState.CALL_STATE_COMPLETED
    assert lifecycle.fold(reversed(events)) == CallState.CALL_STATE_COMPLETED
    completed = next(e for e in events if e.call.state == CallState.CALL_STATE_COMPLETED)
    assert completed.call.duration.seconds == 42
    assert completed.sequence == 3


async def test_busy_call_stays_busy() -> None:
    state = CallState.CALL_STATE_UNSPECIFIED
    for new in (
        CallState.CALL_STATE_BUSY,
        CallState.CALL_STATE_RINGING,
        CallState.CALL_STATE_INITIATED,
        CallState.CALL_STATE_COMPLETED,
    ):
        state = lifecycle.advance(state, new)
    assert state == CallState.CALL_STATE_BUSY


async def test_broker_outage_still_answers_and_publishes_later(harness: Harness) -> None:
    assert isinstance(harness.bus, InMemoryBus)
    harness.bus.available = False
    sid = call_sid()
    status, _, body = await harness.call(harness.url("incoming"), call_params(sid))
    assert status == 200
    assert [c.tag for c in check_twiml(body.encode())] == ["Say", "Play", "Gather"]
    # A status callback is not acknowledged until its event is confirmed.
    status, _, _ = await harness.call(harness.url("status"), call_params(sid, "in-progress"))
    assert status == 503
    harness.bus.available = True
    event, key = await harness.next_event(timeout=5.0)
    assert key == "call.ringing.voice.twilio"
    assert event.call.call_id == sid


async def test_unknown_status_is_a_bad_request(harness: Harness) -> None:
    status, _, _ = await harness.call(harness.url("status"), call_params(call_sid(), "exploded"))
    assert status == 400
    assert await harness.drain() == []


async def test_withheld_caller_timestamp_and_malformed_duration(harness: Harness) -> None:
    sid = call_sid()
    params = call_params(
        sid, "completed", CallDuration="5", Timestamp="Mon, 23 Nov 2026 12:00:00 +0000"
    )
    params.update(From="Anonymous", Caller="Anonymous")
    status, _, _ = await harness.call(harness.url("status"), params)
    assert status == 204
    event, _ = await harness.next_event()
    assert getattr(event.call, "from") == "Anonymous"
    assert event.occurred_at.ToJsonString() == "2026-11-23T12:00:00Z"
    bad = call_params(call_sid(), "completed", CallDuration="five")
    status, _, body = await harness.call(harness.url("status"), bad)
    assert status == 400
    assert "CallDuration" in body
    assert await harness.drain() == []
