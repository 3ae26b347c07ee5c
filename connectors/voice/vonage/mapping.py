"""Vonage Voice API webhook payloads -> gateway.api.v1 call events: pure functions.

Answer webhook (query or JSON: to, from, uuid, conversation_uuid), event
webhook (JSON: status, direction, timestamp, duration ...), input and record
events, as documented in https://developer.vonage.com/en/voice/voice-api/webhook-reference
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google.protobuf.duration_pb2 import Duration

from connectors.voice import voicemail
from connectors.voice.lifecycle import STATE_WORDS
from gateway.api.v1.call_pb2 import CallEvent, CallState
from gateway.api.v1.content_pb2 import Attachment
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.api.v1.message_pb2 import Direction
from gateway.contract import BadRequestError, inbound_event_id, normalize_phone
from gateway.contract.ids import conversation_id
from gateway.contract.times import timestamp

PROVIDER = "vonage"
CHANNEL = "voice"

C = CallState
#: Vonage call status -> canonical state. Other statuses (disconnected,
#: human/machine, transfer, record, input ...) are progress: ``call.progress``.
STATUS_MAP: Mapping[str, CallState.ValueType] = {
    "started": C.CALL_STATE_INITIATED,
    "ringing": C.CALL_STATE_RINGING,
    "answered": C.CALL_STATE_ANSWERED,
    "completed": C.CALL_STATE_COMPLETED,
    "busy": C.CALL_STATE_BUSY,
    # The callee declined: the same outcome as a busy line.
    "rejected": C.CALL_STATE_BUSY,
    "cancelled": C.CALL_STATE_CANCELED,
    "unanswered": C.CALL_STATE_NO_ANSWER,
    "timeout": C.CALL_STATE_NO_ANSWER,
    "failed": C.CALL_STATE_FAILED,
}
EVENT_TYPES = (
    *(f"call.{word}" for word in STATE_WORDS.values()),
    "call.progress",
    "call.input",
    "call.recording",
    "call.transcription",
    "message.received",
)
_ATTRIBUTES = {
    "conversation_uuid": "vonage.conversation_uuid",
    "network": "vonage.network",
    "rate": "vonage.rate",
    "price": "vonage.price",
    "detail": "vonage.detail",
    "reason": "vonage.reason",
    "sub_state": "vonage.sub_state",
    "recording_uuid": "vonage.recording_uuid",
    "transcription_url": "vonage.transcription_url",
}


def text(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise BadRequestError(f"{name} must be a string or number")


def required(body: Mapping[str, Any], name: str) -> str:
    value = text(body, name)
    if not value:
        raise BadRequestError(f"missing field {name}")
    return value


def _phone(raw: str) -> str:
    # Vonage sends E.164 digits without '+'; SIP or app endpoints stay as they are.
    if not raw.isdigit():
        return raw
    try:
        return normalize_phone(raw)
    except BadRequestError:
        return raw


def _occurred(body: Mapping[str, Any], received_at: datetime) -> datetime:
    raw = text(body, "timestamp")
    if not raw:
        return received_at
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequestError(f"malformed timestamp {raw!r}") from exc


def call_event(
    body: Mapping[str, Any],
    *,
    account: str,
    event_type: str,
    state: CallState.ValueType,
    id_parts: tuple[str, ...],
    raw: RawPayload,
    received_at: datetime,
    flow_step: str = "",
) -> Event:
    """A call event of one call leg (``uuid``)."""
    uuid = required(body, "uuid")
    caller, called = _phone(text(body, "from")), _phone(text(body, "to"))
    inbound = text(body, "direction") in ("", "inbound")
    call = CallEvent(
        call_id=uuid,
        to=called,
        direction=Direction.DIRECTION_INBOUND if inbound else Direction.DIRECTION_OUTBOUND,
        state=state,
        provider_status=text(body, "status"),
        flow_step=flow_step,
    )
    setattr(call, "from", caller)  # 'from' is a Python keyword
    duration = text(body, "duration")
    if duration:
        if not duration.isdigit():
            raise BadRequestError(f"duration is not a number of seconds: {duration!r}")
        call.duration.CopyFrom(Duration(seconds=int(duration)))
    event = Event(
        id=inbound_event_id(PROVIDER, account, event_type, uuid, *id_parts),
        type=event_type,
        channel=CHANNEL,
        provider=PROVIDER,
        account=account,
        received_at=timestamp(received_at),
        occurred_at=timestamp(_occurred(body, received_at)),
        correlation_id=text(body, "conversation_uuid") or uuid,
        raw=raw,
        call=call,
    )
    if caller and called:
        ours, theirs = (called, caller) if inbound else (caller, called)
        event.conversation_id = conversation_id(CHANNEL, ours, theirs)
    for name, key in _ATTRIBUTES.items():
        value = text(body, name)
        if value:
            event.attributes[key] = value
    return event


def status_event(
    body: Mapping[str, Any], *, account: str, raw: RawPayload, received_at: datetime
) -> Event:
    """``call.<state>`` (or ``call.progress``) of an event webhook."""
    status = required(body, "status").lower()
    state = STATUS_MAP.get(status, C.CALL_STATE_UNSPECIFIED)
    event_type = f"call.{STATE_WORDS[state]}" if state in STATE_WORDS else "call.progress"
    return call_event(
        body,
        account=account,
        event_type=event_type,
        state=state,
        id_parts=(status, text(body, "timestamp") or "-")
        if event_type == "call.progress"
        else (status,),
        raw=raw,
        received_at=received_at,
    )


def input_result(body: Mapping[str, Any]) -> tuple[str, str, str]:
    """(digits, best speech text, confidence) of an input event."""
    dtmf = body.get("dtmf") or {}
    speech = body.get("speech") or {}
    if not isinstance(dtmf, dict) or not isinstance(speech, dict):
        raise BadRequestError("dtmf and speech must be objects")
    digits = text(dtmf, "digits")
    results = speech.get("results") or []
    if not isinstance(results, list):
        raise BadRequestError("speech.results must be a list")
    best = results[0] if results and isinstance(results[0], dict) else {}
    return digits, text(best, "text"), text(best, "confidence")


def input_event(
    body: Mapping[str, Any],
    *,
    account: str,
    flow_step: str,
    raw: RawPayload,
    received_at: datetime,
) -> Event:
    """``call.input``: the digits or speech an ``input`` action collected."""
    digits, speech, confidence = input_result(body)
    event = call_event(
        body,
        account=account,
        event_type="call.input",
        state=C.CALL_STATE_ANSWERED,
        # One input event per answer: its timestamp tells repeats of the same menu apart.
        id_parts=(flow_step, text(body, "timestamp") or f"{digits}\x1f{speech}"),
        raw=raw,
        received_at=received_at,
        flow_step=flow_step,
    )
    event.call.dtmf, event.call.speech = digits, speech
    if confidence:
        event.attributes["voice.speech_confidence"] = confidence
    return event


def recording_event(
    body: Mapping[str, Any],
    *,
    account: str,
    flow_step: str,
    raw: RawPayload,
    received_at: datetime,
    call_id: str,
) -> Event:
    """``call.recording``: a record action's recording is ready.

    Record events name the conversation, not the leg: ``call_id`` is the leg
    uuid the connector put in the record eventUrl.
    """
    recording_uuid = required(body, "recording_uuid")
    event = call_event(
        {**body, "uuid": call_id},
        account=account,
        event_type="call.recording",
        state=C.CALL_STATE_ANSWERED,
        id_parts=(recording_uuid,),
        raw=raw,
        received_at=received_at,
        flow_step=flow_step,
    )
    event.call.recording.CopyFrom(recording_attachment(body))
    return event


def recording_attachment(body: Mapping[str, Any]) -> Attachment:
    """The MP3 a record event points at (the connector's record actions ask for mp3)."""
    recording_uuid = required(body, "recording_uuid")
    size = text(body, "size")
    return Attachment(
        url=required(body, "recording_url"),
        content_type="audio/mpeg",
        provider_media_id=recording_uuid,
        filename=f"{recording_uuid}.mp3",
        size_bytes=int(size) if size.isdigit() else 0,
    )


def _seconds_between(body: Mapping[str, Any]) -> int | None:
    start, end = text(body, "start_time"), text(body, "end_time")
    if not start or not end:
        return None
    try:
        began = datetime.fromisoformat(start.replace("Z", "+00:00"))
        ended = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequestError(f"malformed start_time/end_time {start!r}/{end!r}") from exc
    return max(0, round((ended - began).total_seconds()))


def voicemail_message(
    body: Mapping[str, Any],
    *,
    account: str,
    call_id: str,
    caller: str,
    called: str,
    flow_step: str,
    raw: RawPayload,
    received_at: datetime,
) -> Event:
    """``message.received``: the voicemail of a flow's record step, audio attached.

    Record events name neither the leg nor the parties: the connector put them
    in the record eventUrl (``call``, ``caller``, ``called``).
    """
    return voicemail.voicemail_message(
        provider=PROVIDER,
        account=account,
        recording_id=required(body, "recording_uuid"),
        call_id=call_id,
        caller=caller,
        called=called,
        recording=recording_attachment(body),
        flow_step=flow_step,
        raw=raw,
        received_at=received_at,
        occurred_at=_occurred(body, received_at),
        duration_seconds=_seconds_between(body),
    )
