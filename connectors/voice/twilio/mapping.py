"""Twilio Voice webhook parameters -> gateway.api.v1 call events: pure functions.

Parameters as Twilio documents them:
https://www.twilio.com/docs/voice/twiml#request-parameters (voice URL, status callbacks)
https://www.twilio.com/docs/voice/api/call-resource#statuscallback
https://www.twilio.com/docs/voice/twiml/gather#action (Digits, SpeechResult, Confidence)
https://www.twilio.com/docs/voice/twiml/record#attributes-action (RecordingUrl ...)
https://www.twilio.com/docs/voice/twiml/record#attributes-recording-status-callback
https://www.twilio.com/docs/voice/twiml/record#attributes-transcribe-callback
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime

from google.protobuf.duration_pb2 import Duration
from multidict import MultiDict, MultiMapping

from connectors.voice import voicemail
from connectors.voice.lifecycle import STATE_WORDS
from gateway.api.v1.call_pb2 import CallState
from gateway.api.v1.content_pb2 import Attachment
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.api.v1.message_pb2 import Direction
from gateway.contract import BadRequestError, inbound_event_id, normalize_phone
from gateway.contract.ids import conversation_id
from gateway.contract.times import set_timestamp

PROVIDER = "twilio"
CHANNEL = "voice"
#: Twilio's header that stays the same across retries of one webhook request.
IDEMPOTENCY_HEADER = "I-Twilio-Idempotency-Token"

C = CallState
#: Twilio CallStatus -> canonical call state.
STATUS_MAP: Mapping[str, CallState.ValueType] = {
    "queued": C.CALL_STATE_INITIATED,
    "initiated": C.CALL_STATE_INITIATED,
    "ringing": C.CALL_STATE_RINGING,
    "in-progress": C.CALL_STATE_ANSWERED,
    "answered": C.CALL_STATE_ANSWERED,
    "completed": C.CALL_STATE_COMPLETED,
    "busy": C.CALL_STATE_BUSY,
    "no-answer": C.CALL_STATE_NO_ANSWER,
    "failed": C.CALL_STATE_FAILED,
    "canceled": C.CALL_STATE_CANCELED,
}
#: Event types this connector publishes.
EVENT_TYPES = (
    *(f"call.{word}" for word in STATE_WORDS.values()),
    "call.input",
    "call.recording",
    "call.transcription",
    "message.received",
)
#: Optional Twilio parameters kept as event attributes (the proto has no field).
_ATTRIBUTES = {
    "CallerName": "voice.caller_name",
    "ForwardedFrom": "voice.forwarded_from",
    "ParentCallSid": "twilio.parent_call_sid",
    "CallbackSource": "twilio.callback_source",
    "Confidence": "voice.speech_confidence",
    "AnsweredBy": "voice.answered_by",
    "SipResponseCode": "voice.sip_response_code",
    "ErrorCode": "twilio.error_code",
    "RecordingSid": "twilio.recording_sid",
    "RecordingStatus": "twilio.recording_status",
    "RecordingChannels": "voice.recording_channels",
    "RecordingSource": "voice.recording_source",
    "TranscriptionSid": "twilio.transcription_sid",
    "TranscriptionStatus": "twilio.transcription_status",
    "ApiVersion": "twilio.api_version",
}


def required(params: MultiMapping[str], name: str) -> str:
    """A parameter that must be present and non-empty."""
    value = params.get(name, "")
    if not value:
        raise BadRequestError(f"missing parameter {name}")
    return value


def _address(raw: str) -> str:
    # Twilio sends E.164 numbers, but also "client:alice", "sip:..." or
    # "Anonymous" for withheld caller id: keep what is not a phone number.
    if not raw or not raw.startswith("+"):
        return raw
    try:
        return normalize_phone(raw)
    except BadRequestError:
        return raw


_INBOUND = Direction.DIRECTION_INBOUND
_OUTBOUND = Direction.DIRECTION_OUTBOUND


def _direction(params: MultiMapping[str]) -> Direction.ValueType:
    return _INBOUND if params.get("Direction", "inbound") == "inbound" else _OUTBOUND


def _seconds(params: MultiMapping[str], name: str) -> Duration | None:
    raw = params.get(name, "")
    if not raw:
        return None
    if not raw.isdigit():
        raise BadRequestError(f"{name} is not a number of seconds: {raw!r}")
    return Duration(seconds=int(raw))


def _occurred(params: MultiMapping[str], received_at: datetime) -> datetime:
    raw = params.get("Timestamp", "")
    if raw:
        try:
            return parsedate_to_datetime(raw)
        except (TypeError, ValueError) as exc:
            raise BadRequestError(f"malformed Timestamp {raw!r}") from exc
    return received_at


def call_state(params: MultiMapping[str]) -> CallState.ValueType:
    """The canonical state of a request's ``CallStatus``."""
    raw = required(params, "CallStatus").lower()
    state = STATUS_MAP.get(raw)
    if state is None:
        raise BadRequestError(f"unknown CallStatus {raw!r}")
    return state


