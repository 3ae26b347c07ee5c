"""Publish frames: the direct encoder writes exactly the bytes aiormq sends through pamqp."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from aiormq import spec
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from gateway.api.v1.envelope_pb2 import Event
from gateway.runtime.amqp_bus import _publish_frames, _string_table
from gateway.runtime.bus import OutgoingMessage
from gateway.runtime.codec import encode_event

#: A broker's usual frame_max (131072) less the 8 bytes of frame overhead.
MAX_CONTENT = 131072 - 8


def _aiormq_frames(
    channel: int, max_content: int, exchange: str, routing_key: str, message: OutgoingMessage
) -> bytes:
    """What aiormq's ``basic_publish`` puts on the wire for this message (mandatory)."""
    properties = spec.Basic.Properties(
        content_type=message.content_type,
        delivery_mode=2,
        headers=dict(message.headers),  # type: ignore[arg-type]
        message_id=message.message_id,
        message_type=message.type,
        timestamp=message.timestamp,
        correlation_id=message.correlation_id,
    )
    body = message.body
    parts: list[Any] = [
        spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
        ContentHeader(properties=properties, body_size=len(body)),
    ]
    # aiormq's Channel._split_body
    if body and len(body) < max_content:
        parts.append(ContentBody(body))
    elif body:
        parts += [ContentBody(body[i : i + max_content]) for i in range(0, len(body), max_content)]
    return ChannelFrame.marshall(channel_number=channel, frames=parts).payload


def _both(message: OutgoingMessage, *, channel: int = 1, max_content: int = MAX_CONTENT) -> None:
    args = (channel, max_content, "channels.events", "message.received.sms.twilio", message)
    assert _publish_frames(*args) == _aiormq_frames(*args)


def test_an_event_encodes_to_aiormqs_bytes() -> None:
    event = Event(id="e-1", type="message.received", channel="sms", provider="twilio", account="a")
    event.occurred_at.FromDatetime(datetime(2026, 11, 23, 12, tzinfo=UTC))
    event.correlation_id = "corr-é"  # non-ASCII: lengths are in bytes
    message = encode_event(event)
    _both(message)
    assert b"cloudEvents_specversion" in _publish_frames(
        1, MAX_CONTENT, "channels.events", "k", message
    )


def _random_text(rng: random.Random, low: int, high: int) -> str:
    return "".join(chr(rng.randint(32, 0x4FF)) for _ in range(rng.randint(low, high)))


def test_generated_messages_match_aiormq() -> None:
    rng = random.Random(11)
    zones = [None, UTC, timezone(timedelta(hours=-5))]
    for _ in range(400):
        headers: dict[str, object] = {
            "".join(rng.choice("abcXYZ_é") for _ in range(rng.randint(1, 20))): _random_text(
                rng, 0, 40
            )
            for _ in range(rng.randint(0, 8))
        }
        zone = rng.choice(zones)
        message = OutgoingMessage(
            body=rng.randbytes(rng.choice([0, 1, 17, 300, 5000])),
            message_id=rng.choice(["", "m-1", _random_text(rng, 1, 60)]),
            type=rng.choice(["", "gateway.api.v1.Event", _random_text(rng, 1, 30)]),
            content_type=rng.choice(["", "application/protobuf", _random_text(rng, 1, 30)]),
            headers=headers,  # type: ignore[arg-type]
            timestamp=rng.choice([None, datetime(2026, 1, 1, 12, 30, 15, 999_999, tzinfo=zone)]),
            correlation_id=rng.choice([None, "", _random_text(rng, 1, 50)]),
        )
        _both(message, channel=rng.randint(1, 2047), max_content=rng.choice([16, 4088, 131064]))


def test_bodies_split_into_frames_as_aiormq_does() -> None:
    for size in (0, 99, 100, 101, 250, 1000):
        message = OutgoingMessage(
            body=bytes(range(256)) * 4 + b"x" * size, message_id="m", type="t"
        )
        _both(message, max_content=100)


def test_other_header_value_types_use_pamqps_table_encoder() -> None:
    headers: dict[str, object] = {"x-death": [{"count": 1}], "n": 5, "s": "v", "flag": True}
    assert _string_table(headers) is None
    assert _string_table({"k" * 129: "v"}) is None  # pamqp's own handling of long names
    _both(OutgoingMessage(body=b"b", message_id="m", type="t", headers=headers))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [("message_id", "é" * 128), ("type", "t" * 256), ("correlation_id", "c" * 300)],
)
def test_what_amqp_cannot_carry_is_refused_before_queueing(field: str, value: str) -> None:
    fields: dict[str, Any] = {"body": b"b", "message_id": "m", "type": "t", field: value}
    with pytest.raises(ValueError, match="too long for AMQP"):
        _publish_frames(1, MAX_CONTENT, "channels.events", "k", OutgoingMessage(**fields))


def test_long_routing_keys_and_bad_exchange_names_are_refused() -> None:
    message = OutgoingMessage(body=b"b", message_id="m", type="t")
    with pytest.raises(ValueError, match="routing key too long"):
        _publish_frames(1, MAX_CONTENT, "channels.events", "k" * 256, message)
    for exchange in ("bad|name", "x" * 128):
        with pytest.raises(ValueError, match="invalid AMQP exchange name"):
            _publish_frames(1, MAX_CONTENT, exchange, "k", message)
