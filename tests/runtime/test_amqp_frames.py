"""Publish frames: the fast header-table encoder writes pamqp's exact bytes."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from aiormq import spec

from gateway.api.v1.envelope_pb2 import Event
from gateway.runtime.amqp_bus import _Properties, _string_table
from gateway.runtime.codec import encode_event


def _both(headers: dict[str, object]) -> tuple[bytes, bytes]:
    fields = {
        "content_type": "application/protobuf",
        "delivery_mode": 2,
        "headers": headers,
        "message_id": "m-1",
        "message_type": "gateway.api.v1.Event",
        "timestamp": datetime(2026, 11, 23, tzinfo=UTC),
    }
    return _Properties(**fields).marshal(), spec.Basic.Properties(**fields).marshal()  # type: ignore[arg-type]


def test_event_headers_encode_to_pamqps_bytes() -> None:
    event = Event(id="e-1", type="message.received", channel="sms", provider="twilio", account="a")
    event.occurred_at.FromDatetime(datetime(2026, 11, 23, 12, tzinfo=UTC))
    event.correlation_id = "corr-é"  # non-ASCII: lengths are in bytes
    message = encode_event(event)
    ours, theirs = _both(dict(message.headers))
    assert ours == theirs
    assert b"cloudEvents_specversion" in ours


def test_generated_string_tables_match_pamqp() -> None:
    rng = random.Random(11)
    for _ in range(300):
        headers: dict[str, object] = {
            "".join(rng.choice("abcXYZ_é") for _ in range(rng.randint(1, 20))): "".join(
                chr(rng.randint(32, 0x4FF)) for _ in range(rng.randint(0, 40))
            )
            for _ in range(rng.randint(1, 8))
        }
        ours, theirs = _both(headers)
        assert ours == theirs


def test_other_value_types_fall_back_to_pamqp() -> None:
    headers: dict[str, object] = {"x-death": [{"count": 1}], "n": 5, "s": "v", "flag": True}
    assert _string_table(headers) is None
    ours, theirs = _both(headers)
    assert ours == theirs
    empty_ours, empty_theirs = _both({})
    assert empty_ours == empty_theirs
