"""voice.vonage voicemail as message.received, and call commands through the runtime.

Webhooks are signed as Vonage signs them (the fake's signer, HS256 with
``payload_hash``); call commands go through the service's call-command worker
(``connector.voice.vonage.call`` on the in-memory bus) to the fake Voice API.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest

from gateway.api.v1.call_pb2 import CallCommand, CallCommandOutcome, HangUpCall, PlaceCall
from gateway.api.v1.content_pb2 import MediaKind
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Direction
from gateway.api.v1.participant_pb2 import ParticipantRole
from gateway.runtime.codec import decode_event, encode_call_command
from gateway.runtime.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from gateway.testing.fake_vonage import signed_webhook_headers
from tests.connectors.voice.schemas import check_ncco
from tests.connectors.voice.test_vonage_calls import (
    API_KEY,
    APPLICATION_ID,
    CUSTOMER,
    OUR_NUMBER,
    CallHarness,
    RsaKey,
    running,
)


@pytest.fixture(scope="module")
def key() -> RsaKey:
    return RsaKey()


@pytest.fixture
async def calls(key: RsaKey, tmp_path: Path) -> AsyncIterator[CallHarness]:
    async with running(key, tmp_path) as harness:
        yield harness


async def signed(
    harness: CallHarness, method: str, url: str, payload: dict[str, Any] | None = None
) -> tuple[int, Any]:
    """A webhook signed as Vonage signs it; (status, JSON answer or None)."""
    body = json.dumps(payload).encode() if payload is not None else b""
    headers = signed_webhook_headers(
        body, harness.fake.signature_secret, api_key=API_KEY, application_id=APPLICATION_ID
    )
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, data=body or None, headers=headers) as resp,
    ):
        text = await resp.text()
        is_json = resp.content_type == "application/json" and text
        return resp.status, json.loads(text) if is_json else text


def record_payload(leg: str) -> dict[str, Any]:
    """A record event, as documented (it names the conversation, not the leg)."""
    recording = str(uuid.uuid4())
    return {
        "start_time": "2026-11-23T12:00:00Z",
        "recording_url": f"https://api.nexmo.com/v1/files/{recording}",
        "size": 25_344,
        "recording_uuid": recording,
        "end_time": "2026-11-23T12:00:19Z",
        "conversation_uuid": "CON-" + leg,
        "timestamp": "2026-11-23T12:00:19Z",
    }


def record_url(ncco: list[dict[str, Any]]) -> str:
    (record,) = [a for a in check_ncco(ncco) if a["action"] == "record"]
    return str(record["eventUrl"][0])


def check_voicemail(event: Event, *, leg: str, caller: str, payload: dict[str, Any]) -> None:
    message = event.message
    assert event.type == "message.received"
    assert message.direction == Direction.DIRECTION_INBOUND
    assert message.sender.address == caller
    assert message.sender.role == ParticipantRole.PARTICIPANT_ROLE_CUSTOMER
    assert [r.address for r in message.recipients] == [OUR_NUMBER]
    assert message.media.kind == MediaKind.MEDIA_KIND_AUDIO
    (audio,) = message.attachments
    assert audio.url == payload["recording_url"]
    assert audio.content_type == "audio/mpeg"
    assert audio.size_bytes == 25_344
    assert message.provider_message_id == payload["recording_uuid"]
    assert event.correlation_id == leg
    assert event.attributes["voice.call_id"] == leg
    assert event.attributes["voice.flow_step"] == "support/voicemail"
    assert event.attributes["voice.recording_duration_seconds"] == "19"


async def test_inbound_voicemail_is_a_message_with_the_audio(calls: CallHarness) -> None:
    leg = str(uuid.uuid4())
    query = {"to": OUR_NUMBER[1:], "from": CUSTOMER[1:], "uuid": leg, "conversation_uuid": "C"}
    status, _ = await signed(calls, "GET", f"{calls.route('answer')}?{urlencode(query)}")
    assert status == 200
    # The caller presses 2: the voicemail step.
    menu = f"{calls.route('gather')}?flow=support&step=welcome&call={leg}"
    status, ncco = await signed(calls, "POST", menu, {**query, "dtmf": {"digits": "2"}})
    assert status == 200
    url = record_url(ncco)
    assert parse_qs(urlsplit(url).query) == {
        "flow": ["support"],
        "step": ["voicemail"],
        "call": [leg],
        "caller": [CUSTOMER],
        "called": [OUR_NUMBER],
    }
    payload = record_payload(leg)
    status, _ = await signed(calls, "POST", url, payload)
    assert status == 204
    events = {key: event for event, key in await calls.drain()}
    assert set(events) == {
        "call.answered.voice.vonage",
        "call.input.voice.vonage",
        "call.recording.voice.vonage",
        "message.received.voice.vonage",
    }
    assert events["call.recording.voice.vonage"].call.call_id == leg
    check_voicemail(
        events["message.received.voice.vonage"], leg=leg, caller=CUSTOMER, payload=payload
    )
    # A retried record webhook gives the same event ids: nothing new is published.
    status, _ = await signed(calls, "POST", url, payload)
    assert status == 204
    assert await calls.drain() == []


async def test_voicemail_on_a_placed_call_is_from_the_callee(calls: CallHarness) -> None:
    result = await calls.call(place=PlaceCall(to=CUSTOMER, flow="support"))
    await calls.events_until("call.answered.voice.vonage")
    ncco = calls.fake.voice_calls[result.call_id].nccos[-1]
    gather = ncco[-1]["eventUrl"][0]
    # The input webhook of an outbound call: 'from' is our number, 'to' the callee.
    status, ncco = await signed(
        calls,
        "POST",
        gather,
        {
            "from": OUR_NUMBER[1:],
            "to": CUSTOMER[1:],
            "uuid": result.call_id,
            "conversation_uuid": "C",
            "dtmf": {"digits": "2"},
        },
    )
    assert status == 200
    (event, key) = await calls.next_event()
    assert key == "call.input.voice.vonage"
    assert event.call.direction == Direction.DIRECTION_OUTBOUND
    payload = record_payload(result.call_id)
    url = record_url(ncco)
    assert parse_qs(urlsplit(url).query)["out"] == ["1"]
    status, _ = await signed(calls, "POST", url, payload)
    assert status == 204
    events = {key: event for event, key in await calls.drain()}
    recording = events["call.recording.voice.vonage"].call
    assert recording.direction == Direction.DIRECTION_OUTBOUND
    check_voicemail(
        events["message.received.voice.vonage"],
        leg=result.call_id,
        caller=CUSTOMER,
        payload=payload,
    )


async def test_recording_route_refuses_half_a_flow_step(calls: CallHarness) -> None:
    url = f"{calls.route('recording')}?flow=support&call=x"
    status, reason = await signed(calls, "POST", url, record_payload("x"))
    assert status == 400
    assert "flow and step" in reason
    assert await calls.drain() == []


async def test_call_commands_through_the_runtime_worker(calls: CallHarness) -> None:
    """connector.voice.vonage.call -> Voice API -> call.command outcome events."""
    outcomes = await calls.bus.declare_temporary_queue(
        EVENTS_EXCHANGE, ["call.command.voice.vonage"]
    )
    place = CallCommand(
        command_id="cmd-place-1",
        channel="voice",
        provider="vonage",
        correlation_id="ticket-7",
        place=PlaceCall(to=CUSTOMER, say="Your order has shipped."),
    )
    routing_key, message = encode_call_command(place)
    assert routing_key == "call.voice.vonage"
    await calls.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=1)
    placed = decode_event(await calls.bus.get(outcomes, timeout=5))
    assert placed.causation_id == "cmd-place-1"
    result = placed.call_command
    assert result.outcome == CallCommandOutcome.CALL_COMMAND_OUTCOME_ACCEPTED
    assert result.action == "place"
    assert result.call_id in calls.fake.voice_calls
    assert result.provider_status == "started"
    hang_up = CallCommand(
        command_id="cmd-hangup-1",
        channel="voice",
        provider="vonage",
        hang_up=HangUpCall(call_id="no-such-call"),
    )
    await calls.bus.publish(COMMANDS_EXCHANGE, *encode_call_command(hang_up), timeout=1)
    failed = decode_event(await calls.bus.get(outcomes, timeout=5)).call_command
    assert failed.outcome == CallCommandOutcome.CALL_COMMAND_OUTCOME_FAILED
    assert failed.reason_code == "call_not_found"
    assert failed.permanent is True
    assert failed.call_id == "no-such-call"
    # One create for the placed call (no retry), one hangup attempt.
    assert [r.path for r in calls.fake.voice_requests] == [
        "/v1/calls",
        "/v1/calls/no-such-call",
    ]
