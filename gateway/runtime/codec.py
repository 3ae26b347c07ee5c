"""Protobuf <-> AMQP: bodies, routing keys, CloudEvents headers, trace context.

Every message is ``application/protobuf`` with AMQP ``type`` = the proto full
name and ``message_id`` = the event or command id. CloudEvents attributes go in
headers with the ``cloudEvents_`` prefix (the AMQP protocol binding), so a
CloudEvents-aware consumer reads them without knowing our proto.
"""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from gateway.api.v1.call_pb2 import CallCommand
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract.errors import BadRequestError
from gateway.contract.times import to_datetime
from gateway.runtime.bus import Delivery, HeaderValue, OutgoingMessage
from gateway.runtime.telemetry import inject_trace_headers
from gateway.runtime.topology import call_command_routing_key, command_routing_key

CONTENT_TYPE = "application/protobuf"
EVENT_TYPE_NAME = Event.DESCRIPTOR.full_name
COMMAND_TYPE_NAME = SendMessageCommand.DESCRIPTOR.full_name
CALL_COMMAND_TYPE_NAME = CallCommand.DESCRIPTOR.full_name
CE_PREFIX = "cloudEvents_"
#: CloudEvents ``type`` prefix: reverse-DNS of the project plus the event type.
CE_TYPE_PREFIX = "io.channelgateway."

_Message = TypeVar("_Message", bound=Message)


def event_routing_key(event: Event) -> str:
    """``<event type>.<channel>.<provider>``, e.g. ``message.received.sms.twilio``."""
    return f"{event.type}.{event.channel}.{event.provider}"


# The header names, built once (they are written on every message).
_CE_SPECVERSION = f"{CE_PREFIX}specversion"
_CE_ID = f"{CE_PREFIX}id"
_CE_SOURCE = f"{CE_PREFIX}source"
_CE_TYPE = f"{CE_PREFIX}type"
_CE_DATACONTENTTYPE = f"{CE_PREFIX}datacontenttype"
_CE_TIME = f"{CE_PREFIX}time"
_CE_CORRELATIONID = f"{CE_PREFIX}correlationid"
_CE_SEQUENCE = f"{CE_PREFIX}sequence"


def _ce_headers(
    *, id: str, source: str, type: str, time: datetime | None, correlation_id: str, sequence: int
) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = {
        _CE_SPECVERSION: "1.0",
        _CE_ID: id,
        _CE_SOURCE: source,
        _CE_TYPE: CE_TYPE_PREFIX + type,
        _CE_DATACONTENTTYPE: CONTENT_TYPE,
    }
    if time is not None:
        headers[_CE_TIME] = time.isoformat().replace("+00:00", "Z")
    if correlation_id:
        headers[_CE_CORRELATIONID] = correlation_id
    if sequence:
        headers[_CE_SEQUENCE] = str(sequence)
    return headers


def encode_event(event: Event) -> OutgoingMessage:
    """An event as a persistent AMQP message with CloudEvents and trace headers.

    The current trace context is injected, and also stored in the event
    (``traceparent``) so it survives re-publishing through other transports.
    """
    time = to_datetime(event.occurred_at) if event.HasField("occurred_at") else None
    headers = _ce_headers(
        id=event.id,
        source=f"/channel-gateway/{event.channel}/{event.provider}/{event.account}",
        type=event.type,
        time=time,
        correlation_id=event.correlation_id,
        sequence=event.sequence,
    )
    inject_trace_headers(headers)
    if not event.traceparent and isinstance(headers.get("traceparent"), str):
        event.traceparent = str(headers["traceparent"])
    return OutgoingMessage(
        body=event.SerializeToString(),
        message_id=event.id,
        type=EVENT_TYPE_NAME,
        headers=headers,
        timestamp=time,
        correlation_id=event.correlation_id or None,
    )


def _command_message(
    command: SendMessageCommand | CallCommand, *, id: str, kind: str, message_id: str
) -> OutgoingMessage:
    """A command from the gateway as a persistent AMQP message with CloudEvents
    (type ``command.<kind>.<channel>``) and trace headers."""
    created = to_datetime(command.created_at) if command.HasField("created_at") else None
    headers = _ce_headers(
        id=id,
        source="/channel-gateway/gateway",
        type=f"command.{kind}.{command.channel}",
        time=created,
        correlation_id=command.correlation_id,
        sequence=0,
    )
    inject_trace_headers(headers)
    return OutgoingMessage(
        body=command.SerializeToString(),
        message_id=message_id,
        type=command.DESCRIPTOR.full_name,
        headers=headers,
        timestamp=created,
        correlation_id=command.correlation_id or None,
    )


def encode_command(command: SendMessageCommand) -> tuple[str, OutgoingMessage]:
    """A send command and its routing key on ``channels.commands``."""
    message = _command_message(
        command,
        id=command.message_id,
        kind="send",
        # One message id per attempt: a retry is a new command.
        message_id=f"{command.message_id}:{command.attempt or 1}",
    )
    return command_routing_key(command.channel, command.provider), message


def _parse(delivery: Delivery, message: _Message, what: str) -> _Message:
    """``message`` parsed from the delivery's body, after its AMQP type and
    content type are checked; anything off is a BadRequestError (dead-lettered)."""
    expected = message.DESCRIPTOR.full_name
    if delivery.type and delivery.type != expected:
        raise BadRequestError(f"expected AMQP type {expected}, got {delivery.type}")
    if delivery.content_type and delivery.content_type != CONTENT_TYPE:
        raise BadRequestError(f"expected content type {CONTENT_TYPE}, got {delivery.content_type}")
    try:
        message.ParseFromString(delivery.body)
    except DecodeError as exc:
        raise BadRequestError(f"undecodable {what} body: {exc}") from exc
    return message


def decode_event(delivery: Delivery) -> Event:
    """The event in a delivery; a malformed body is a BadRequestError (dead-lettered)."""
    return _parse(delivery, Event(), "event")


def decode_command(delivery: Delivery) -> SendMessageCommand:
    """The send command in a delivery; a malformed body is a BadRequestError."""
    command = _parse(delivery, SendMessageCommand(), "command")
    if not command.message_id or not command.channel or not command.provider:
        raise BadRequestError("command lacks message_id, channel or provider")
    return command


def encode_call_command(command: CallCommand) -> tuple[str, OutgoingMessage]:
    """A call command and its routing key on ``channels.commands``."""
    message = _command_message(
        command, id=command.command_id, kind="call", message_id=command.command_id
    )
    return call_command_routing_key(command.channel, command.provider), message


def decode_call_command(delivery: Delivery) -> CallCommand:
    """The call command in a delivery; a malformed or action-less body is a BadRequestError."""
    command = _parse(delivery, CallCommand(), "call command")
    if not command.command_id or not command.channel or not command.provider:
        raise BadRequestError("call command lacks command_id, channel or provider")
    if command.WhichOneof("action") is None:
        raise BadRequestError("call command names no action")
    return command