def _call_event(
    params: MultiMapping[str],
    *,
    account: str,
    event_type: str,
    id_parts: tuple[str, ...],
    raw: RawPayload,
    received_at: datetime,
    flow_step: str = "",
) -> Event:
    sid = required(params, "CallSid")
    state = call_state(params)
    caller, called = _address(params.get("From", "")), _address(params.get("To", ""))
    direction = _direction(params)
    # Filled in place: an answer webhook waits on this, and building the
    # sub-messages to copy them in cost about twice as much.
    event = Event(
        id=inbound_event_id(PROVIDER, account, event_type, sid, *id_parts),
        type=event_type,
        channel=CHANNEL,
        provider=PROVIDER,
        account=account,
        correlation_id=sid,
    )
    set_timestamp(event.received_at, received_at)
    occurred = _occurred(params, received_at)
    if occurred is received_at:
        event.occurred_at.CopyFrom(event.received_at)
    else:
        set_timestamp(event.occurred_at, occurred)
    event.raw.CopyFrom(raw)
    call = event.call
    call.call_id = sid
    call.direction = direction
    call.state = state
    call.provider_status = params["CallStatus"].lower()
    call.flow_step = flow_step
    call.to = called
    setattr(call, "from", caller)  # 'from' is a Python keyword
    duration = _seconds(params, "CallDuration")
    if duration is not None:
        call.duration.CopyFrom(duration)
    if caller and called:
        ours, theirs = (called, caller) if direction == _INBOUND else (caller, called)
        event.conversation_id = conversation_id(CHANNEL, ours, theirs)
    sequence = params.get("SequenceNumber", "")
    if sequence.isdigit():
        event.sequence = int(sequence)
    for name, key in _ATTRIBUTES.items():
        value = params.get(name)
        if value:
            event.attributes[key] = value
    return event


def status_event(
    params: MultiMapping[str],
    *,
    account: str,
    raw: RawPayload,
    received_at: datetime,
    flow_step: str = "",
) -> Event:
    """``call.<state>`` for the voice URL request or a status callback.

    One call state is one event: the voice URL request (ringing) and the
    ringing status callback of the same call share an id, and so do retries.
    """
    state = call_state(params)
    return _call_event(
        params,
        account=account,
        event_type=f"call.{STATE_WORDS[state]}",
        id_parts=(params["CallStatus"].lower(),),
        raw=raw,
        received_at=received_at,
        flow_step=flow_step,
    )


def _request_key(params: MultiMapping[str], idempotency_token: str, *fallback: str) -> str:
    # A caller may answer the same menu twice with the same key: only Twilio's
    # idempotency token (equal across retries of one request) tells the two
    # apart from one retried request.
    return idempotency_token or "\x1f".join(fallback)


