"""Row-level helpers of the ledger: reading and writing messages, attempts and
timeline entries inside a caller's transaction, and building records.

Datetimes are stored naive in UTC (see :mod:`gateway.ledger.schema`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.participant_pb2 import Participant, ParticipantRole
from gateway.contract.ids import NAMESPACE
from gateway.ledger import schema
from gateway.ledger.models import (
    Attempt,
    EntryKind,
    FallbackPolicy,
    MessageRecord,
    StatusEntry,
    StatusUpdate,
    as_utc,
)

S = DeliveryState


def db_time(value: datetime) -> datetime:
    """Naive UTC, as stored."""
    return as_utc(value).replace(tzinfo=None)


def out_time(value: datetime) -> datetime:
    """A stored (naive UTC) datetime as aware UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def opt_out_time(value: datetime | None) -> datetime | None:
    """:func:`out_time` for an optional value."""
    return None if value is None else out_time(value)


def status_event_id(update: StatusUpdate) -> str:
    """The update's event id, or a deterministic one derived from its content."""
    if update.event_id:
        return update.event_id
    occurred = as_utc(update.occurred_at).isoformat() if update.occurred_at else ""
    name = "\x1f".join(
        (
            "ledger-status",
            update.message_id,
            update.provider_message_id,
            str(update.state),
            update.provider_status,
            update.reason_code,
            str(update.attempt),
            update.channel,
            update.provider,
            occurred,
        )
    )
    return str(uuid.uuid5(NAMESPACE, name))


def gateway_event_id(message_id: str, kind: str, attempt: int, state: int) -> str:
    """Deterministic id of a status the gateway itself records (switch, exhaustion ...)."""
    return str(uuid.uuid5(NAMESPACE, f"ledger\x1f{kind}\x1f{message_id}\x1f{attempt}\x1f{state}"))


def update_to_json(update: StatusUpdate) -> str:
    """A status update as JSON (how pending statuses are stored)."""
    data = asdict(update)
    data["occurred_at"] = as_utc(update.occurred_at).isoformat() if update.occurred_at else None
    return json.dumps(data)


def update_from_json(text: str) -> StatusUpdate:
    """Inverse of :func:`update_to_json`."""
    data: dict[str, Any] = json.loads(text)
    occurred = data.pop("occurred_at", None)
    return StatusUpdate(**data, occurred_at=datetime.fromisoformat(occurred) if occurred else None)


