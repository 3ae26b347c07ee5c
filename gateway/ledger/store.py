"""The delivery ledger: every outbound message's state machine, on SQLAlchemy 2 async.

One code path for SQLite (``sqlite+aiosqlite:///channel-gateway.db``, the
embedded default) and PostgreSQL (``postgresql+asyncpg://...``).

Concurrency model:

- ``accept`` relies on the unique ``idempotency_key`` (``INSERT ... ON CONFLICT
  DO NOTHING`` then a read), so concurrent accepts of one key in any number of
  processes yield one message.
- Every change to a message happens in one transaction holding its row lock
  (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite every write transaction
  is ``BEGIN IMMEDIATE``, which serialises writers across processes).
- A status for a message not recorded yet is kept as *pending*. Both ``accept``
  and the status path re-check after their own commit, so whichever commits
  second drains the pending statuses: none is stranded by the race.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection as SyncConnection
from sqlalchemy import and_, delete, event, func, or_, select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.participant_pb2 import Participant, ParticipantRole
from gateway.contract.ids import NAMESPACE
from gateway.contract.status import FINAL_STATES, advance
from gateway.ledger import schema
from gateway.ledger.models import (
    REASON_FALLBACK_EXHAUSTED,
    REASON_FALLBACK_TTL,
    REASON_LATE_DELIVERY,
    REASON_REJECTED,
    REASON_TIMEOUT,
    REJECTED_STATES,
    Attempt,
    EntryKind,
    FallbackPolicy,
    IdempotencyConflictError,
    InvalidPageTokenError,
    ListFilter,
    MessageNotFoundError,
    MessageRecord,
    NewMessage,
    Page,
    StatusEntry,
    StatusUpdate,
    Timer,
    as_utc,
    success_reached,
    utcnow,
)

S = DeliveryState

DEFAULT_URL = "sqlite+aiosqlite:///channel-gateway.db"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

_MIGRATIONS = Path(__file__).parent / "migrations"
_READONLY = "ledger_readonly"

Clock = Callable[[], datetime]


def _db_time(value: datetime) -> datetime:
    """Naive UTC, as stored."""
    return as_utc(value).replace(tzinfo=None)


def _out_time(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _opt_out_time(value: datetime | None) -> datetime | None:
    return None if value is None else _out_time(value)


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


def _gateway_event_id(message_id: str, kind: str, attempt: int, state: int) -> str:
    """Deterministic id of a status the gateway itself records (switch, exhaustion ...)."""
    return str(uuid.uuid5(NAMESPACE, f"ledger\x1f{kind}\x1f{message_id}\x1f{attempt}\x1f{state}"))


def _update_to_json(update: StatusUpdate) -> str:
    data = asdict(update)
    data["occurred_at"] = as_utc(update.occurred_at).isoformat() if update.occurred_at else None
    return json.dumps(data)


def _update_from_json(text: str) -> StatusUpdate:
    data: dict[str, Any] = json.loads(text)
    occurred = data.pop("occurred_at", None)
    return StatusUpdate(**data, occurred_at=datetime.fromisoformat(occurred) if occurred else None)


@dataclass(frozen=True, kw_only=True)
class Applied:
    """What :meth:`Ledger.record_status` did with one status.

    ``entries`` are the timeline entries it appended (empty for a duplicate,
    a stale status or a pending one); ``record`` is None while the message is
    unknown (the status is kept as pending).
    """

    record: MessageRecord | None
    entries: tuple[StatusEntry, ...] = ()
    duplicate: bool = False
    pending: bool = False
    #: True when the status made a fallback timer due now (wake the engine).
    fallback_due: bool = False


class TimerAction:
    """What firing a fallback timer did (string constants)."""

    NOTHING = "nothing"
    DONE = "done"
    SWITCHED = "switched"
    EXHAUSTED = "exhausted"
    EXPIRED = "expired"


@dataclass(frozen=True, kw_only=True)
class TimerOutcome:
    """Result of :meth:`Ledger.fire_timer`.

    For ``SWITCHED``, ``command`` is the next step's command: publish it, then
    call :meth:`Ledger.mark_dispatched`.
    """

    action: str
    record: MessageRecord | None
    entries: tuple[StatusEntry, ...] = ()
    command: SendMessageCommand | None = None


class Ledger:
    """The delivery ledger on one SQLAlchemy async engine. Create with :func:`open_ledger`.

    Safe to share by many tasks; several processes (gateway replicas) may use
    the same database at once.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        clock: Clock = utcnow,
        max_page_size: int = MAX_PAGE_SIZE,
    ) -> None:
        self._engine = engine
        # Reads take no write lock on SQLite (plain BEGIN; see _sqlite_setup).
        self._reader = engine.execution_options(**{_READONLY: True})
        self._clock = clock
        self._max_page_size = max_page_size

    @property
    def engine(self) -> AsyncEngine:
        """The underlying engine (for tests and health checks)."""
        return self._engine

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    def now(self) -> datetime:
        """The ledger clock (aware UTC)."""
        return as_utc(self._clock())

    # -- lifecycle ---------------------------------------------------------

    async def migrate(self) -> None:
        """Bring the schema to the latest migration (alembic, idempotent).

        Concurrent calls from several processes on PostgreSQL serialise on an
        advisory lock.
        """
        async with self._engine.begin() as conn:
            if self.dialect == "postgresql":
                await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7243011)")
            await conn.run_sync(_run_migrations)

    async def close(self) -> None:
        """Dispose of the engine's connections."""
        await self._engine.dispose()

    def _read(self) -> AsyncConnection:
        return self._reader.connect()

    # -- accept ------------------------------------------------------------

    async def accept(self, new: NewMessage) -> tuple[MessageRecord, bool]:
        """Record a new outbound message, ACCEPTED, keyed by its idempotency key.

        Returns ``(record, True)`` when this call created it and
        ``(existing record, False)`` when the key was seen before (from any
        process): the caller then must not send again, but should re-publish
        the command if ``record.dispatched`` is False. Raises
        :class:`IdempotencyConflictError` when the key was used with another
        ``fingerprint``, or ``new.message_id`` belongs to another key.
        Pending statuses of ``new.message_id`` are applied before returning.
        """
        now = _db_time(new.created_at or self.now())
        values: dict[str, Any] = {
            "message_id": new.message_id,
            "idempotency_key": new.idempotency_key,
            "fingerprint": new.fingerprint,
            "state": S.DELIVERY_STATE_ACCEPTED,
            "attempt": 1,
            "conversation_id": new.conversation_id,
            "correlation_id": new.correlation_id,
            "metadata_json": json.dumps(dict(new.metadata), sort_keys=True),
            "command": new.command,
            "fallback_json": json.dumps(new.fallback.to_json()) if new.fallback else None,
            "expires_at": _db_time(new.expires_at) if new.expires_at else None,
            "trace_id": new.trace_id,
            "reason_code": "",
            "reason": "",
            "late_delivery": False,
            "created_at": now,
            "updated_at": now,
        }
        async with self._engine.begin() as conn:
            created = await _insert_ignore(conn, schema.messages, values, "message_id")
            if created:
                await conn.execute(
                    schema.attempts.insert().values(
                        message_id=new.message_id,
                        attempt=1,
                        channel=new.channel,
                        provider=new.provider,
                        address=new.address,
                        state=S.DELIVERY_STATE_ACCEPTED,
                        provider_message_id="",
                        dispatched=False,
                        created_at=now,
                    )
                )
                await _append(
                    conn,
                    new.message_id,
                    kind=EntryKind.TRANSITION,
                    state=S.DELIVERY_STATE_ACCEPTED,
                    attempt=1,
                    channel=new.channel,
                    provider=new.provider,
                    trace_id=new.trace_id,
                    event_id=_gateway_event_id(new.message_id, "accept", 1, 1),
                    occurred_at=now,
                    recorded_at=now,
                )
                if new.fallback is not None:
                    step = new.fallback.steps[0]
                    await conn.execute(
                        schema.timers.insert().values(
                            message_id=new.message_id,
                            due_at=_step_due(now, step.wait, now, new.fallback),
                            attempt=1,
                        )
                    )
            row = (
                await conn.execute(
                    select(schema.messages).where(
                        schema.messages.c.idempotency_key == new.idempotency_key
                    )
                )
            ).first()
            if row is None:
                raise IdempotencyConflictError(
                    f"message id {new.message_id} is already used by another idempotency key"
                )
            if not created and new.fingerprint and row.fingerprint != new.fingerprint:
                raise IdempotencyConflictError(
                    f"idempotency key {new.idempotency_key!r} was used for a different request"
                )
            message_id = str(row.message_id)
        if created:
            await self._drain(message_id=message_id)
        record = await self.get(message_id)
        return record, created

    async def mark_dispatched(self, message_id: str, attempt: int) -> None:
        """Note that the command of ``attempt`` was confirmed by the broker."""
        async with self._engine.begin() as conn:
            await conn.execute(
                update(schema.attempts)
                .where(
                    schema.attempts.c.message_id == message_id,
                    schema.attempts.c.attempt == attempt,
                )
                .values(dispatched=True)
            )

    # -- statuses ----------------------------------------------------------

    async def apply_status(self, update: StatusUpdate) -> MessageRecord | None:
        """Apply one status; returns the message (None while it is unknown: kept pending).

        Monotonic (``gateway.contract.status.advance``), idempotent per event
        id, and fallback-aware: see :meth:`record_status` for the details.
        """
        return (await self.record_status(update)).record

    async def record_status(self, update: StatusUpdate) -> Applied:
        """Apply one status and say what happened.

        - The status is matched to an attempt by provider message id, then by
          attempt number, then by channel/provider, else the current attempt.
        - The current attempt's status moves the message state when
          :func:`~gateway.contract.status.advance` allows (a late SENT never
          overwrites DELIVERED; nothing leaves a final state).
        - With an active fallback, a rejection of the current attempt does not
          end the message: it is recorded as an ``ATTEMPT`` entry and the
          fallback timer becomes due now (``Applied.fallback_due``).
        - DELIVERED/READ of an earlier attempt after a switch is a
          ``LATE_DELIVERY`` entry; it stops further fallback.
        - A status whose message (or provider id, or attempt) is not known yet
          is kept pending and applied when it becomes known.
        """
        return await self._record_status(update, status_event_id(update), from_pending=False)

    async def _record_status(
        self, update: StatusUpdate, event_id: str, *, from_pending: bool
    ) -> Applied:
        now = _db_time(self.now())
        async with self._engine.begin() as conn:
            if from_pending:
                taken = await conn.execute(
                    delete(schema.pending)
                    .where(schema.pending.c.event_id == event_id)
                    .returning(schema.pending.c.event_id)
                )
                if taken.first() is None:
                    # Another drain applied it already.
                    return Applied(record=None, duplicate=True)
            message_id = await _resolve_message(conn, update)
            row = await _lock_message(conn, message_id) if message_id else None
            attempts = await _attempts(conn, str(row.message_id)) if row is not None else []
            if row is None or update.attempt > len(attempts):
                # Unknown message, or an attempt the fallback engine has not
                # created yet: keep it until they exist.
                await _insert_ignore(
                    conn,
                    schema.pending,
                    {
                        "event_id": event_id,
                        "message_id": update.message_id,
                        "provider_message_id": update.provider_message_id,
                        "payload": _update_to_json(update),
                        "received_at": now,
                    },
                    "event_id",
                )
                known_id = str(row.message_id) if row is not None else ""
            else:
                fresh = await _insert_ignore(
                    conn,
                    schema.seen_events,
                    {"event_id": event_id, "message_id": row.message_id, "recorded_at": now},
                    "event_id",
                )
                if not fresh:
                    record = await _record(conn, row, timeline=False, attempts=attempts)
                    return Applied(record=record, duplicate=True)
                entries, due, linked, record = await _apply_locked(
                    conn, row, attempts, update, event_id, now
                )
                known_id = None
        if known_id is None:
            for provider_id in linked:
                await self._drain(provider_message_id=provider_id)
            if linked:
                record = await self.find(record.message_id) or record
            return Applied(record=record, entries=tuple(entries), fallback_due=due)
        if known_id:
            # Message known, attempt not yet: the engine drains when it creates it.
            return Applied(record=await self.find(known_id), pending=True)
        # The message may have been accepted (or its provider id linked)
        # between our read and our commit: whoever commits second drains.
        if update.message_id:
            if await self._exists(update.message_id):
                await self._drain(message_id=update.message_id)
                return Applied(record=await self.find(update.message_id))
        elif await self._message_for_provider_id(update.provider_message_id):
            await self._drain(provider_message_id=update.provider_message_id)
            return Applied(
                record=await self.find_by_provider_message_id(update.provider_message_id)
            )
        return Applied(record=None, pending=True)

    async def _exists(self, message_id: str) -> bool:
        async with self._read() as conn:
            found = await conn.scalar(
                select(schema.messages.c.message_id).where(
                    schema.messages.c.message_id == message_id
                )
            )
            return found is not None

    async def _message_for_provider_id(self, provider_message_id: str) -> str:
        if not provider_message_id:
            return ""
        async with self._read() as conn:
            return await _message_id_for_provider_id(conn, provider_message_id)

    async def _drain(self, *, message_id: str = "", provider_message_id: str = "") -> None:
        """Apply pending statuses of a message or provider id, oldest first.

        Each is taken (deleted) in the transaction that applies it, so
        concurrent drains never apply one twice and a crash loses none.
        """
        column = schema.pending.c.message_id if message_id else schema.pending.c.provider_message_id
        key = message_id or provider_message_id
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    select(schema.pending.c.event_id, schema.pending.c.payload)
                    .where(column == key)
                    .order_by(schema.pending.c.received_at, schema.pending.c.event_id)
                )
            ).all()
        for row in rows:
            await self._record_status(
                _update_from_json(row.payload), str(row.event_id), from_pending=True
            )

    async def purge_pending(self, older_than: datetime) -> int:
        """Drop pending statuses received before ``older_than`` (never matched); returns
        how many."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(schema.pending)
                .where(schema.pending.c.received_at < _db_time(older_than))
                .returning(schema.pending.c.event_id)
            )
            return len(result.all())

    async def pending_count(self) -> int:
        """Statuses waiting for their message (for metrics and tests)."""
        async with self._read() as conn:
            return int(await conn.scalar(select(func.count()).select_from(schema.pending)) or 0)

    # -- reads -------------------------------------------------------------

    async def find(self, message_id: str) -> MessageRecord | None:
        """The message with its attempts and timeline, or None."""
        async with self._read() as conn:
            return await _load(conn, message_id, timeline=True)

    async def get(self, message_id: str) -> MessageRecord:
        """The message with its attempts and ordered timeline.

        Raises :class:`MessageNotFoundError` for an unknown id.
        """
        record = await self.find(message_id)
        if record is None:
            raise MessageNotFoundError(message_id)
        return record

    async def find_by_idempotency_key(self, key: str) -> MessageRecord | None:
        """The message accepted with ``key``, or None."""
        async with self._read() as conn:
            mid = await conn.scalar(
                select(schema.messages.c.message_id).where(schema.messages.c.idempotency_key == key)
            )
            return await _load(conn, str(mid), timeline=True) if mid else None

    async def find_by_provider_message_id(self, provider_message_id: str) -> MessageRecord | None:
        """The message one of whose attempts has this provider id, or None."""
        async with self._read() as conn:
            mid = await _message_id_for_provider_id(conn, provider_message_id)
            return await _load(conn, mid, timeline=True) if mid else None

    async def list(
        self, filter: ListFilter | None = None, page_size: int = 0, page_token: str = ""
    ) -> Page:
        """Messages matching ``filter``, newest first (``created_at``, then id).

        ``page_size`` 0 means the default (50); larger than the maximum (1000)
        is capped (AIP-158). ``page_token`` must come from a previous call
        with the same filter, else :class:`InvalidPageTokenError`. Records
        carry their attempts but no timeline.
        """
        flt = filter or ListFilter()
        if page_size < 0:
            raise ValueError("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, self._max_page_size)
        digest = _filter_digest(flt)
        query = select(schema.messages)
        m = schema.messages.c
        if flt.conversation_id:
            query = query.where(m.conversation_id == flt.conversation_id)
        if flt.correlation_id:
            query = query.where(m.correlation_id == flt.correlation_id)
        if flt.since is not None:
            query = query.where(m.created_at >= _db_time(flt.since))
        if flt.until is not None:
            query = query.where(m.created_at < _db_time(flt.until))
        if page_token:
            created, last_id = _decode_token(page_token, digest)
            query = query.where(
                or_(m.created_at < created, and_(m.created_at == created, m.message_id < last_id))
            )
        query = query.order_by(m.created_at.desc(), m.message_id.desc()).limit(size + 1)
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
            more = len(rows) > size
            rows = rows[:size]
            records = [await _record(conn, row, timeline=False) for row in rows]
        token = ""
        if more and rows:
            token = _encode_token(rows[-1].created_at, str(rows[-1].message_id), digest)
        return Page(messages=tuple(records), next_page_token=token)

    # -- fallback timers ---------------------------------------------------

    async def due_timers(self, now: datetime | None = None, limit: int = 100) -> Sequence[Timer]:
        """Fallback timers due at ``now`` (default: the ledger clock), earliest first."""
        at = _db_time(now or self.now())
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    select(schema.timers)
                    .where(schema.timers.c.due_at <= at)
                    .order_by(schema.timers.c.due_at, schema.timers.c.message_id)
                    .limit(limit)
                )
            ).all()
        return [
            Timer(message_id=str(r.message_id), due_at=_out_time(r.due_at), attempt=int(r.attempt))
            for r in rows
        ]

    async def next_timer_due(self) -> datetime | None:
        """When the earliest fallback timer is due (None without timers)."""
        async with self._read() as conn:
            due = await conn.scalar(select(func.min(schema.timers.c.due_at)))
        return _out_time(due) if due is not None else None

    async def fire_timer(self, message_id: str, now: datetime | None = None) -> TimerOutcome:
        """Act on a message's fallback timer if it is due (used by the FallbackEngine).

        In one transaction holding the message lock: when the current step
        succeeded or the message is final, the timer is dropped (DONE); past
        the policy TTL the message ends EXPIRED (``fallback_ttl_expired``);
        when the current attempt was rejected or its wait ran out, the next
        step starts (SWITCHING_CHANNEL, then ACCEPTED for the new attempt,
        and the command to publish is returned) or, with no step left, the
        message ends FAILED (``fallback_exhausted``). Several engines may fire
        the same timer: only one acts.
        """
        at = _db_time(now or self.now())
        async with self._engine.begin() as conn:
            row = await _lock_message(conn, message_id)
            timer = (
                await conn.execute(
                    select(schema.timers).where(schema.timers.c.message_id == message_id)
                )
            ).first()
            if row is None or timer is None or timer.due_at > at or row.fallback_json is None:
                return TimerOutcome(action=TimerAction.NOTHING, record=None)
            policy = FallbackPolicy.from_json(json.loads(row.fallback_json))
            attempts = await _attempts(conn, message_id)
            current = attempts[int(row.attempt) - 1]
            step = policy.steps[current.attempt - 1]
            drop_timer = delete(schema.timers).where(schema.timers.c.message_id == message_id)
            if int(row.state) in FINAL_STATES or success_reached(current.state, step.success_state):
                await conn.execute(drop_timer)
                return TimerOutcome(action=TimerAction.DONE, record=await _load(conn, message_id))
            created = row.created_at
            ttl_deadline = created + policy.ttl if policy.ttl is not None else None
            entries: list[StatusEntry] = []
            if ttl_deadline is not None and at >= ttl_deadline:
                await conn.execute(drop_timer)
                entries.append(
                    await _transition(
                        conn,
                        row,
                        state=S.DELIVERY_STATE_EXPIRED,
                        attempt=current,
                        reason_code=REASON_FALLBACK_TTL,
                        reason="the fallback TTL ran out before any channel succeeded",
                        permanent=True,
                        now=at,
                    )
                )
                return TimerOutcome(
                    action=TimerAction.EXPIRED,
                    record=await _load(conn, message_id),
                    entries=tuple(entries),
                )
            rejected = current.state in REJECTED_STATES
            waited_out = at >= _db_time(current.created_at) + step.wait
            if not rejected and not waited_out:
                # Not due after all (e.g. a clock step): put it where it belongs.
                await conn.execute(
                    update(schema.timers)
                    .where(schema.timers.c.message_id == message_id)
                    .values(
                        due_at=_step_due(_db_time(current.created_at), step.wait, created, policy)
                    )
                )
                return TimerOutcome(action=TimerAction.NOTHING, record=None)
            reason_code = REASON_REJECTED if rejected else REASON_TIMEOUT
            if current.attempt >= len(policy.steps):
                await conn.execute(drop_timer)
                entries.append(
                    await _transition(
                        conn,
                        row,
                        state=S.DELIVERY_STATE_FAILED,
                        attempt=current,
                        reason_code=REASON_FALLBACK_EXHAUSTED,
                        reason=f"no fallback channel left (last channel: {reason_code})",
                        permanent=True,
                        now=at,
                    )
                )
                return TimerOutcome(
                    action=TimerAction.EXHAUSTED,
                    record=await _load(conn, message_id),
                    entries=tuple(entries),
                )
            nxt = policy.steps[current.attempt]
            number = current.attempt + 1
            entries.append(
                await _transition(
                    conn,
                    row,
                    state=S.DELIVERY_STATE_SWITCHING_CHANNEL,
                    attempt=current,
                    reason_code=reason_code,
                    reason=f"switching from {current.channel}/{current.provider} "
                    f"to {nxt.channel}/{nxt.provider}",
                    permanent=False,
                    now=at,
                )
            )
            await conn.execute(
                schema.attempts.insert().values(
                    message_id=message_id,
                    attempt=number,
                    channel=nxt.channel,
                    provider=nxt.provider,
                    address=nxt.address,
                    state=S.DELIVERY_STATE_ACCEPTED,
                    provider_message_id="",
                    dispatched=False,
                    created_at=at,
                )
            )
            new_attempt = Attempt(
                attempt=number,
                channel=nxt.channel,
                provider=nxt.provider,
                address=nxt.address,
                state=S.DELIVERY_STATE_ACCEPTED,
                provider_message_id="",
                dispatched=False,
                created_at=_out_time(at),
            )
            await conn.execute(
                update(schema.messages)
                .where(schema.messages.c.message_id == message_id)
                .values(attempt=number)
            )
            entries.append(
                await _transition(
                    conn,
                    row,
                    state=S.DELIVERY_STATE_ACCEPTED,
                    attempt=new_attempt,
                    reason_code="",
                    reason="",
                    permanent=False,
                    now=at,
                )
            )
            await conn.execute(
                update(schema.timers)
                .where(schema.timers.c.message_id == message_id)
                .values(due_at=_step_due(at, nxt.wait, created, policy), attempt=number)
            )
            command = _next_command(row.command, nxt.channel, nxt.provider, nxt.address, number)
            record = await _load(conn, message_id)
        # Statuses of the new attempt may have arrived before it existed.
        await self._drain(message_id=message_id)
        return TimerOutcome(
            action=TimerAction.SWITCHED, record=record, entries=tuple(entries), command=command
        )

    async def undispatched(
        self, older_than: datetime, limit: int = 100
    ) -> Sequence[tuple[str, int]]:
        """``(message_id, attempt)`` of current attempts created before ``older_than``
        whose command was never confirmed, on messages not in a final state."""
        a, m = schema.attempts.c, schema.messages.c
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    select(a.message_id, a.attempt)
                    .join(schema.messages, m.message_id == a.message_id)
                    .where(
                        a.dispatched.is_(False),
                        a.attempt == m.attempt,
                        a.created_at < _db_time(older_than),
                        m.state.not_in(list(FINAL_STATES)),
                    )
                    .order_by(a.created_at)
                    .limit(limit)
                )
            ).all()
        return [(str(r.message_id), int(r.attempt)) for r in rows]

    async def command_for(self, message_id: str, attempt: int) -> SendMessageCommand:
        """The command of one attempt (the stored command adapted to its channel)."""
        async with self._read() as conn:
            row = (
                await conn.execute(
                    select(schema.messages.c.command).where(
                        schema.messages.c.message_id == message_id
                    )
                )
            ).first()
            if row is None:
                raise MessageNotFoundError(message_id)
            found = [a for a in await _attempts(conn, message_id) if a.attempt == attempt]
        if not found:
            raise MessageNotFoundError(f"{message_id} attempt {attempt}")
        att = found[0]
        return _next_command(row.command, att.channel, att.provider, att.address, attempt)


# -- helpers (module level so they are shared by every transaction) ---------


def _run_migrations(connection: SyncConnection) -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    alembic_command.upgrade(config, "head")


async def _insert_ignore(
    conn: AsyncConnection, table: Any, values: Mapping[str, Any], key: str
) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when the row was inserted."""
    insert = pg_dialect.insert if conn.dialect.name == "postgresql" else sqlite_dialect.insert
    stmt = insert(table).values(**values).on_conflict_do_nothing().returning(table.c[key])
    return (await conn.execute(stmt)).first() is not None


