"""The client side of ``send`` and ``trace``: request building and the timeline table."""

from __future__ import annotations

import json

from google.protobuf.timestamp_pb2 import Timestamp

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.gateway_service_pb2 import (
    OutboundMessage,
    StatusTransition,
    TimelineEntryKind,
)
from gateway.server.client import build_send_request, trace_json, trace_table

S = DeliveryState
K = TimelineEntryKind


def test_build_send_request_single_and_fallback_identities() -> None:
    one = build_send_request(to=["+447700900123"], channel="sms", provider="twilio", text="hi")
    assert one.recipient.WhichOneof("target") == "address"
    assert one.recipient.address.provider == "twilio"
    assert one.message.text.body == "hi"
    assert len(one.idempotency_key) == 36  # a fresh uuid when none is given

    several = build_send_request(
        to=["+447700900123", "whatsapp:+447700900123"],
        channel="sms",
        media=["https://x.test/a.jpg"],
        idempotency_key="k",
    )
    identities = several.recipient.identities.identities
    assert [(i.channel, i.address) for i in identities] == [
        ("sms", "+447700900123"),
        ("whatsapp", "+447700900123"),
    ]
    assert several.message.WhichOneof("content") == "media"
    assert [a.url for a in several.message.attachments] == ["https://x.test/a.jpg"]
    assert several.idempotency_key == "k"


def _message() -> OutboundMessage:
    def at(second: int) -> Timestamp:
        ts = Timestamp()
        ts.FromSeconds(1_790_000_000 + second)
        return ts

    return OutboundMessage(
        message_id="m-1",
        state=S.DELIVERY_STATE_DELIVERED,
        channel="sms",
        provider="twilio",
        recipient="+447700900123",
        trace_id="a" * 32,
        timeline=[
            StatusTransition(
                state=S.DELIVERY_STATE_ACCEPTED, kind=K.TIMELINE_ENTRY_KIND_TRANSITION,
                recorded_at=at(0), trace_id="a" * 32, attempt=1, channel="sms", provider="twilio",
            ),
            StatusTransition(
                state=S.DELIVERY_STATE_DELIVERED, kind=K.TIMELINE_ENTRY_KIND_TRANSITION,
                occurred_at=at(2), provider_status="delivered", trace_id="b" * 32, attempt=1,
                channel="sms", provider="twilio",
            ),
            StatusTransition(
                state=S.DELIVERY_STATE_SENT, kind=K.TIMELINE_ENTRY_KIND_ATTEMPT,
                occurred_at=at(1), provider_status="sent", reason_code="", attempt=1,
                channel="sms", provider="twilio",
            ),
        ],
    )  # fmt: skip


def test_trace_table_plain_and_coloured() -> None:
    plain = trace_table(_message(), color=False)
    assert "\033[" not in plain
    lines = plain.splitlines()
    assert lines[0] == "message   m-1"
    assert "DELIVERED" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.startswith("TIME (UTC)"))
    rows = lines[header + 1 :]
    assert [r.split()[2] for r in rows] == ["ACCEPTED", "DELIVERED", "SENT"]
    assert "(not applied)" in rows[2]  # the late SENT is kept but did not change the state
    assert "b" * 32 in rows[1]
    assert rows[1].index("delivered") == lines[header].index("PROVIDER STATUS")  # aligned

    coloured = trace_table(_message(), color=True)
    assert "\033[32mDELIVERED" in coloured  # green final state
    assert "\033[2m" in coloured  # the not-applied entry is dimmed


def test_trace_json_uses_proto_names() -> None:
    data = json.loads(trace_json(_message()))
    assert data["message_id"] == "m-1"
    assert data["timeline"][1]["provider_status"] == "delivered"
    assert data["timeline"][2]["kind"] == "TIMELINE_ENTRY_KIND_ATTEMPT"