async def insert_ignore(conn: AsyncConnection, table: Any, values: Mapping[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when the row was inserted."""
    insert = pg_dialect.insert if conn.dialect.name == "postgresql" else sqlite_dialect.insert
    # Parameters passed separately: the statement's compiled form is cached.
    stmt = insert(table).on_conflict_do_nothing()
    return (await conn.execute(stmt, dict(values))).rowcount == 1


async def lock_message(conn: AsyncConnection, message_id: str) -> Row[Any] | None:
    """The message row, locked until the transaction ends (PostgreSQL)."""
    return (
        await conn.execute(
            select(schema.messages)
            .where(schema.messages.c.message_id == message_id)
            .with_for_update()
        )
    ).first()


async def message_id_for_provider_id(conn: AsyncConnection, provider_message_id: str) -> str:
    """The message whose latest attempt has this provider id, or ""."""
    found = await conn.scalar(
        select(schema.attempts.c.message_id)
        .where(schema.attempts.c.provider_message_id == provider_message_id)
        .order_by(schema.attempts.c.created_at.desc())
        .limit(1)
    )
    return str(found) if found else ""


async def load_attempts(conn: AsyncConnection, message_id: str) -> list[Attempt]:
    """A message's attempts, in order."""
    return [att for _, att in await load_attempts_of(conn, [message_id])]


async def append_entry(
    conn: AsyncConnection,
    message_id: str,
    *,
    kind: EntryKind,
    state: int,
    attempt: int,
    channel: str,
    provider: str,
    recorded_at: datetime,
    provider_status: str = "",
    reason_code: str = "",
    reason: str = "",
    permanent: bool = False,
    provider_message_id: str = "",
    trace_id: str = "",
    event_id: str = "",
    occurred_at: datetime | None = None,
) -> StatusEntry:
    """Append one timeline entry and return it with its sequence number."""
    values: dict[str, Any] = {
        "message_id": message_id,
        "kind": kind.value,
        "state": state,
        "attempt": attempt,
        "channel": channel,
        "provider": provider,
        "provider_status": provider_status,
        "reason_code": reason_code,
        "reason": reason,
        "permanent": permanent,
        "provider_message_id": provider_message_id,
        "trace_id": trace_id,
        "event_id": event_id,
        "occurred_at": occurred_at,
        "recorded_at": recorded_at,
    }
    result = await conn.execute(schema.timeline.insert(), values)
    key = result.inserted_primary_key
    if key is None:  # pragma: no cover - both backends report the new key
        raise RuntimeError("the database did not report the timeline entry's key")
    return StatusEntry(
        seq=int(key[0]),
        kind=kind,
        state=state,
        attempt=attempt,
        channel=channel,
        provider=provider,
        provider_status=provider_status,
        reason_code=reason_code,
        reason=reason,
        permanent=permanent,
        provider_message_id=provider_message_id,
        trace_id=trace_id,
        event_id=event_id,
        occurred_at=opt_out_time(occurred_at),
        recorded_at=out_time(recorded_at),
    )


async def gateway_transition(
    conn: AsyncConnection,
    row: Row[Any],
    *,
    state: int,
    attempt: Attempt,
    reason_code: str,
    reason: str,
    permanent: bool,
    now: datetime,
) -> StatusEntry:
    """A state change the gateway itself decides (fallback), with a deterministic event id."""
    event_id = gateway_event_id(
        str(row.message_id), reason_code or "accept", attempt.attempt, state
    )
    await insert_ignore(
        conn,
        schema.seen_events,
        {"event_id": event_id, "message_id": row.message_id, "recorded_at": now},
    )
    await conn.execute(
        update(schema.messages)
        .where(schema.messages.c.message_id == row.message_id)
        .values(state=state, reason_code=reason_code, reason=reason, updated_at=now)
    )
    return await append_entry(
        conn,
        str(row.message_id),
        kind=EntryKind.TRANSITION,
        state=state,
        attempt=attempt.attempt,
        channel=attempt.channel,
        provider=attempt.provider,
        reason_code=reason_code,
        reason=reason,
        permanent=permanent,
        provider_message_id=attempt.provider_message_id,
        trace_id=str(row.trace_id),
        event_id=event_id,
        occurred_at=now,
        recorded_at=now,
    )


def entry_from_row(row: Mapping[Any, Any], seq: int) -> StatusEntry:
    """A timeline entry from its row values."""
    return StatusEntry(
        seq=seq,
        kind=EntryKind(row["kind"]),
        state=int(row["state"]),
        attempt=int(row["attempt"]),
        channel=str(row["channel"]),
        provider=str(row["provider"]),
        provider_status=str(row["provider_status"]),
        reason_code=str(row["reason_code"]),
        reason=str(row["reason"]),
        permanent=bool(row["permanent"]),
        provider_message_id=str(row["provider_message_id"]),
        trace_id=str(row["trace_id"]),
        event_id=str(row["event_id"]),
        occurred_at=opt_out_time(row["occurred_at"]),
        recorded_at=out_time(row["recorded_at"]),
    )


async def insert_many_ignore(conn: AsyncConnection, table: Any, rows: list[dict[str, Any]]) -> None:
    """Multi-row INSERT ... ON CONFLICT DO NOTHING."""
    insert = pg_dialect.insert if conn.dialect.name == "postgresql" else sqlite_dialect.insert
    await conn.execute(insert(table).values(rows).on_conflict_do_nothing())


async def load_attempts_of(
    conn: AsyncConnection, message_ids: Sequence[str]
) -> list[tuple[str, Attempt]]:
    """``(message_id, attempt)`` of several messages, ordered."""
    rows = (
        await conn.execute(
            select(schema.attempts)
            .where(schema.attempts.c.message_id.in_(message_ids))
            .order_by(schema.attempts.c.message_id, schema.attempts.c.attempt)
        )
    ).all()
    return [(str(r.message_id), attempt_from_row(r)) for r in rows]


def attempt_from_row(r: Row[Any]) -> Attempt:
    """An attempt from its row."""
    return Attempt(
        attempt=int(r.attempt),
        channel=str(r.channel),
        provider=str(r.provider),
        address=str(r.address),
        state=int(r.state),
        provider_message_id=str(r.provider_message_id),
        dispatched=bool(r.dispatched),
        created_at=out_time(r.created_at),
    )


def step_due(
    start: datetime, wait: timedelta, created: datetime, policy: FallbackPolicy
) -> datetime:
    """When a step started at ``start`` is due: its wait, capped by the policy's TTL."""
    due = start + wait
    if policy.ttl is not None:
        due = min(due, created + policy.ttl)
    return due


def next_command(
    stored: bytes, channel: str, provider: str, address: str, attempt: int
) -> SendMessageCommand:
    """The stored first command re-targeted to another channel as attempt ``attempt``."""
    command = SendMessageCommand()
    command.ParseFromString(stored)
    if (command.channel, command.provider) != (channel, provider):
        # Account and sender belong to the first connector; the next one uses its defaults.
        command.account = ""
        command.message.ClearField("sender")
    command.channel, command.provider, command.attempt = channel, provider, attempt
    first = (
        command.message.recipients[0]
        if command.message.recipients
        else Participant(role=ParticipantRole.PARTICIPANT_ROLE_CUSTOMER)
    )
    recipient = Participant()
    recipient.CopyFrom(first)
    recipient.channel, recipient.address = channel, address
    del command.message.recipients[:]
    command.message.recipients.append(recipient)
    return command


async def load_record(
    conn: AsyncConnection, message_id: str, *, timeline: bool = False
) -> MessageRecord | None:
    """The message record (optionally with its timeline), or None."""
    row = (
        await conn.execute(
            select(schema.messages).where(schema.messages.c.message_id == message_id)
        )
    ).first()
    if row is None:
        return None
    return await load_record_row(conn, row, timeline=timeline)


async def load_record_row(
    conn: AsyncConnection,
    row: Row[Any] | Mapping[str, Any],
    *,
    timeline: bool,
    attempts: list[Attempt] | None = None,
) -> MessageRecord:
    """A message record from a ``ledger_messages`` row (or its values as a mapping)."""
    values: Mapping[Any, Any] = row._mapping if isinstance(row, Row) else row
    message_id = str(values["message_id"])
    if attempts is None:
        attempts = await load_attempts(conn, message_id)
    entries: list[StatusEntry] = []
    if timeline:
        t = schema.timeline.c
        result = await conn.execute(
            select(schema.timeline).where(t.message_id == message_id).order_by(t.seq)
        )
        entries = [entry_from_row(e._mapping, int(e.seq)) for e in result]
    active = (
        values["fallback_json"] is not None
        and await conn.scalar(
            select(schema.timers.c.message_id).where(schema.timers.c.message_id == message_id)
        )
        is not None
    )
    return build_record(values, attempts, active=active, timeline=entries)


async def load_records(conn: AsyncConnection, rows: Sequence[Row[Any]]) -> list[MessageRecord]:
    """Records (without timeline) of many message rows, in three queries."""
    ids = [str(r.message_id) for r in rows]
    if not ids:
        return []
    attempts: dict[str, list[Attempt]] = {i: [] for i in ids}
    for mid, att in await load_attempts_of(conn, ids):
        attempts[mid].append(att)
    with_policy = [str(r.message_id) for r in rows if r.fallback_json]
    active: set[str] = set()
    if with_policy:
        result = await conn.execute(
            select(schema.timers.c.message_id).where(schema.timers.c.message_id.in_(with_policy))
        )
        active = {str(r.message_id) for r in result}
    return [
        build_record(r._mapping, attempts[str(r.message_id)], active=str(r.message_id) in active)
        for r in rows
    ]


def build_record(
    values: Mapping[Any, Any],
    attempts: Sequence[Attempt],
    *,
    active: bool,
    timeline: Sequence[StatusEntry] = (),
) -> MessageRecord:
    """A record from message row values and its attempts."""
    current = attempts[int(values["attempt"]) - 1]
    return MessageRecord(
        message_id=str(values["message_id"]),
        idempotency_key=str(values["idempotency_key"]),
        state=int(values["state"]),
        channel=current.channel,
        provider=current.provider,
        address=current.address,
        attempt=current.attempt,
        provider_message_id=current.provider_message_id,
        conversation_id=str(values["conversation_id"]),
        correlation_id=str(values["correlation_id"]),
        metadata=json.loads(values["metadata_json"]),
        command=bytes(values["command"]),
        fallback=FallbackPolicy.from_json(json.loads(values["fallback_json"]))
        if values["fallback_json"]
        else None,
        fallback_active=active,
        expires_at=opt_out_time(values["expires_at"]),
        trace_id=str(values["trace_id"]),
        reason_code=str(values["reason_code"]),
        reason=str(values["reason"]),
        late_delivery=bool(values["late_delivery"]),
        created_at=out_time(values["created_at"]),
        updated_at=out_time(values["updated_at"]),
        attempts=tuple(attempts),
        timeline=tuple(timeline),
    )