async def _lock_message(conn: AsyncConnection, message_id: str) -> Row[Any] | None:
    return (
        await conn.execute(
            select(schema.messages)
            .where(schema.messages.c.message_id == message_id)
            .with_for_update()
        )
    ).first()


async def _message_id_for_provider_id(conn: AsyncConnection, provider_message_id: str) -> str:
    found = await conn.scalar(
        select(schema.attempts.c.message_id)
        .where(schema.attempts.c.provider_message_id == provider_message_id)
        .order_by(schema.attempts.c.created_at.desc())
        .limit(1)
    )
    return str(found) if found else ""


async def _resolve_message(conn: AsyncConnection, update: StatusUpdate) -> str:
    if update.message_id:
        return update.message_id
    return await _message_id_for_provider_id(conn, update.provider_message_id)


async def _attempts(conn: AsyncConnection, message_id: str) -> list[Attempt]:
    rows = (
        await conn.execute(
            select(schema.attempts)
            .where(schema.attempts.c.message_id == message_id)
            .order_by(schema.attempts.c.attempt)
        )
    ).all()
    return [
        Attempt(
            attempt=int(r.attempt),
            channel=str(r.channel),
            provider=str(r.provider),
            address=str(r.address),
            state=int(r.state),
            provider_message_id=str(r.provider_message_id),
            dispatched=bool(r.dispatched),
            created_at=_out_time(r.created_at),
        )
        for r in rows
    ]


