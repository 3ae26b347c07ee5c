"""Protobuf <-> AMQP messages: CloudEvents headers, trace context, bad payloads."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Message
from gateway.contract.errors import BadRequestError
from gateway.runtime.bus import Delivery
from gateway.runtime.codec import (
    COMMAND_TYPE_NAME,
    CONTENT_TYPE,
    EVENT_TYPE_NAME,
    decode_command,
    decode_event,
    encode_command,
    encode_event,
    event_routing_key,
)
from gateway.runtime.telemetry import ensure_tracing, extract_trace_context, tracer

WHEN = datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC)


def _ts(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def _event(**kw: object) -> Event:
    fields: dict[str, object] = {
        "id": "ev-1",
        "type": "message.received",
        "channel": "sms",
        "provider": "twilio",
        "account": "main",
        "occurred_at": _ts(WHEN),
        "message": Message(provider_message_id="SM1"),
    }
    fields.update(kw)
    return Event(**fields)  # type: ignore[arg-type]


def _delivery(message_body: bytes, *, type: str | None, content_type: str | None) -> Delivery:
    return Delivery(
        body=message_body,
        message_id="m",
        type=type,
        content_type=content_type,
        headers={},
        exchange="x",
        routing_key="k",
        redelivered=False,
    )


def test_routing_key() -> None:
    assert event_routing_key(_event()) == "message.received.sms.twilio"
    assert event_routing_key(_event(type="message.status", provider="vonage")) == (
        "message.status.sms.vonage"
    )


def test_event_message_properties_and_cloudevents_headers() -> None:
    out = encode_event(_event(correlation_id="corr-9", sequence=3))
    assert out.message_id == "ev-1"
    assert out.type == EVENT_TYPE_NAME == "gateway.api.v1.Event"
    assert out.content_type == CONTENT_TYPE == "application/protobuf"
    assert out.timestamp == WHEN
    assert out.correlation_id == "corr-9"
    h = out.headers
    assert h["cloudEvents_specversion"] == "1.0"
    assert h["cloudEvents_id"] == "ev-1"
    assert h["cloudEvents_source"] == "/channel-gateway/sms/twilio/main"
    assert h["cloudEvents_type"] == "io.channelgateway.message.received"
    assert h["cloudEvents_time"] == "2026-03-01T12:30:05Z"
    assert h["cloudEvents_datacontenttype"] == "application/protobuf"
    assert h["cloudEvents_correlationid"] == "corr-9"
    assert h["cloudEvents_sequence"] == "3"


def test_optional_cloudevents_headers_are_omitted() -> None:
    event = _event()
    event.ClearField("occurred_at")
    h = encode_event(event).headers
    assert "cloudEvents_time" not in h
    assert "cloudEvents_correlationid" not in h
    assert "cloudEvents_sequence" not in h


def test_event_body_round_trip() -> None:
    event = _event(correlation_id="c")
    out = encode_event(event)
    back = decode_event(_delivery(out.body, type=out.type, content_type=out.content_type))
    assert back == event


def test_traceparent_round_trip() -> None:
    ensure_tracing("test", otlp_endpoint=None, console=False)
    with tracer().start_as_current_span("producer") as span:
        event = _event()
        out = encode_event(event)
        expected = span.get_span_context()
    traceparent = out.headers["traceparent"]
    assert isinstance(traceparent, str)
    assert traceparent.startswith(f"00-{expected.trace_id:032x}-{expected.span_id:016x}-")
    assert event.traceparent == traceparent  # stored in the event too
    ctx = extract_trace_context(out.headers)
    extracted = trace.get_current_span(ctx).get_span_context()
    assert extracted.trace_id == expected.trace_id
    assert extracted.span_id == expected.span_id
    assert extracted.is_remote


def test_existing_traceparent_in_event_is_kept() -> None:
    ensure_tracing("test", otlp_endpoint=None, console=False)
    original = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    event = _event(traceparent=original)
    with tracer().start_as_current_span("republish"):
        encode_event(event)
    assert event.traceparent == original


def test_command_encoding() -> None:
    command = SendMessageCommand(
        message_id="msg-1", channel="sms", provider="twilio", attempt=2, created_at=_ts(WHEN)
    )
    routing_key, out = encode_command(command)
    assert routing_key == "send.sms.twilio"
    assert out.message_id == "msg-1:2"  # one AMQP message id per attempt
    assert out.type == COMMAND_TYPE_NAME
    assert out.headers["cloudEvents_type"] == "io.channelgateway.command.send.sms"
    assert out.headers["cloudEvents_id"] == "msg-1"
    back = decode_command(_delivery(out.body, type=out.type, content_type=out.content_type))
    assert back == command
    assert (
        encode_command(SendMessageCommand(message_id="m", channel="sms", provider="t"))[
            1
        ].message_id
        == "m:1"
    )


def test_undecodable_body_is_a_clear_error() -> None:
    with pytest.raises(BadRequestError, match="undecodable event body"):
        decode_event(_delivery(b"\xff\xff\xff", type=EVENT_TYPE_NAME, content_type=CONTENT_TYPE))
    with pytest.raises(BadRequestError, match="undecodable command body"):
        decode_command(_delivery(b"\x0a\xff", type=COMMAND_TYPE_NAME, content_type=CONTENT_TYPE))


@pytest.mark.parametrize(
    ("type", "content_type", "message"),
    [
        ("gateway.api.v1.SomethingElse", CONTENT_TYPE, "expected AMQP type gateway.api.v1.Event"),
        (EVENT_TYPE_NAME, "application/json", "expected content type application/protobuf"),
    ],
)
def test_wrong_type_or_content_type_is_refused(type: str, content_type: str, message: str) -> None:
    body = _event().SerializeToString()
    with pytest.raises(BadRequestError, match=message):
        decode_event(_delivery(body, type=type, content_type=content_type))


def test_command_without_identity_is_refused() -> None:
    body = SendMessageCommand(message_id="m", channel="sms").SerializeToString()
    with pytest.raises(BadRequestError, match="lacks message_id, channel or provider"):
        decode_command(_delivery(body, type=COMMAND_TYPE_NAME, content_type=CONTENT_TYPE))
