"""Twilio payloads <-> gateway.api.v1: pure functions, no I/O.

Inbound message webhook and status callback parameters:
https://www.twilio.com/docs/messaging/guides/webhook-request
https://www.twilio.com/docs/messaging/guides/track-outbound-message-status
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from multidict import MultiMapping

from connectors.sms.addresses import sms_address
from connectors.sms.encoding import attributes as encoding_attributes
from gateway.api.v1.content_pb2 import Attachment, MediaKind, TextFormat
from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.api.v1.message_pb2 import Direction
from gateway.api.v1.participant_pb2 import ParticipantRole
from gateway.contract import BadRequestError, inbound_event_id
from gateway.contract.ids import conversation_id
from gateway.contract.times import set_timestamp, timestamp

PROVIDER = "twilio"
CHANNEL = "sms"
FORM = "application/x-www-form-urlencoded"

S = DeliveryState
#: Twilio MessageStatus -> canonical state.
STATUS_MAP: Mapping[str, DeliveryState.ValueType] = {
    "accepted": S.DELIVERY_STATE_QUEUED,
    "scheduled": S.DELIVERY_STATE_QUEUED,
    "queued": S.DELIVERY_STATE_QUEUED,
    "sending": S.DELIVERY_STATE_QUEUED,
    "sent": S.DELIVERY_STATE_SENT,
    # The carrier did not confirm delivery: as far as anyone knows, it is sent.
    "delivery_unknown": S.DELIVERY_STATE_SENT,
    "partially_delivered": S.DELIVERY_STATE_SENT,
    "delivered": S.DELIVERY_STATE_DELIVERED,
    "read": S.DELIVERY_STATE_READ,
    "undelivered": S.DELIVERY_STATE_UNDELIVERED,
    "failed": S.DELIVERY_STATE_FAILED,
    "canceled": S.DELIVERY_STATE_CANCELED,
}

#: Error codes after which a later retry may succeed (handset off, congestion).
TRANSIENT_ERROR_CODES = frozenset({"30001", "30003", "30008", "30009", "30017"})

# Enum values looked up once: the wrappers' attribute access is slow.
_INBOUND = Direction.DIRECTION_INBOUND
_CUSTOMER = ParticipantRole.PARTICIPANT_ROLE_CUSTOMER
_BUSINESS = ParticipantRole.PARTICIPANT_ROLE_BUSINESS
_PLAIN = TextFormat.TEXT_FORMAT_PLAIN

_MEDIA_KINDS = {
    "image": MediaKind.MEDIA_KIND_IMAGE,
    "audio": MediaKind.MEDIA_KIND_AUDIO,
    "video": MediaKind.MEDIA_KIND_VIDEO,
}


def media_kind(content_type: str) -> MediaKind.ValueType:
    """The media kind of a MIME type (anything unknown is a document)."""
    return _MEDIA_KINDS.get(content_type.split("/", 1)[0].lower(), MediaKind.MEDIA_KIND_DOCUMENT)


def _required(params: MultiMapping[str], name: str) -> str:
    value = params.get(name, "")
    if not value:
        raise BadRequestError(f"missing parameter {name}")
    return value


def attachments(params: MultiMapping[str]) -> list[Attachment]:
    """Every ``MediaUrlN`` / ``MediaContentTypeN`` pair, in order (never only the first)."""
    raw_count = params.get("NumMedia", "0") or "0"
    if not raw_count.isdigit():
        raise BadRequestError(f"NumMedia is not a number: {raw_count!r}")
    items = []
    for i in range(int(raw_count)):
        url = params.get(f"MediaUrl{i}")
        if not url:
            raise BadRequestError(f"NumMedia={raw_count} but MediaUrl{i} is missing")
        items.append(Attachment(url=url, content_type=params.get(f"MediaContentType{i}", "")))
    return items


def inbound_message(
    params: MultiMapping[str], *, account: str, raw: RawPayload, received_at: datetime
) -> Event:
    """The ``message.received`` event of an inbound SMS/MMS webhook."""
    sid = _required(params, "MessageSid")
    sender = sms_address(_required(params, "From"))
    recipient = sms_address(_required(params, "To"))
    body = params.get("Body", "")
    media = attachments(params)
    # Filled in place: building each sub-message and copying it in costs
    # about twice as much, on every inbound webhook.
    event = Event(
        id=inbound_event_id(PROVIDER, account, "message", sid),
        type="message.received",
        channel=CHANNEL,
        provider=PROVIDER,
        account=account,
        conversation_id=conversation_id(CHANNEL, recipient, sender),
    )
    set_timestamp(event.received_at, received_at)
    event.occurred_at.CopyFrom(event.received_at)
    event.raw.CopyFrom(raw)
    message = event.message
    message.direction = _INBOUND
    message.provider_message_id = sid
    message.sender.channel = CHANNEL
    message.sender.address = sender
    message.sender.role = _CUSTOMER
    message.recipients.add(channel=CHANNEL, address=recipient, role=_BUSINESS)
    message.attachments.extend(media)
    if body or not media:
        message.text.body = body
        message.text.format = _PLAIN
    else:
        message.media.kind = media_kind(media[0].content_type)
    if body:
        event.attributes.update(encoding_attributes(body))
    for name, key in (
        ("NumSegments", "sms.provider_segments"),
        ("MessagingServiceSid", "twilio.messaging_service_sid"),
    ):
        if params.get(name):
            event.attributes[key] = params[name]
    return event


def status_callback(
    params: MultiMapping[str],
    *,
    account: str,
    message_id: str,
    raw: RawPayload,
    received_at: datetime,
) -> Event:
    """The ``message.status`` event of a status callback.

    ``message_id`` is the gateway's id, carried in the StatusCallback URL we
    gave Twilio (empty for messages sent outside the gateway).
    """
    sid = _required(params, "MessageSid")
    provider_status = _required(params, "MessageStatus").lower()
    state = STATUS_MAP.get(provider_status)
    if state is None:
        raise BadRequestError(f"unknown MessageStatus {provider_status!r}")
    error_code = params.get("ErrorCode", "")
    failed = state in (S.DELIVERY_STATE_FAILED, S.DELIVERY_STATE_UNDELIVERED)
    status = DeliveryStatus(
        state=state,
        provider_status=provider_status,
        reason_code=error_code,
        reason=params.get("ErrorMessage", ""),
        permanent=failed and error_code not in TRANSIENT_ERROR_CODES,
        provider_message_id=sid,
        message_id=message_id,
        attempt=1,
        recipient=sms_address(params["To"]) if params.get("To") else "",
    )
    if params.get("NumSegments", "").isdigit():
        status.segments = int(params["NumSegments"])
    return Event(
        id=inbound_event_id(PROVIDER, account, "status", sid, provider_status, error_code or "-"),
        type="message.status",
        channel=CHANNEL,
        provider=PROVIDER,
        account=account,
        received_at=timestamp(received_at),
        occurred_at=timestamp(received_at),
        causation_id=message_id,
        raw=raw,
        status=status,
    )