def _match_attempt(attempts: Sequence[Attempt], update: StatusUpdate, current: int) -> Attempt:
    if update.provider_message_id:
        for att in attempts:
            if att.provider_message_id == update.provider_message_id:
                return att

    def fits(att: Attempt) -> bool:
        return (not update.channel or att.channel == update.channel) and (
            not update.provider or att.provider == update.provider
        )

    if 0 < update.attempt <= len(attempts) and fits(attempts[update.attempt - 1]):
        return attempts[update.attempt - 1]
    if update.channel or update.provider:
        # Latest attempt on that connector whose provider id is not another one.
        for att in reversed(attempts):
            if fits(att) and (
                not att.provider_message_id
                or not update.provider_message_id
                or att.provider_message_id == update.provider_message_id
            ):
                return att
    return attempts[current - 1]


async def _append(
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
    seq = await conn.scalar(
        schema.timeline.insert().values(**values).returning(schema.timeline.c.seq)
    )
    return StatusEntry(
        seq=int(seq or 0),
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
        occurred_at=_opt_out_time(occurred_at),
        recorded_at=_out_time(recorded_at),
    )


async def _transition(
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
    event_id = _gateway_event_id(
        str(row.message_id), reason_code or "accept", attempt.attempt, state
    )
    await _insert_ignore(
        conn,
        schema.seen_events,
        {"event_id": event_id, "message_id": row.message_id, "recorded_at": now},
        "event_id",
    )
    await conn.execute(
        update(schema.messages)
        .where(schema.messages.c.message_id == row.message_id)
        .values(state=state, reason_code=reason_code, reason=reason, updated_at=now)
    )
    return await _append(
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


async def _apply_locked(
    conn: AsyncConnection,
    row: Row[Any],
    attempts: list[Attempt],
    update_: StatusUpdate,
    event_id: str,
    now: datetime,
) -> tuple[list[StatusEntry], bool, list[str], MessageRecord]:
    """Apply a status to a locked message: (entries appended, fallback due now, provider ids
    newly linked to an attempt, the updated record without timeline)."""
    message_id = str(row.message_id)
    current_number = int(row.attempt)
    target = _match_attempt(attempts, update_, current_number)
    linked: list[str] = []
    a = schema.attempts.c
    attempt_values: dict[str, Any] = {}
    if update_.provider_message_id and not target.provider_message_id:
        attempt_values["provider_message_id"] = update_.provider_message_id
        linked.append(update_.provider_message_id)
    attempt_advanced = advance(target.state, update_.state)
    if attempt_advanced:
        attempt_values["state"] = update_.state
    if attempt_values:
        await conn.execute(
            update(schema.attempts)
            .where(a.message_id == message_id, a.attempt == target.attempt)
            .values(**attempt_values)
        )
    timer_active = (
        row.fallback_json is not None
        and await conn.scalar(
            select(schema.timers.c.message_id).where(schema.timers.c.message_id == message_id)
        )
        is not None
    )
    entry_args: dict[str, Any] = {
        "attempt": target.attempt,
        "channel": update_.channel or target.channel,
        "provider": update_.provider or target.provider,
        "provider_status": update_.provider_status,
        "reason_code": update_.reason_code,
        "reason": update_.reason,
        "permanent": update_.permanent,
        "provider_message_id": update_.provider_message_id or target.provider_message_id,
        "trace_id": update_.trace_id,
        "event_id": event_id,
        "occurred_at": _db_time(update_.occurred_at) if update_.occurred_at else None,
        "recorded_at": now,
    }
    entries: list[StatusEntry] = []
    due = False
    state = int(row.state)
    message_values: dict[str, Any] = {}
    if target.attempt == current_number:
        if timer_active and update_.state in REJECTED_STATES:
            if attempt_advanced:
                # The fallback engine decides what comes next (switch or exhausted).
                entries.append(
                    await _append(
                        conn, message_id, kind=EntryKind.ATTEMPT, state=update_.state, **entry_args
                    )
                )
                await conn.execute(
                    update(schema.timers)
                    .where(schema.timers.c.message_id == message_id)
                    .values(due_at=now)
                )
                due = True
        elif advance(state, update_.state):
            entries.append(
                await _append(
                    conn, message_id, kind=EntryKind.TRANSITION, state=update_.state, **entry_args
                )
            )
            message_values.update(
                state=update_.state, reason_code=update_.reason_code, reason=update_.reason
            )
            if timer_active:
                policy = FallbackPolicy.from_json(json.loads(row.fallback_json))
                step = policy.steps[target.attempt - 1]
                if success_reached(update_.state, step.success_state):
                    await conn.execute(
                        delete(schema.timers).where(schema.timers.c.message_id == message_id)
                    )
    elif attempt_advanced:
        late = update_.state in (S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_READ) and not bool(
            row.late_delivery
        )
        if late:
            args = dict(entry_args, reason_code=REASON_LATE_DELIVERY)
            args["reason"] = update_.reason or (
                f"attempt {target.attempt} on {target.channel}/{target.provider} delivered "
                "after the switch; suppress the duplicate"
            )
            entries.append(
                await _append(
                    conn, message_id, kind=EntryKind.LATE_DELIVERY, state=update_.state, **args
                )
            )
            message_values["late_delivery"] = True
            if timer_active:
                # The recipient has it: trying more channels would only add duplicates.
                await conn.execute(
                    delete(schema.timers).where(schema.timers.c.message_id == message_id)
                )
            if advance(state, update_.state):
                message_values.update(state=update_.state, reason_code=REASON_LATE_DELIVERY)
        else:
            entries.append(
                await _append(
                    conn, message_id, kind=EntryKind.ATTEMPT, state=update_.state, **entry_args
                )
            )
    if entries or message_values:
        message_values["updated_at"] = now
        await conn.execute(
            update(schema.messages)
            .where(schema.messages.c.message_id == message_id)
            .values(**message_values)
        )
    if attempt_values:
        attempts = [replace(x, **attempt_values) if x is target else x for x in attempts]
    values = {**row._mapping, **message_values}
    record = await _record(conn, values, timeline=False, attempts=attempts)
    return entries, due, linked, record


def _step_due(
    start: datetime, wait: timedelta, created: datetime, policy: FallbackPolicy
) -> datetime:
    due = start + wait
    if policy.ttl is not None:
        due = min(due, created + policy.ttl)
    return due


def _next_command(
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


async def _load(
    conn: AsyncConnection, message_id: str, *, timeline: bool = False
) -> MessageRecord | None:
    row = (
        await conn.execute(
            select(schema.messages).where(schema.messages.c.message_id == message_id)
        )
    ).first()
    if row is None:
        return None
    return await _record(conn, row, timeline=timeline)


async def _record(
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
        attempts = await _attempts(conn, message_id)
    entries: list[StatusEntry] = []
    if timeline:
        t = schema.timeline.c
        for e in (
            await conn.execute(
                select(schema.timeline).where(t.message_id == message_id).order_by(t.seq)
            )
        ).all():
            entries.append(
                StatusEntry(
                    seq=int(e.seq),
                    kind=EntryKind(e.kind),
                    state=int(e.state),
                    attempt=int(e.attempt),
                    channel=str(e.channel),
                    provider=str(e.provider),
                    provider_status=str(e.provider_status),
                    reason_code=str(e.reason_code),
                    reason=str(e.reason),
                    permanent=bool(e.permanent),
                    provider_message_id=str(e.provider_message_id),
                    trace_id=str(e.trace_id),
                    event_id=str(e.event_id),
                    occurred_at=_opt_out_time(e.occurred_at),
                    recorded_at=_out_time(e.recorded_at),
                )
            )
    active = (
        values["fallback_json"] is not None
        and await conn.scalar(
            select(schema.timers.c.message_id).where(schema.timers.c.message_id == message_id)
        )
        is not None
    )
    current = attempts[int(values["attempt"]) - 1]
    return MessageRecord(
        message_id=message_id,
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
        expires_at=_opt_out_time(values["expires_at"]),
        trace_id=str(values["trace_id"]),
        reason_code=str(values["reason_code"]),
        reason=str(values["reason"]),
        late_delivery=bool(values["late_delivery"]),
        created_at=_out_time(values["created_at"]),
        updated_at=_out_time(values["updated_at"]),
        attempts=tuple(attempts),
        timeline=tuple(entries),
    )


def _filter_digest(flt: ListFilter) -> str:
    parts = (
        flt.conversation_id,
        flt.correlation_id,
        as_utc(flt.since).isoformat() if flt.since else "",
        as_utc(flt.until).isoformat() if flt.until else "",
    )
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def _encode_token(created: datetime, message_id: str, digest: str) -> str:
    data = json.dumps({"v": 1, "c": created.isoformat(), "m": message_id, "f": digest})
    return base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")


def _decode_token(token: str, digest: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        created = datetime.fromisoformat(data["c"])
        message_id = data["m"]
        token_digest = data["f"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidPageTokenError("malformed page token") from exc
    if data.get("v") != 1 or not isinstance(message_id, str):
        raise InvalidPageTokenError("malformed page token")
    if token_digest != digest:
        raise InvalidPageTokenError("page token belongs to a different filter")
    return created.replace(tzinfo=None), message_id


def _sqlite_setup(engine: AsyncEngine) -> None:
    """WAL, a busy timeout and BEGIN IMMEDIATE for writes, so writers from several
    processes queue instead of failing, and reads do not block them."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit BEGIN is DEFERRED).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: SyncConnection) -> None:
        readonly = conn.get_execution_options().get(_READONLY, False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def open_ledger(
    url: str = DEFAULT_URL,
    *,
    schema_name: str | None = None,
    clock: Clock = utcnow,
    pool_size: int = 10,
    echo: bool = False,
) -> Ledger:
    """A ledger on ``url``: ``sqlite+aiosqlite:///path.db`` or ``postgresql+asyncpg://...``.

    ``schema_name`` (PostgreSQL only) puts the tables in that schema (it must
    exist). Call :meth:`Ledger.migrate` before first use and
    :meth:`Ledger.close` at shutdown.
    """
    if url.startswith("sqlite"):
        if not url.startswith("sqlite+aiosqlite://"):
            raise ValueError("SQLite ledgers need the async driver: sqlite+aiosqlite:///path.db")
        if ":memory:" in url or url.rstrip("/") == "sqlite+aiosqlite:":
            raise ValueError(
                "the ledger needs a SQLite file; an in-memory database is per connection"
            )
        if schema_name:
            raise ValueError("schema_name is only supported on PostgreSQL")
        engine = create_async_engine(url, echo=echo)
        _sqlite_setup(engine)
    elif url.startswith("postgresql"):
        if not url.startswith("postgresql+asyncpg://"):
            raise ValueError("PostgreSQL ledgers need the async driver: postgresql+asyncpg://...")
        connect_args: dict[str, Any] = {}
        if schema_name:
            connect_args["server_settings"] = {"search_path": schema_name}
        engine = create_async_engine(
            url, echo=echo, pool_size=pool_size, pool_pre_ping=True, connect_args=connect_args
        )
    else:
        raise ValueError(
            f"unsupported ledger URL {url.split(':', 1)[0]!r}: use SQLite or PostgreSQL"
        )
    return Ledger(engine, clock=clock)
