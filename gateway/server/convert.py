"""Ledger records -> protobuf messages of the gRPC API."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.delivery_pb2 import DeliveryState as State
from gateway.api.v1.gateway_service_pb2 import (
    DeliveryAttempt,
    FallbackPolicy,
    FallbackStep,
    OutboundMessage,
    StatusTransition,
    TimelineEntryKind,
)
from gateway.contract.times import timestamp as timestamp_of
from gateway.ledger.models import EntryKind, MessageRecord, StatusEntry
from gateway.ledger.models import FallbackPolicy as LedgerPolicy

_KINDS = {
    EntryKind.TRANSITION: TimelineEntryKind.TIMELINE_ENTRY_KIND_TRANSITION,
    EntryKind.ATTEMPT: TimelineEntryKind.TIMELINE_ENTRY_KIND_ATTEMPT,
    EntryKind.LATE_DELIVERY: TimelineEntryKind.TIMELINE_ENTRY_KIND_LATE_DELIVERY,
}


def timestamp(value: datetime | None) -> Timestamp | None:
    """A Timestamp of an aware or UTC-naive datetime (None stays None)."""
    if value is None:
        return None
    return timestamp_of(value)


def _policy(policy: LedgerPolicy) -> FallbackPolicy:
    out = FallbackPolicy()
    for step in policy.steps:
        wait = Duration()
        wait.FromTimedelta(step.wait)
        out.steps.append(
            FallbackStep(
                channel=step.channel,
                provider=step.provider,
                success_state=State.ValueType(step.success_state),
                wait=wait,
            )
        )
    if policy.ttl is not None:
        out.ttl.FromTimedelta(policy.ttl)
    return out


def entry(item: StatusEntry) -> StatusTransition:
    """One timeline entry."""
    out = StatusTransition(
        state=State.ValueType(item.state),
        provider_status=item.provider_status,
        reason_code=item.reason_code,
        reason=item.reason,
        permanent=item.permanent,
        attempt=item.attempt,
        channel=item.channel,
        provider=item.provider,
        provider_message_id=item.provider_message_id,
        trace_id=item.trace_id,
        event_id=item.event_id,
        kind=_KINDS.get(item.kind, TimelineEntryKind.TIMELINE_ENTRY_KIND_UNSPECIFIED),
        sequence=item.seq,
    )
    if (occurred := timestamp(item.occurred_at)) is not None:
        out.occurred_at.CopyFrom(occurred)
    if (recorded := timestamp(item.recorded_at)) is not None:
        out.recorded_at.CopyFrom(recorded)
    return out


def outbound_message(record: MessageRecord, *, with_timeline: bool) -> OutboundMessage:
    """A ledger record as the API's OutboundMessage."""
    out = OutboundMessage(
        message_id=record.message_id,
        idempotency_key=record.idempotency_key,
        state=State.ValueType(record.state),
        channel=record.channel,
        provider=record.provider,
        recipient=record.address,
        correlation_id=record.correlation_id,
        conversation_id=record.conversation_id,
        metadata=dict(record.metadata),
        attempt=record.attempt,
        provider_message_id=record.provider_message_id,
        trace_id=record.trace_id,
        fallback_active=record.fallback_active,
        reason_code=record.reason_code,
        reason=record.reason,
        late_delivery=record.late_delivery,
    )
    if record.command:
        command = SendMessageCommand()
        try:
            command.ParseFromString(record.command)
        except DecodeError:
            # The command was validated when stored; a record that cannot be
            # decoded is still worth showing without its content.
            pass
        else:
            out.account = command.account
            out.message.CopyFrom(command.message)
    for name in ("created_at", "updated_at", "expires_at"):
        if (value := timestamp(getattr(record, name))) is not None:
            getattr(out, name).CopyFrom(value)
    if record.fallback is not None:
        out.fallback.CopyFrom(_policy(record.fallback))
    if with_timeline:
        for attempt in record.attempts:
            item = DeliveryAttempt(
                attempt=attempt.attempt,
                channel=attempt.channel,
                provider=attempt.provider,
                recipient=attempt.address,
                state=State.ValueType(attempt.state),
                provider_message_id=attempt.provider_message_id,
                dispatched=attempt.dispatched,
            )
            if (created := timestamp(attempt.created_at)) is not None:
                item.created_at.CopyFrom(created)
            out.attempts.append(item)
        out.timeline.extend(entry(e) for e in record.timeline)
    return out
