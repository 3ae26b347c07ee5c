"""Vonage payloads <-> gateway.api.v1: pure functions, no I/O.

SMS API webhooks (flat string parameters):
https://developer.vonage.com/en/messaging/sms/guides/inbound-sms
https://developer.vonage.com/en/messaging/sms/guides/delivery-receipts
Messages API webhooks (JSON, channel "sms"):
https://developer.vonage.com/en/api/messages#webhooks
https://developer.vonage.com/en/messages/concepts/messages-status-callbacks
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from connectors.sms.addresses import sms_address
from connectors.sms.encoding import attributes as encoding_attributes
from gateway.api.v1.content_pb2 import Text, TextFormat
from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.api.v1.message_pb2 import Direction, Message
from gateway.api.v1.participant_pb2 import Participant, ParticipantRole
from gateway.contract import BadRequestError, inbound_event_id
from gateway.contract.ids import conversation_id
from gateway.contract.times import timestamp

PROVIDER = "vonage"
CHANNEL = "sms"

S = DeliveryState

#: SMS API delivery receipt ``status`` -> canonical state.
DLR_STATUS_MAP: Mapping[str, DeliveryState.ValueType] = {
    # The downstream carrier took the message: as far as anyone knows, it is sent.
    "accepted": S.DELIVERY_STATE_SENT,
    "buffered": S.DELIVERY_STATE_SENT,
    "unknown": S.DELIVERY_STATE_SENT,
    "delivered": S.DELIVERY_STATE_DELIVERED,
    "expired": S.DELIVERY_STATE_EXPIRED,
    "failed": S.DELIVERY_STATE_FAILED,
    "rejected": S.DELIVERY_STATE_FAILED,
}

#: Messages API status webhook ``status`` -> canonical state.
MESSAGES_STATUS_MAP: Mapping[str, DeliveryState.ValueType] = {
    # Passed on to the carrier; for SMS this is also the chargeable event.
    "submitted": S.DELIVERY_STATE_SENT,
    "delivered": S.DELIVERY_STATE_DELIVERED,
    "read": S.DELIVERY_STATE_READ,
    "rejected": S.DELIVERY_STATE_FAILED,
    # Vonage could not reach the downstream provider (an outage, not the number).
    "undeliverable": S.DELIVERY_STATE_UNDELIVERED,
}

#: Messages API error code of a message whose TTL ran out before delivery (SMS
#: "expired" receipts are reported as "rejected" with this code).
TTL_EXPIRED_CODE = "1360"

#: DLR ``err-code`` meanings (Vonage support article 204014733).
DLR_ERROR_TEXT: Mapping[str, str] = {
    "1": "Unknown",
    "2": "Absent Subscriber - Temporary",
    "3": "Absent Subscriber - Permanent",
    "4": "Call Barred by User",
    "5": "Portability Error",
    "6": "Anti-Spam Rejection",
    "7": "Handset Busy",
    "8": "Network Error",
    "9": "Illegal Number",
    "10": "Illegal Message",
    "11": "Unroutable",
    "12": "Destination Unreachable",
    "13": "Subscriber Age Restriction",
    "14": "Number Blocked by Carrier",
    "15": "Pre-Paid - Insufficient Funds",
    "99": "General Error",
}

#: DLR error codes Vonage documents as "retry": a later send may succeed.
TRANSIENT_DLR_ERROR_CODES = frozenset({"2", "7", "8"})

_FAILURES = frozenset({S.DELIVERY_STATE_FAILED, S.DELIVERY_STATE_EXPIRED})
INBOUND_TYPES = frozenset({"text", "unicode", "binary"})
#: Digits (a "+" tolerated) or an alphanumeric sender id.
_VONAGE_ADDRESS = re.compile(r"^(\+?[0-9]+|[A-Za-z0-9 ]+)$")


def _required(params: Mapping[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequestError(f"missing parameter {name}")
    return value


def vonage_address(raw: str) -> str:
    """A Vonage number (international digits, no ``+``) or sender id, normalized.

    Vonage writes numbers as bare digits; anything with other characters is
    not something Vonage sent, and is rejected rather than cleaned up into a
    different number.
    """
    if not _VONAGE_ADDRESS.match(raw):
        raise BadRequestError(f"unparsable phone number {raw!r}", code="invalid_phone")
    return sms_address(raw)


def _address(value: Any, name: str) -> str:
    # Messages API v1 sends plain strings; v0.1 sent {"type": "sms", "number": ...}.
    if isinstance(value, Mapping):
        value = value.get("number")
    if not isinstance(value, str) or not value:
        raise BadRequestError(f"missing parameter {name}")
    return vonage_address(value)


def _sms_time(value: str, name: str) -> datetime:
    """``YYYY-MM-DD HH:MM:SS`` in UTC, as the SMS API writes ``message-timestamp``."""
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError as exc:
        raise BadRequestError(f"malformed {name}: {value!r}") from exc


def _iso_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequestError(f"malformed timestamp: {value!r}") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _scts(value: str) -> datetime | None:
    """A DLR ``scts`` (``YYMMDDHHMM``, the carrier's time); None when absent or odd."""
    try:
        return datetime.strptime(value, "%y%m%d%H%M").replace(tzinfo=UTC)
    except ValueError:
        # Carriers fill this field inconsistently; message-timestamp is the fallback.
        return None


def _participant(address: str, role: ParticipantRole.ValueType) -> Participant:
    return Participant(channel=CHANNEL, address=address, role=role)


def _inbound_event(
    *,
    event_id: str,
    account: str,
    sender: str,
    recipient: str,
    provider_message_id: str,
    body: str | None,
    occurred_at: datetime,
    received_at: datetime,
    raw: RawPayload,
) -> Event:
    message = Message(
        direction=Direction.DIRECTION_INBOUND,
        sender=_participant(sender, ParticipantRole.PARTICIPANT_ROLE_CUSTOMER),
        recipients=[_participant(recipient, ParticipantRole.PARTICIPANT_ROLE_BUSINESS)],
        provider_message_id=provider_message_id,
    )
    if body is not None:
        message.text.CopyFrom(Text(body=body, format=TextFormat.TEXT_FORMAT_PLAIN))
    event = Event(
        id=event_id,
        type="message.received",
        channel=CHANNEL,
        provider=PROVIDER,
        account=account,
        received_at=timestamp(received_at),
        occurred_at=timestamp(occurred_at),
        conversation_id=conversation_id(CHANNEL, recipient, sender),
        raw=raw,
        message=message,
    )
    if body:
        event.attributes.update(encoding_attributes(body))
    return event


def inbound_sms(
    params: Mapping[str, str], *, account: str, raw: RawPayload, received_at: datetime
) -> Event:
    """The ``message.received`` event of one SMS API inbound webhook.

    A concatenated message arrives as one webhook per part, each with its own
    ``messageId``; every part is its own event (ids derived from that
    ``messageId``) carrying ``sms.concat_*`` attributes and ``sequence`` = the
    part number, so a consumer can reassemble the parts by ``concat-ref``.
    """
    message_id = _required(params, "messageId")
    sender = vonage_address(_required(params, "msisdn"))
    recipient = vonage_address(_required(params, "to"))
    sms_type = params.get("type", "text") or "text"
    if sms_type not in INBOUND_TYPES:
        raise BadRequestError(f"unknown message type {sms_type!r}")
    stamp = params.get("message-timestamp", "")
    occurred_at = _sms_time(stamp, "message-timestamp") if stamp else received_at
    event = _inbound_event(
        event_id=inbound_event_id(PROVIDER, account, "message", message_id),
        account=account,
        sender=sender,
        recipient=recipient,
        provider_message_id=message_id,
        # A binary SMS has no text; its payload rides in attributes and raw.
        body=None if sms_type == "binary" else params.get("text", ""),
        occurred_at=occurred_at,
        received_at=received_at,
        raw=raw,
    )
    event.attributes["vonage.type"] = sms_type
    for name, key in (
        ("keyword", "sms.keyword"),
        ("data", "vonage.data"),
        ("udh", "vonage.udh"),
        ("api-key", "vonage.api_key"),
    ):
        if params.get(name):
            event.attributes[key] = params[name]
    if params.get("concat", "").lower() == "true":
        _concat(params, event)
    return event


def _concat(params: Mapping[str, str], event: Event) -> None:
    ref = _required(params, "concat-ref")
    total = _required(params, "concat-total")
    part = _required(params, "concat-part")
    if not (total.isdigit() and part.isdigit()) or not 1 <= int(part) <= int(total):
        raise BadRequestError(f"bad concat-part/concat-total: {part!r}/{total!r}")
    event.sequence = int(part)
    event.attributes.update(
        {"sms.concat_ref": ref, "sms.concat_total": total, "sms.concat_part": part}
    )


def delivery_receipt(
    params: Mapping[str, str], *, account: str, raw: RawPayload, received_at: datetime
) -> Event:
    """The ``message.status`` event of an SMS API delivery receipt (DLR).

    ``msisdn`` is the recipient; ``to`` is the sender id we used. ``client-ref``
    is the gateway's message id when the message was sent with one.
    """
    # Older receipts spell it "message-id".
    message_id = params.get("messageId") or _required(params, "message-id")
    provider_status = _required(params, "status").lower()
    state = DLR_STATUS_MAP.get(provider_status)
    if state is None:
        raise BadRequestError(f"unknown DLR status {provider_status!r}")
    error_code = params.get("err-code", "")
    if error_code == "0":
        error_code = ""
    gateway_id = params.get("client-ref", "")
    status = DeliveryStatus(
        state=state,
        provider_status=provider_status,
        reason_code=error_code,
        reason=DLR_ERROR_TEXT.get(error_code, ""),
        permanent=state in _FAILURES and error_code not in TRANSIENT_DLR_ERROR_CODES,
        provider_message_id=message_id,
        message_id=gateway_id,
        attempt=1,
        recipient=vonage_address(params["msisdn"]) if params.get("msisdn") else "",
    )
    stamp = params.get("message-timestamp", "")
    occurred_at = (
        _scts(params.get("scts", ""))
        or (_sms_time(stamp, "message-timestamp") if stamp else None)
        or received_at
    )
    event = Event(
        id=inbound_event_id(
            PROVIDER, account, "dlr", message_id, provider_status, error_code or "-"
        ),
        type="message.status",
        channel=CHANNEL,
        provider=PROVIDER,
        account=account,
        received_at=timestamp(received_at),
        occurred_at=timestamp(occurred_at),
        causation_id=gateway_id,
        raw=raw,
        status=status,
    )
    for name, key in (
        ("network-code", "sms.network_code"),
        ("price", "vonage.price"),
        ("api-key", "vonage.api_key"),
    ):
        if params.get(name):
            event.attributes[key] = params[name]
    return event


def _check_channel(body: Mapping[str, Any]) -> None:
    # The channel is in every documented payload; a webhook of another channel
    # (the same application may also serve WhatsApp) is not ours to map.
    channel = body.get("channel", CHANNEL)
    if channel != CHANNEL:
        raise BadRequestError(f"not an SMS webhook (channel {channel!r})")


def _usage(body: Mapping[str, Any], event: Event) -> None:
    usage = body.get("usage")
    if isinstance(usage, Mapping):
        for name in ("price", "currency"):
            if usage.get(name) is not None:
                event.attributes[f"vonage.{name}"] = str(usage[name])


def messages_inbound(
    body: Mapping[str, Any], *, account: str, raw: RawPayload, received_at: datetime
) -> Event:
    """The ``message.received`` event of a Messages API inbound SMS webhook."""
    _check_channel(body)
    message_uuid = _required(body, "message_uuid")
    text = body.get("text", "")
    if not isinstance(text, str):
        raise BadRequestError("text is not a string")
    event = _inbound_event(
        event_id=inbound_event_id(PROVIDER, account, "message", message_uuid),
        account=account,
        sender=_address(body.get("from"), "from"),
        recipient=_address(body.get("to"), "to"),
        provider_message_id=message_uuid,
        body=text,
        occurred_at=_iso_time(body.get("timestamp")) or received_at,
        received_at=received_at,
        raw=raw,
    )
    sms = body.get("sms")
    if isinstance(sms, Mapping):
        for name, key in (("num_messages", "sms.provider_segments"), ("keyword", "sms.keyword")):
            if sms.get(name) is not None:
                event.attributes[key] = str(sms[name])
    _usage(body, event)
    return event


def _error_code(error: Mapping[str, Any]) -> str:
    # {"type": "https://developer.vonage.com/api-errors/messages#1320", "title": "..."}:
    # the fragment of the type URL is the stable code; some payloads put it in title.
    kind = error.get("type")
    if isinstance(kind, str) and "#" in kind:
        return kind.rsplit("#", 1)[1]
    title = error.get("title")
    if isinstance(title, int) or (isinstance(title, str) and title.isdigit()):
        return str(title)
    return ""


def messages_status(
    body: Mapping[str, Any], *, account: str, raw: RawPayload, received_at: datetime
) -> Event:
    """The ``message.status`` event of a Messages API status webhook.

    ``client_ref`` carries the gateway's message id (set on send).
    """
    _check_channel(body)
    message_uuid = _required(body, "message_uuid")
    provider_status = _required(body, "status").lower()
    state = MESSAGES_STATUS_MAP.get(provider_status)
    if state is None:
        raise BadRequestError(f"unknown status {provider_status!r}")
    error = body.get("error")
    error = error if isinstance(error, Mapping) else {}
    code = _error_code(error)
    if state == S.DELIVERY_STATE_FAILED and code == TTL_EXPIRED_CODE:
        state = S.DELIVERY_STATE_EXPIRED
    reason = error.get("detail") or error.get("title") or ""
    gateway_id = body.get("client_ref")
    gateway_id = gateway_id if isinstance(gateway_id, str) else ""
    status = DeliveryStatus(
        state=state,
        provider_status=provider_status,
        reason_code=code,
        reason=str(reason)[:500],
        # "rejected" is Vonage or the carrier refusing this message; "undeliverable"
        # is an outage on the way, which a later send may get past.
        permanent=state in _FAILURES,
        provider_message_id=message_uuid,
        message_id=gateway_id,
        attempt=1,
        recipient=_address(body["to"], "to") if body.get("to") else "",
    )
    sms = body.get("sms")
    if isinstance(sms, Mapping) and str(sms.get("count_total", "")).isdigit():
        status.segments = int(str(sms["count_total"]))
    event = Event(
        id=inbound_event_id(
            PROVIDER, account, "status", message_uuid, provider_status, code or "-"
        ),
        type="message.status",
        channel=CHANNEL,
        provider=PROVIDER,
        account=account,
        received_at=timestamp(received_at),
        occurred_at=timestamp(_iso_time(body.get("timestamp")) or received_at),
        causation_id=gateway_id,
        raw=raw,
        status=status,
    )
    destination = body.get("destination")
    if isinstance(destination, Mapping) and destination.get("network_code"):
        event.attributes["sms.network_code"] = str(destination["network_code"])
    _usage(body, event)
    return event
