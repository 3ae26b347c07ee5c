"""Client side of ``channel-gateway send`` and ``channel-gateway trace``.

``trace`` answers an SRE's "where is message X?": the message's state and
every status with its time, provider status, reason, attempt, channel and the
trace id to look up in the tracing backend.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC

import grpc
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc import aio
from grpc_status import rpc_status

from gateway.api.v1.content_pb2 import Attachment, Text, TextFormat
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.gateway_service_pb2 import (
    ChannelIdentities,
    ChannelIdentity,
    GetMessageRequest,
    OutboundMessage,
    Recipient,
    SendMessageRequest,
    SendMessageResponse,
    StatusTransition,
    TimelineEntryKind,
)
from gateway.api.v1.gateway_service_pb2_grpc import GatewayServiceStub
from gateway.api.v1.message_pb2 import Message

S = DeliveryState
_GREEN, _YELLOW, _RED, _DIM, _BOLD, _RESET = (
    "\033[32m",
    "\033[33m",
    "\033[31m",
    "\033[2m",
    "\033[1m",
    "\033[0m",
)
_STATE_COLOR = {
    S.DELIVERY_STATE_ACCEPTED: _YELLOW,
    S.DELIVERY_STATE_QUEUED: _YELLOW,
    S.DELIVERY_STATE_SWITCHING_CHANNEL: _YELLOW,
    S.DELIVERY_STATE_SENT: _GREEN,
    S.DELIVERY_STATE_DELIVERED: _GREEN,
    S.DELIVERY_STATE_READ: _GREEN,
    S.DELIVERY_STATE_FAILED: _RED,
    S.DELIVERY_STATE_UNDELIVERED: _RED,
    S.DELIVERY_STATE_EXPIRED: _RED,
    S.DELIVERY_STATE_CANCELED: _RED,
}


class ClientError(Exception):
    """An RPC failed; the message is what a person needs to read."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def describe_error(error: aio.AioRpcError) -> str:
    """The status code, message and every field violation of a failed call."""
    lines = [f"{error.code().name}: {error.details()}"]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                lines.extend(f"  {v.field}: {v.description}" for v in bad.field_violations)
    return "\n".join(lines)


def state_name(state: int) -> str:
    """``DELIVERED`` for DELIVERY_STATE_DELIVERED."""
    return DeliveryState.Name(DeliveryState.ValueType(state)).removeprefix("DELIVERY_STATE_")


def build_send_request(
    *,
    to: Sequence[str],
    channel: str,
    provider: str = "",
    account: str = "",
    text: str = "",
    media: Sequence[str] = (),
    idempotency_key: str = "",
    correlation_id: str = "",
    conversation_id: str = "",
    metadata: Mapping[str, str] | None = None,
) -> SendMessageRequest:
    """A SendMessageRequest from command-line values.

    ``to`` items are ``address`` (on ``channel``) or ``channel:address``;
    several items are identities to fall back through, in order.
    """
    identities = []
    for item in to:
        chan, sep, address = item.partition(":")
        if not sep or chan.startswith("+"):
            chan, address = channel, item
        identities.append(
            ChannelIdentity(
                channel=chan,
                address=address,
                provider=provider if chan == channel else "",
                account=account if chan == channel else "",
            )
        )
    recipient = (
        Recipient(address=identities[0])
        if len(identities) == 1
        else Recipient(identities=ChannelIdentities(identities=identities))
    )
    message = Message(attachments=[Attachment(url=url) for url in media])
    if text or not media:
        message.text.CopyFrom(Text(body=text, format=TextFormat.TEXT_FORMAT_PLAIN))
    else:
        message.media.SetInParent()
    return SendMessageRequest(
        idempotency_key=idempotency_key or str(uuid.uuid4()),
        recipient=recipient,
        message=message,
        correlation_id=correlation_id,
        conversation_id=conversation_id,
        metadata=dict(metadata or {}),
    )