def input_event(
    params: MultiMapping[str],
    *,
    account: str,
    flow_step: str,
    idempotency_token: str,
    raw: RawPayload,
    received_at: datetime,
) -> Event:
    """``call.input``: the digits or speech a Gather collected (both may be empty)."""
    digits, speech = params.get("Digits", ""), params.get("SpeechResult", "")
    key = _request_key(params, idempotency_token, flow_step, digits or "-", speech or "-")
    event = _call_event(
        params,
        account=account,
        event_type="call.input",
        id_parts=(key,),
        raw=raw,
        received_at=received_at,
        flow_step=flow_step,
    )
    event.call.dtmf = digits
    event.call.speech = speech
    return event


def _recording(params: MultiMapping[str]) -> Attachment:
    url = required(params, "RecordingUrl")
    # A recording URL without an extension serves WAV (append .mp3 for MP3).
    mp3 = url.endswith(".mp3")
    return Attachment(
        url=url,
        content_type="audio/mpeg" if mp3 else "audio/x-wav",
        provider_media_id=params.get("RecordingSid", ""),
        filename=f"{params.get('RecordingSid', 'recording')}.{'mp3' if mp3 else 'wav'}",
    )


def recording_event(
    params: MultiMapping[str],
    *,
    account: str,
    flow_step: str,
    raw: RawPayload,
    received_at: datetime,
) -> Event:
    """``call.recording``: the end of a Record verb or a recording status callback."""
    recording_sid = required(params, "RecordingSid")
    status = params.get("RecordingStatus", "completed").lower()
    if "CallStatus" not in params:
        # Recording status callbacks carry no CallStatus: the call is in progress
        # as far as this event is concerned (its outcome comes by status callback).
        params = _with(params, CallStatus="in-progress")
    event = _call_event(
        params,
        account=account,
        event_type="call.recording",
        id_parts=(recording_sid, status),
        raw=raw,
        received_at=received_at,
        flow_step=flow_step,
    )
    if status == "completed" and params.get("RecordingUrl"):
        event.call.recording.CopyFrom(_recording(params))
        duration = _seconds(params, "RecordingDuration")
        if duration is not None:
            event.attributes["voice.recording_duration_seconds"] = str(duration.seconds)
    return event


def transcription_event(
    params: MultiMapping[str],
    *,
    account: str,
    flow_step: str,
    raw: RawPayload,
    received_at: datetime,
) -> Event:
    """``call.transcription``: a transcribeCallback (text, or a failed status)."""
    key = params.get("TranscriptionSid") or required(params, "RecordingSid")
    status = params.get("TranscriptionStatus", "completed").lower()
    if "CallStatus" not in params:
        params = _with(params, CallStatus="in-progress")
    event = _call_event(
        params,
        account=account,
        event_type="call.transcription",
        id_parts=(key, status),
        raw=raw,
        received_at=received_at,
        flow_step=flow_step,
    )
    event.call.transcription = params.get("TranscriptionText", "")
    if params.get("RecordingUrl"):
        event.call.recording.CopyFrom(_recording(params))
    return event


def voicemail_message(
    params: MultiMapping[str],
    *,
    account: str,
    flow_step: str,
    raw: RawPayload,
    received_at: datetime,
) -> Event | None:
    """``message.received``: a voicemail as a Message with its audio attached.

    None when the caller left no recording (hung up before the beep).
    """
    if not params.get("RecordingUrl") or not params.get("RecordingSid"):
        return None
    duration = _seconds(params, "RecordingDuration")
    return voicemail.voicemail_message(
        provider=PROVIDER,
        account=account,
        recording_id=params["RecordingSid"],
        call_id=required(params, "CallSid"),
        caller=_address(required(params, "From")),
        called=_address(required(params, "To")),
        recording=_recording(params),
        flow_step=flow_step,
        raw=raw,
        received_at=received_at,
        duration_seconds=duration.seconds if duration is not None else None,
    )


def _with(params: MultiMapping[str], **extra: str) -> MultiMapping[str]:
    merged = MultiDict(params)
    for name, value in extra.items():
        merged[name] = value
    return merged
