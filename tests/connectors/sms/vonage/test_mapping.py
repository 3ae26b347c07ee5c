"""Vonage payloads -> gateway.api.v1, table-driven from Vonage's documented shapes.

Shapes: SMS API inbound SMS and delivery receipt parameters
(developer.vonage.com/en/messaging/sms/guides/inbound-sms, .../delivery-receipts),
Messages API inbound and status webhooks (developer.vonage.com/en/api/messages,
.../messages/concepts/messages-status-callbacks).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from connectors.sms.vonage import mapping
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import RawPayload
from gateway.api.v1.message_pb2 import Direction
from gateway.contract import BadRequestError

S = DeliveryState
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
RAW = RawPayload(content_type="application/x-www-form-urlencoded", data=b"x=1")


def sms(**overrides: str) -> dict[str, str]:
    """An SMS API inbound SMS as documented."""
    params = {
        "msisdn": "447700900123",
        "to": "447700900000",
        "messageId": "0A0000000123ABCD1",
        "text": "Hello world",
        "type": "text",
        "keyword": "HELLO",
        "api-key": "abcd1234",
        "message-timestamp": "2026-03-01 11:59:58",
        "timestamp": "1772366398",
        "nonce": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
    }
    params.update(overrides)
    return params


def dlr(**overrides: str) -> dict[str, str]:
    """An SMS API delivery receipt as documented."""
    params = {
        "msisdn": "447700900123",
        "to": "AcmeInc",
        "network-code": "23410",
        "messageId": "0A0000001234567B",
        "price": "0.03330000",
        "status": "delivered",
        "scts": "2603011159",
        "err-code": "0",
        "api-key": "abcd1234",
        "client-ref": "c0ffee00-0000-4000-8000-000000000001",
        "message-timestamp": "2026-03-01 11:59:30",
        "timestamp": "1772366370",
    }
    params.update(overrides)
    return params


def messages_status(**overrides: Any) -> dict[str, Any]:
    """A Messages API SMS status webhook as documented."""
    body: dict[str, Any] = {
        "message_uuid": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
        "to": "447700900000",
        "from": "447700900001",
        "timestamp": "2026-03-01T11:59:00.000Z",
        "status": "submitted",
        "channel": "sms",
        "client_ref": "c0ffee00-0000-4000-8000-000000000002",
        "usage": {"currency": "EUR", "price": "0.0333"},
        "destination": {"network_code": "23410"},
        "sms": {"count_total": "2"},
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


# -- SMS API inbound ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "body", "encoding", "segments"),
    [
        ({}, "Hello world", "GSM-7", "1"),
        ({"type": "unicode", "text": "Grüße 📦 日本"}, "Grüße 📦 日本", "UCS-2", "1"),
        ({"text": "a" * 161}, "a" * 161, "GSM-7", "2"),
        ({"type": "unicode", "text": "ą" * 71}, "ą" * 71, "UCS-2", "2"),
        ({"text": "é€" * 40}, "é€" * 40, "GSM-7", "1"),
        ({"text": "{[~]}" * 20}, "{[~]}" * 20, "GSM-7", "2"),
    ],
)
def test_inbound_sms_text(
    overrides: dict[str, str], body: str, encoding: str, segments: str
) -> None:
    event = mapping.inbound_sms(sms(**overrides), account="main", raw=RAW, received_at=NOW)
    assert event.type == "message.received"
    assert (event.channel, event.provider, event.account) == ("sms", "vonage", "main")
    msg = event.message
    assert msg.direction == Direction.DIRECTION_INBOUND
    assert msg.sender.address == "+447700900123"
    assert [r.address for r in msg.recipients] == ["+447700900000"]
    assert msg.text.body == body
    assert msg.provider_message_id == "0A0000000123ABCD1"
    assert event.attributes["sms.encoding"] == encoding
    assert event.attributes["sms.segments"] == segments
    assert event.attributes["sms.keyword"] == "HELLO"
    assert event.occurred_at.ToDatetime(tzinfo=UTC) == datetime(2026, 3, 1, 11, 59, 58, tzinfo=UTC)
    assert event.received_at.ToDatetime(tzinfo=UTC) == NOW
    assert event.raw == RAW


def test_inbound_sms_ids_are_deterministic_and_per_account() -> None:
    first = mapping.inbound_sms(sms(), account="main", raw=RAW, received_at=NOW)
    retry = mapping.inbound_sms(sms(), account="main", raw=RAW, received_at=datetime.now(UTC))
    other = mapping.inbound_sms(sms(), account="other", raw=RAW, received_at=NOW)
    assert first.id == retry.id != other.id
    assert first.conversation_id == retry.conversation_id


def test_concatenated_parts_are_each_published_with_their_concat_attributes() -> None:
    parts = [
        sms(
            messageId=f"0A00000000000PART{n}",
            text=text,
            concat="true",
            **{"concat-ref": "108", "concat-total": "3", "concat-part": str(n)},
        )
        for n, text in ((2, "second "), (1, "first "), (3, "third"))
    ]
    events = [mapping.inbound_sms(p, account="main", raw=RAW, received_at=NOW) for p in parts]
    assert len({e.id for e in events}) == 3
    by_part = sorted(events, key=lambda e: e.sequence)
    assert [e.sequence for e in by_part] == [1, 2, 3]
    assert "".join(e.message.text.body for e in by_part) == "first second third"
    for event in events:
        assert event.attributes["sms.concat_ref"] == "108"
        assert event.attributes["sms.concat_total"] == "3"
        assert event.attributes["sms.concat_part"] == str(event.sequence)
    assert len({e.conversation_id for e in events}) == 1


def test_binary_sms_has_no_text_and_keeps_its_payload() -> None:
    event = mapping.inbound_sms(
        sms(type="binary", text="", data="48656c6c6f", udh="050003CC0201"),
        account="main",
        raw=RAW,
        received_at=NOW,
    )
    assert event.message.WhichOneof("content") is None
    assert event.attributes["vonage.data"] == "48656c6c6f"
    assert event.attributes["vonage.udh"] == "050003CC0201"
    assert event.attributes["vonage.type"] == "binary"


def test_alphanumeric_sender_and_short_code_are_kept() -> None:
    event = mapping.inbound_sms(
        sms(msisdn="AcmeInc", to="84433"), account="main", raw=RAW, received_at=NOW
    )
    assert event.message.sender.address == "AcmeInc"
    assert event.message.recipients[0].address == "84433"


def test_missing_message_timestamp_uses_received_at() -> None:
    params = sms()
    del params["message-timestamp"]
    event = mapping.inbound_sms(params, account="main", raw=RAW, received_at=NOW)
    assert event.occurred_at.ToDatetime(tzinfo=UTC) == NOW


@pytest.mark.parametrize(
    ("overrides", "drop", "message"),
    [
        ({}, "messageId", "messageId"),
        ({}, "msisdn", "msisdn"),
        ({}, "to", "to"),
        ({"msisdn": "12"}, None, "phone"),
        ({"msisdn": "+44 77 00 !!"}, None, "phone"),
        ({"msisdn": "4477009001234567890"}, None, "phone"),
        ({"type": "wap"}, None, "message type"),
        ({"message-timestamp": "yesterday"}, None, "message-timestamp"),
        (
            {"concat": "true", "concat-ref": "1", "concat-total": "2", "concat-part": "3"},
            None,
            "concat",
        ),
        (
            {"concat": "true", "concat-ref": "1", "concat-total": "2", "concat-part": "0"},
            None,
            "concat",
        ),
        (
            {"concat": "true", "concat-ref": "1", "concat-total": "x", "concat-part": "1"},
            None,
            "concat",
        ),
        ({"concat": "true", "concat-total": "2", "concat-part": "1"}, None, "concat-ref"),
    ],
)
def test_malformed_inbound_sms_is_rejected_not_rewritten(
    overrides: dict[str, str], drop: str | None, message: str
) -> None:
    params = sms(**overrides)
    if drop:
        del params[drop]
    with pytest.raises(BadRequestError, match=message):
        mapping.inbound_sms(params, account="main", raw=RAW, received_at=NOW)


# -- SMS API delivery receipts -------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "err_code", "state", "permanent", "reason_code"),
    [
        ("accepted", "0", S.DELIVERY_STATE_SENT, False, ""),
        ("buffered", "0", S.DELIVERY_STATE_SENT, False, ""),
        ("delivered", "0", S.DELIVERY_STATE_DELIVERED, False, ""),
        ("expired", "2", S.DELIVERY_STATE_EXPIRED, False, "2"),
        ("expired", "3", S.DELIVERY_STATE_EXPIRED, True, "3"),
        ("failed", "6", S.DELIVERY_STATE_FAILED, True, "6"),
        ("failed", "7", S.DELIVERY_STATE_FAILED, False, "7"),
        ("rejected", "9", S.DELIVERY_STATE_FAILED, True, "9"),
        ("unknown", "1", S.DELIVERY_STATE_SENT, False, "1"),
        ("DELIVERED", "0", S.DELIVERY_STATE_DELIVERED, False, ""),
    ],
)
def test_delivery_receipt_states(
    status: str, err_code: str, state: int, permanent: bool, reason_code: str
) -> None:
    event = mapping.delivery_receipt(
        dlr(status=status, **{"err-code": err_code}), account="main", raw=RAW, received_at=NOW
    )
    st = event.status
    assert event.type == "message.status"
    assert st.state == state
    assert st.provider_status == status.lower()
    assert st.permanent is permanent
    assert st.reason_code == reason_code
    assert st.reason == mapping.DLR_ERROR_TEXT.get(reason_code, "")
    assert st.provider_message_id == "0A0000001234567B"
    assert st.message_id == event.causation_id == "c0ffee00-0000-4000-8000-000000000001"
    assert st.recipient == "+447700900123"
    assert event.attributes["sms.network_code"] == "23410"
    assert event.attributes["vonage.price"] == "0.03330000"
    # scts (the carrier's time) wins over message-timestamp.
    assert event.occurred_at.ToDatetime(tzinfo=UTC) == datetime(2026, 3, 1, 11, 59, tzinfo=UTC)


def test_each_receipt_of_one_message_is_its_own_event() -> None:
    ids = {
        mapping.delivery_receipt(dlr(status=s), account="main", raw=RAW, received_at=NOW).id
        for s in ("accepted", "delivered")
    }
    assert len(ids) == 2
    again = mapping.delivery_receipt(
        dlr(status="delivered"), account="main", raw=RAW, received_at=NOW
    )
    assert again.id in ids


def test_legacy_message_id_spelling_and_odd_scts() -> None:
    params = dlr(scts="garbage")
    params["message-id"] = params.pop("messageId")
    event = mapping.delivery_receipt(params, account="main", raw=RAW, received_at=NOW)
    assert event.status.provider_message_id == "0A0000001234567B"
    assert event.occurred_at.ToDatetime(tzinfo=UTC) == datetime(2026, 3, 1, 11, 59, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("overrides", "drop", "message"),
    [
        ({"status": "teleported"}, None, "unknown DLR status"),
        ({}, "status", "status"),
        ({}, "messageId", "message-id"),
        ({"msisdn": "1"}, None, "phone"),
    ],
)
def test_malformed_receipts_are_rejected(
    overrides: dict[str, str], drop: str | None, message: str
) -> None:
    params = dlr(**overrides)
    if drop:
        del params[drop]
    with pytest.raises(BadRequestError, match=message):
        mapping.delivery_receipt(params, account="main", raw=RAW, received_at=NOW)


# -- Messages API ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "text", "encoding"),
    [
        ("447700900123", "Hi there", "GSM-7"),
        ({"type": "sms", "number": "447700900123"}, "Hi there", "GSM-7"),
        ("447700900123", "Привет 👋", "UCS-2"),
        ("447700900123", "x" * 400, "GSM-7"),
    ],
)
def test_messages_inbound(sender: Any, text: str, encoding: str) -> None:
    body = {
        "channel": "sms",
        "message_uuid": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
        "to": "447700900000",
        "from": sender,
        "timestamp": "2026-03-01T11:58:00.000Z",
        "text": text,
        "message_type": "text",
        "sms": {"num_messages": "3", "keyword": "HI"},
        "usage": {"price": "0.0057", "currency": "EUR"},
    }
    event = mapping.messages_inbound(body, account="main", raw=RAW, received_at=NOW)
    assert event.message.sender.address == "+447700900123"
    assert event.message.recipients[0].address == "+447700900000"
    assert event.message.text.body == text
    assert event.message.provider_message_id == body["message_uuid"]
    assert event.attributes["sms.encoding"] == encoding
    assert event.attributes["sms.provider_segments"] == "3"
    assert event.attributes["sms.keyword"] == "HI"
    assert event.attributes["vonage.price"] == "0.0057"
    assert event.occurred_at.ToDatetime(tzinfo=UTC) == datetime(2026, 3, 1, 11, 58, tzinfo=UTC)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"channel": "whatsapp"}, "not an SMS"),
        ({"message_uuid": None}, "message_uuid"),
        ({"from": "12"}, "phone"),
        ({"from": None}, "from"),
        ({"text": 5}, "text"),
        ({"timestamp": "not a time"}, "timestamp"),
    ],
)
def test_malformed_messages_inbound_is_rejected(body: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "channel": "sms",
        "message_uuid": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
        "to": "447700900000",
        "from": "447700900123",
        "text": "hi",
    }
    base.update(body)
    payload = {k: v for k, v in base.items() if v is not None}
    with pytest.raises(BadRequestError, match=message):
        mapping.messages_inbound(payload, account="main", raw=RAW, received_at=NOW)


@pytest.mark.parametrize(
    ("status", "error", "state", "permanent", "code"),
    [
        ("submitted", None, S.DELIVERY_STATE_SENT, False, ""),
        ("delivered", None, S.DELIVERY_STATE_DELIVERED, False, ""),
        ("read", None, S.DELIVERY_STATE_READ, False, ""),
        (
            "rejected",
            {
                "type": "https://developer.vonage.com/api-errors/messages#1320",
                "title": "1320",
                "detail": "Message failed because the number is not reachable",
                "instance": "bf0ca0bf-927b-3b52-e3cb-03217e1a1ddf",
            },
            S.DELIVERY_STATE_FAILED,
            True,
            "1320",
        ),
        (
            "rejected",
            {"type": "https://developer.vonage.com/api-errors/messages#1360", "title": "TTL"},
            S.DELIVERY_STATE_EXPIRED,
            True,
            "1360",
        ),
        ("rejected", {"title": 1330, "detail": "Unknown"}, S.DELIVERY_STATE_FAILED, True, "1330"),
        (
            "undeliverable",
            {"type": "https://developer.vonage.com/api-errors/messages#1100"},
            S.DELIVERY_STATE_UNDELIVERED,
            False,
            "1100",
        ),
    ],
)
def test_messages_status(
    status: str, error: dict[str, Any] | None, state: int, permanent: bool, code: str
) -> None:
    body = messages_status(status=status, error=error)
    event = mapping.messages_status(body, account="main", raw=RAW, received_at=NOW)
    st = event.status
    assert event.type == "message.status"
    assert st.state == state
    assert st.provider_status == status
    assert st.permanent is permanent
    assert st.reason_code == code
    if error:
        assert st.reason == str(error.get("detail") or error.get("title") or "")
    assert st.provider_message_id == "aaaaaaaa-bbbb-cccc-dddd-0123456789ab"
    assert st.message_id == event.causation_id == "c0ffee00-0000-4000-8000-000000000002"
    assert st.recipient == "+447700900000"
    assert st.segments == 2
    assert event.attributes["sms.network_code"] == "23410"
    assert event.attributes["vonage.currency"] == "EUR"
    assert event.occurred_at.ToDatetime(tzinfo=UTC) == datetime(2026, 3, 1, 11, 59, tzinfo=UTC)


def test_messages_status_ids_differ_per_status_and_repeat_per_retry() -> None:
    submitted = mapping.messages_status(messages_status(), account="m", raw=RAW, received_at=NOW)
    delivered = mapping.messages_status(
        messages_status(status="delivered"), account="m", raw=RAW, received_at=NOW
    )
    retried = mapping.messages_status(messages_status(), account="m", raw=RAW, received_at=NOW)
    assert submitted.id != delivered.id
    assert submitted.id == retried.id


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"status": "teleported"}, "unknown status"),
        ({"status": None}, "status"),
        ({"channel": "viber_service"}, "not an SMS"),
        ({"message_uuid": None}, "message_uuid"),
        ({"to": "1"}, "phone"),
    ],
)
def test_malformed_messages_status_is_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        mapping.messages_status(
            messages_status(**overrides), account="main", raw=RAW, received_at=NOW
        )


def test_manifest_declares_every_state_the_maps_emit() -> None:
    from connectors.sms.vonage import SPEC

    declared = set(SPEC.manifest.delivery_states)
    emitted = {*mapping.DLR_STATUS_MAP.values(), *mapping.MESSAGES_STATUS_MAP.values()}
    assert emitted | {S.DELIVERY_STATE_EXPIRED, S.DELIVERY_STATE_ACCEPTED} == declared