async def send(address: str, request: SendMessageRequest, *, timeout: float) -> SendMessageResponse:
    """Call SendMessage; ClientError with the violations when it fails."""
    async with aio.insecure_channel(address) as channel:
        stub = GatewayServiceStub(channel)
        try:
            return await stub.SendMessage(request, timeout=timeout)
        except aio.AioRpcError as exc:
            raise ClientError(describe_error(exc), exc.code()) from exc


async def get_message(address: str, message_id: str, *, timeout: float) -> OutboundMessage:
    """Call GetMessage; ClientError when it fails."""
    async with aio.insecure_channel(address) as channel:
        stub = GatewayServiceStub(channel)
        try:
            reply = await stub.GetMessage(GetMessageRequest(message_id=message_id), timeout=timeout)
        except aio.AioRpcError as exc:
            raise ClientError(describe_error(exc), exc.code()) from exc
        return reply.message


def trace_json(message: OutboundMessage) -> str:
    """The message and its timeline as JSON (proto field names, enums by name)."""
    return json.dumps(
        MessageToDict(message, preserving_proto_field_name=True), indent=2, sort_keys=True
    )


def _time(entry: StatusTransition) -> str:
    ts = entry.occurred_at if entry.HasField("occurred_at") else entry.recorded_at
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def trace_table(message: OutboundMessage, *, color: bool) -> str:
    """A person-readable timeline table (ANSI colours when ``color``)."""

    def paint(text: str, tint: str) -> str:
        return f"{tint}{text}{_RESET}" if color and tint else text

    state = state_name(message.state)
    head = [
        f"message   {message.message_id}",
        f"state     {paint(state, _STATE_COLOR.get(message.state, '') + (_BOLD if color else ''))}"
        + (f"  ({message.reason_code})" if message.reason_code else ""),
        f"to        {message.channel}.{message.provider} {message.recipient}"
        + (f"  attempt {message.attempt}" if message.attempt > 1 else ""),
        f"trace     {message.trace_id or '-'}",
    ]
    if message.correlation_id:
        head.append(f"corr.     {message.correlation_id}")
    if message.late_delivery:
        head.append(
            paint("late delivery on a channel given up on: suppress the duplicate", _YELLOW)
        )
    columns = ("TIME (UTC)", "STATE", "PROVIDER STATUS", "REASON", "ATT", "CHANNEL", "TRACE ID")
    rows = []
    for entry in message.timeline:
        reason = " ".join(p for p in (entry.reason_code, entry.reason) if p)
        note = ""
        if entry.kind == TimelineEntryKind.TIMELINE_ENTRY_KIND_ATTEMPT:
            note = " (not applied)"
        elif entry.kind == TimelineEntryKind.TIMELINE_ENTRY_KIND_LATE_DELIVERY:
            note = " (late)"
        rows.append(
            (
                _time(entry),
                state_name(entry.state) + note,
                entry.provider_status or "-",
                (reason[:40] + "…") if len(reason) > 41 else (reason or "-"),
                str(entry.attempt or "-"),
                f"{entry.channel}.{entry.provider}" if entry.channel else "-",
                entry.trace_id or "-",
            )
        )
    widths = [
        max(len(columns[i]), *(len(r[i]) for r in rows)) if rows else len(columns[i])
        for i in range(len(columns))
    ]
    lines = [*head, ""]
    lines.append(paint("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), _BOLD))
    for row, entry in zip(rows, message.timeline, strict=True):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        if entry.kind == TimelineEntryKind.TIMELINE_ENTRY_KIND_TRANSITION:
            cells[1] = paint(cells[1], _STATE_COLOR.get(entry.state, ""))
            lines.append("  ".join(cells))
        else:
            lines.append(paint("  ".join(cells), _DIM))
    if not rows:
        lines.append("(no status recorded yet)")
    return "\n".join(lines)
