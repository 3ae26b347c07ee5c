"""Twilio payloads -> gateway.api.v1, table-driven from Twilio's documented shapes.

Inbound: https://www.twilio.com/docs/messaging/guides/webhook-request
Status callbacks: https://www.twilio.com/docs/messaging/guides/track-outbound-message-status
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from multidict import MultiDict

from connectors.sms.twilio import SPEC, mapping
from gateway.api.v1.content_pb2 import MediaKind
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.api.v1.message_pb2 import Direction
from gateway.api.v1.participant_pb2 import ParticipantRole
from gateway.contract import BadRequestError
from gateway.contract.status import fold
from tests.connectors.sms.twilio import support as tw

S = DeliveryState
NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
RAW = RawPayload(content_type=mapping.FORM, data=b"raw")
SID = "SM" + "1f" * 16
MMS_SID = "MM" + "2e" * 16


def inbound(params: dict[str, str], account: str = "main") -> Event:
    return mapping.inbound_message(MultiDict(params), account=account, raw=RAW, received_at=NOW)


def mms(count: int, *, body: str = "") -> dict[str, str]:
    """An MMS webhook with ``count`` media, as Twilio sends it."""
    types = ["image/jpeg", "image/png", "video/mp4", "audio/amr", "application/pdf"]
    params = tw.inbound_params(MMS_SID, body=body, NumMedia=str(count))
    for i in range(count):
        params[f"MediaUrl{i}"] = f"{tw.MEDIA_BASE}/Messages/{MMS_SID}/Media/ME{i:032x}"
        params[f"MediaContentType{i}"] = types[i % len(types)]
    return params


def test_plain_sms() -> None:
    event = inbound(tw.inbound_params(SID, body="Where is my order?"))
    assert event.type == "message.received"
    assert (event.channel, event.provider, event.account) == ("sms", "twilio", "main")
    message = event.message
    assert message.direction == Direction.DIRECTION_INBOUND
    assert message.sender.address == tw.CUSTOMER
    assert message.sender.role == ParticipantRole.PARTICIPANT_ROLE_CUSTOMER
    assert [r.address for r in message.recipients] == [tw.OUR_NUMBER]
    assert message.recipients[0].role == ParticipantRole.PARTICIPANT_ROLE_BUSINESS
    assert message.provider_message_id == SID
    assert message.WhichOneof("content") == "text"
    assert message.text.body == "Where is my order?"
    assert list(message.attachments) == []
    assert event.received_at.ToDatetime(tzinfo=UTC) == NOW
    assert event.raw == RAW
    assert event.attributes["sms.encoding"] == "GSM-7"
    assert event.attributes["sms.segments"] == "1"
    assert event.attributes["sms.provider_segments"] == "1"
    assert event.conversation_id


def test_event_id_is_deterministic_per_account_and_sid() -> None:
    params = tw.inbound_params(SID)
    assert inbound(params).id == inbound(params).id
    assert inbound(params).id != inbound(tw.inbound_params("SM" + "3d" * 16)).id
    assert inbound(params, "main").id != inbound(params, "other").id


@pytest.mark.parametrize("count", [1, 2, 3, 10])
def test_mms_keeps_every_media_item_in_order(count: int) -> None:
    params = mms(count)
    event = inbound(params)
    urls = [a.url for a in event.message.attachments]
    assert urls == [params[f"MediaUrl{i}"] for i in range(count)]
    assert [a.content_type for a in event.message.attachments] == [
        params[f"MediaContentType{i}"] for i in range(count)
    ]
    # No text: the content is media, of the first item's kind.
    assert event.message.WhichOneof("content") == "media"
    assert event.message.media.kind == MediaKind.MEDIA_KIND_IMAGE


def test_mms_with_a_caption_is_text_plus_attachments() -> None:
    event = inbound(mms(2, body="Look at these"))
    assert event.message.WhichOneof("content") == "text"
    assert event.message.text.body == "Look at these"
    assert len(event.message.attachments) == 2


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("image/gif", MediaKind.MEDIA_KIND_IMAGE),
        ("video/3gpp", MediaKind.MEDIA_KIND_VIDEO),
        ("audio/mpeg", MediaKind.MEDIA_KIND_AUDIO),
        ("text/vcard", MediaKind.MEDIA_KIND_DOCUMENT),
        ("application/pdf", MediaKind.MEDIA_KIND_DOCUMENT),
    ],
)
def test_media_kind_follows_the_first_content_type(
    content_type: str, kind: MediaKind.ValueType
) -> None:
    params = mms(1)
    params["MediaContentType0"] = content_type
    assert inbound(params).message.media.kind == kind


@pytest.mark.parametrize(
    ("body", "encoding", "segments"),
    [
        ("Hello", "GSM-7", "1"),
        ("Grüße aus Köln", "GSM-7", "1"),  # ü, ö are in the GSM-7 basic table
        ("Zażółć gęślą jaźń", "UCS-2", "1"),
        ("Thanks 👍", "UCS-2", "1"),
        ("a" * 160, "GSM-7", "1"),
        ("a" * 161, "GSM-7", "2"),
        ("b" * 1600, "GSM-7", "11"),  # Twilio's 1600-character maximum
        ("ж" * 71, "UCS-2", "2"),
    ],
)
def test_text_is_kept_exactly_with_its_encoding(body: str, encoding: str, segments: str) -> None:
    event = inbound(tw.inbound_params(SID, body=body))
    assert event.message.text.body == body
    assert event.attributes["sms.encoding"] == encoding
    assert event.attributes["sms.segments"] == segments


@pytest.mark.parametrize(
    ("sender", "normalized"),
    [
        ("+447700900123", "+447700900123"),
        (" +1 415 555 0100 ", "+14155550100"),
        ("12345", "12345"),  # a short code
        ("ACME", "ACME"),  # an alphanumeric sender id
    ],
)
def test_sender_addresses(sender: str, normalized: str) -> None:
    event = inbound(tw.inbound_params(SID, From=sender))
    assert event.message.sender.address == normalized


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"MessageSid": ""}, "MessageSid"),
        ({"From": ""}, "From"),
        ({"From": "+1-not-a-number"}, "phone"),
        ({"To": ""}, "To"),
        ({"NumMedia": "two"}, "NumMedia"),
        ({"NumMedia": "2", "MediaUrl0": "https://x.example/1"}, "MediaUrl1"),
    ],
)
def test_malformed_inbound_is_a_bad_request(change: dict[str, str], reason: str) -> None:
    with pytest.raises(BadRequestError, match=reason):
        inbound({**tw.inbound_params(SID), **change})


# -- status callbacks ---------------------------------------------------------------------

STATUS_TABLE = [
    # (MessageStatus, ErrorCode, state, permanent)
    ("accepted", "", S.DELIVERY_STATE_QUEUED, False),
    ("queued", "", S.DELIVERY_STATE_QUEUED, False),
    ("sending", "", S.DELIVERY_STATE_QUEUED, False),
    ("sent", "", S.DELIVERY_STATE_SENT, False),
    ("delivered", "", S.DELIVERY_STATE_DELIVERED, False),
    ("read", "", S.DELIVERY_STATE_READ, False),
    ("canceled", "", S.DELIVERY_STATE_CANCELED, False),
    # 30003: unreachable handset - may work later; 30005: unknown destination.
    ("undelivered", "30003", S.DELIVERY_STATE_UNDELIVERED, False),
    ("undelivered", "30005", S.DELIVERY_STATE_UNDELIVERED, True),
    # 30007: carrier filtering; 30008: unknown error (transient by Twilio's advice).
    ("failed", "30007", S.DELIVERY_STATE_FAILED, True),
    ("failed", "30008", S.DELIVERY_STATE_FAILED, False),
]


def status(params: dict[str, str], message_id: str = "gw-msg-1") -> Event:
    return mapping.status_callback(
        MultiDict(params), account="main", message_id=message_id, raw=RAW, received_at=NOW
    )


@pytest.mark.parametrize(("provider_status", "error_code", "state", "permanent"), STATUS_TABLE)
def test_status_callbacks(
    provider_status: str, error_code: str, state: DeliveryState.ValueType, permanent: bool
) -> None:
    params = tw.status_params(SID, provider_status, error_code=error_code)
    if error_code:
        params["ErrorMessage"] = f"error {error_code}"
    event = status(params)
    assert event.type == "message.status"
    assert event.causation_id == "gw-msg-1"
    st = event.status
    assert st.state == state
    assert st.provider_status == provider_status
    assert st.provider_message_id == SID
    assert st.message_id == "gw-msg-1"
    assert st.reason_code == error_code
    assert st.reason == (f"error {error_code}" if error_code else "")
    assert st.permanent is permanent
    assert st.recipient == tw.CUSTOMER
    assert state in mapping.STATUS_MAP.values()


def test_every_status_callback_state_is_declared_in_the_manifest() -> None:
    assert set(mapping.STATUS_MAP.values()) <= set(SPEC.manifest.delivery_states)


def test_status_event_ids_tell_callbacks_apart_and_repeat_for_retries() -> None:
    ids = {status(tw.status_params(SID, s)).id for s in ("queued", "sent", "delivered")}
    assert len(ids) == 3
    assert status(tw.status_params(SID, "sent")).id in ids
    failed_a = status(tw.status_params(SID, "failed", error_code="30007")).id
    failed_b = status(tw.status_params(SID, "failed", error_code="30008")).id
    assert failed_a != failed_b


@pytest.mark.parametrize(
    ("sequence", "final"),
    [
        (["queued", "sent", "delivered"], S.DELIVERY_STATE_DELIVERED),
        (["queued", "sent", "undelivered"], S.DELIVERY_STATE_UNDELIVERED),
        (["queued", "failed"], S.DELIVERY_STATE_FAILED),
        (["queued", "sent", "delivered", "read"], S.DELIVERY_STATE_READ),
    ],
)
def test_mapped_sequences_fold_to_the_same_state_in_any_order(
    sequence: list[str], final: DeliveryState.ValueType
) -> None:
    states = [status(tw.status_params(SID, s)).status.state for s in sequence]
    assert fold(states) == final
    assert fold(reversed(states)) == final
    assert fold(states[1:] + states[:1]) == final


def test_segments_and_unknown_status() -> None:
    params = {**tw.status_params(SID, "sent"), "NumSegments": "3"}
    assert status(params).status.segments == 3
    with pytest.raises(BadRequestError, match="unknown MessageStatus"):
        status(tw.status_params(SID, "teleported"))
    with pytest.raises(BadRequestError, match="MessageSid"):
        status({k: v for k, v in tw.status_params(SID, "sent").items() if k != "MessageSid"})
