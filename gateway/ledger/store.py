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

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection as SyncConnection
from sqlalchemy import and_, bindparam, delete, event, false, func, or_, select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError
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
    REASON_RETRY,
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
    NotRetryableError,
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
_CONFLICT_RETRIES = 3
#: PostgreSQL SQLSTATEs of a transaction that lost a lock conflict and can be redone.
_CONFLICT_STATES = frozenset({"40P01", "40001"})

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
    #: Pending statuses this one (or its batch) let through: they were applied
    #: now, and their entries are news too (e.g. a late delivery).
    released: tuple[Applied, ...] = ()


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
    #: Pending statuses of the new attempt, applied once it existed.
    released: tuple[Applied, ...] = ()


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
        #: SQLite: every write transaction is BEGIN IMMEDIATE, so writers (of
        #: any process) never overlap and a read inside one is final.
        self._serial_writes = engine.dialect.name == "sqlite"
        self._write_lock = asyncio.Lock() if self._serial_writes else None

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
        async with self._write() as conn:
            if self.dialect == "postgresql":
                await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7243011)")
            await conn.run_sync(_run_migrations)

    async def close(self) -> None:
        """Dispose of the engine's connections."""
        await self._engine.dispose()

    def _read(self) -> AsyncConnection:
        return self._reader.connect()

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction. On SQLite, writers of this process queue on a lock
        first: SQLite's busy handler sleeps in steps of up to 100 ms, so it is
        kept for writers of other processes only."""
        if self._write_lock is None:
            async with self._engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self._engine.begin() as conn:
            yield conn

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
        has_pending = False
        async with self._write() as conn:
            created = await _insert_ignore(conn, schema.messages, values)
            if created:
                await conn.execute(
                    schema.attempts.insert(),
                    {
                        "message_id": new.message_id,
                        "attempt": 1,
                        "channel": new.channel,
                        "provider": new.provider,
                        "address": new.address,
                        "state": S.DELIVERY_STATE_ACCEPTED,
                        "provider_message_id": "",
                        "dispatched": False,
                        "created_at": now,
                    },
                )
                entry = await _append(
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
                        schema.timers.insert(),
                        {
                            "message_id": new.message_id,
                            "due_at": _step_due(now, step.wait, now, new.fallback),
                            "attempt": 1,
                        },
                    )
            if created:
                attempt = Attempt(
                    attempt=1,
                    channel=new.channel,
                    provider=new.provider,
                    address=new.address,
                    state=S.DELIVERY_STATE_ACCEPTED,
                    provider_message_id="",
                    dispatched=False,
                    created_at=_out_time(now),
                )
                record = _build_record(
                    values, [attempt], active=new.fallback is not None, timeline=[entry]
                )
                if self._serial_writes:
                    # No other writer can commit before us: this look is final.
                    has_pending = (
                        await conn.scalar(
                            select(schema.pending.c.event_id)
                            .where(schema.pending.c.message_id == new.message_id)
                            .limit(1)
                        )
                        is not None
                    )
            else:
                row = (
                    await conn.execute(
                        select(schema.messages.c.message_id, schema.messages.c.fingerprint).where(
                            schema.messages.c.idempotency_key == new.idempotency_key
                        )
                    )
                ).first()
                if row is None:
                    raise IdempotencyConflictError(
                        f"message id {new.message_id} is already used by another idempotency key"
                    )
                if new.fingerprint and row.fingerprint != new.fingerprint:
                    raise IdempotencyConflictError(
                        f"idempotency key {new.idempotency_key!r} was used for a different request"
                    )
                existing_id = str(row.message_id)
        if not created:
            return await self.get(existing_id), False
        # Statuses that arrived before the message. With concurrent writers
        # (PostgreSQL) they are looked for after our commit; the status side
        # re-checks after its commit (see _apply_batch_and_drain), so whichever
        # commits second drains them.
        if (has_pending or not self._serial_writes) and (
            await self._drain(message_ids=[new.message_id])
        ).applied_ids:
            record = await self.get(new.message_id)
        return record, True

    async def mark_dispatched(self, message_id: str, attempt: int) -> None:
        """Note that the command of ``attempt`` was confirmed by the broker."""
        async with self._write() as conn:
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
        [applied] = await self.record_statuses([update])
        return applied

    async def record_statuses(self, updates: Sequence[StatusUpdate]) -> list[Applied]:
        """Apply several statuses in one transaction (group commit), in order.

        Same semantics as :meth:`record_status` for each; the records returned
        show each message as of the end of the batch. All or nothing: if the
        transaction fails, none is applied (retry them, e.g. one by one).
        """
        if not updates:
            return []
        items = [_Item(u, status_event_id(u), from_pending=False) for u in updates]
        return await self._apply_and_drain(items)

    async def _apply_and_drain(self, items: list[_Item]) -> list[Applied]:
        drained = await self._apply_batch_and_drain(items)
        if drained.released and drained.results:
            # Reported once, with the first status of the batch.
            first = drained.results[0]
            drained.results[0] = replace(first, released=tuple(drained.released))
        return drained.results

    async def _apply_batch_and_drain(self, items: list[_Item]) -> _Drained:
        """Apply a batch, then drain the pending statuses it released."""
        for attempt in range(1, _CONFLICT_RETRIES + 1):
            try:
                async with self._write() as conn:
                    outcome = await _apply_batch(
                        conn, items, _db_time(self.now()), final_view=self._serial_writes
                    )
                break
            except DBAPIError as exc:
                # PostgreSQL may pick this transaction as a deadlock victim when
                # replicas drain the same pending statuses; it is safe to redo.
                if attempt == _CONFLICT_RETRIES or not _is_conflict(exc):
                    raise
                await asyncio.sleep(0.01 * attempt)
        latest = {a.record.message_id: a.record for a in outcome.results if a.record}
        applied_ids = {
            i.event_id
            for i, a in zip(items, outcome.results, strict=True)
            if not a.pending and not a.duplicate
        }
        # Statuses waiting for a provider id that is now linked; and statuses
        # kept pending for a message (or provider id) that was recorded between
        # our read and our commit: whoever commits second drains.
        # (With serialised writers, SQLite, what the batch saw was final.)
        message_ids: set[str] = set()
        provider_ids = set(outcome.linked)
        if not self._serial_writes:
            if outcome.unknown_message_ids:
                message_ids = await self._existing(outcome.unknown_message_ids)
            if outcome.unknown_provider_ids:
                provider_ids |= await self._linked(outcome.unknown_provider_ids)
        drained = await self._drain(message_ids=message_ids, provider_ids=provider_ids)
        if not drained.applied_ids:
            return _Drained(outcome.results, latest, applied_ids, [])
        latest.update(drained.latest)
        by_provider_id = {
            a.provider_message_id: r
            for r in latest.values()
            for a in r.attempts
            if a.provider_message_id
        }
        results: list[Applied] = []
        for item, result in zip(items, outcome.results, strict=True):
            if result.record is not None:
                result = replace(result, record=latest[result.record.message_id])
            if result.pending and item.event_id in drained.applied_ids:
                u = item.update
                record = latest.get(u.message_id) or by_provider_id.get(u.provider_message_id)
                result = replace(result, record=record, pending=False)
            results.append(result)
        released = [r for r in drained.results if r.entries or r.fallback_due]
        return _Drained(results, latest, applied_ids | drained.applied_ids, released)

    async def _existing(self, message_ids: set[str]) -> set[str]:
        async with self._read() as conn:
            rows = await conn.execute(
                select(schema.messages.c.message_id).where(
                    schema.messages.c.message_id.in_(sorted(message_ids))
                )
            )
            return {str(r.message_id) for r in rows}

    async def _linked(self, provider_ids: set[str]) -> set[str]:
        async with self._read() as conn:
            rows = await conn.execute(
                select(schema.attempts.c.provider_message_id).where(
                    schema.attempts.c.provider_message_id.in_(sorted(provider_ids))
                )
            )
            return {str(r.provider_message_id) for r in rows}

    async def _drain(
        self, *, message_ids: Iterable[str] = (), provider_ids: Iterable[str] = ()
    ) -> _Drained:
        """Apply pending statuses of these messages / provider ids, oldest first.

        Each is taken (deleted) in the transaction that applies it, so
        concurrent drains never apply one twice and a crash loses none.
        """
        mids, pids = sorted(set(message_ids)), sorted(set(provider_ids))
        if not mids and not pids:
            return _Drained([], {}, set(), [])
        p = schema.pending.c
        conditions = []
        if mids:
            conditions.append(p.message_id.in_(mids))
        if pids:
            conditions.append(p.provider_message_id.in_(pids))
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    select(p.event_id, p.payload)
                    .where(or_(*conditions))
                    .order_by(p.received_at, p.event_id)
                )
            ).all()
        if not rows:
            return _Drained([], {}, set(), [])
        items = [
            _Item(_update_from_json(r.payload), str(r.event_id), from_pending=True) for r in rows
        ]
        drained = await self._apply_batch_and_drain(items)
        # Flatten: what these statuses released in turn is released too.
        return replace(drained, results=[*drained.results, *drained.released], released=[])

    async def purge(self, before: datetime, *, limit: int = 1000) -> int:
        """Retention: delete settled messages last updated before ``before``.

        Settled means a final state or DELIVERED, with no fallback timer left.
        Their attempts, timeline and remembered event ids go with them (a
        status for them arriving later would be kept pending, then purged by
        :meth:`purge_pending`), and their idempotency keys become free again.
        Deletes at most ``limit`` messages per call; returns how many.
        """
        m = schema.messages.c
        settled = [*FINAL_STATES, S.DELIVERY_STATE_DELIVERED]
        async with self._write() as conn:
            ids = [
                str(r.message_id)
                for r in await conn.execute(
                    select(m.message_id)
                    .where(
                        m.updated_at < _db_time(before),
                        m.state.in_(settled),
                        ~select(schema.timers.c.message_id)
                        .where(schema.timers.c.message_id == m.message_id)
                        .exists(),
                    )
                    .order_by(m.updated_at)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ]
            if not ids:
                return 0
            for table in (schema.seen_events, schema.timeline, schema.attempts, schema.timers):
                await conn.execute(delete(table).where(table.c.message_id.in_(ids)))
            await conn.execute(delete(schema.messages).where(m.message_id.in_(ids)))
        return len(ids)

    async def purge_pending(self, older_than: datetime) -> int:
        """Drop pending statuses received before ``older_than`` (never matched); returns
        how many."""
        async with self._write() as conn:
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
            records = await _records(conn, rows)
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
        async with self._write() as conn:
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
        drained = await self._drain(message_ids=[message_id])
        return TimerOutcome(
            action=TimerAction.SWITCHED,
            record=record,
            entries=tuple(entries),
            command=command,
            released=tuple(r for r in drained.results if r.entries),
        )

    async def retry(self, message_id: str) -> tuple[MessageRecord, SendMessageCommand]:
        """Explicit retry: a new attempt on the message's current channel.

        The only way out of a failed final state (FAILED, UNDELIVERED, EXPIRED,
        CANCELED); anything else raises :class:`NotRetryableError`. The message
        goes back to ACCEPTED with attempt + 1 (a ``retry`` entry in the
        timeline); statuses of the earlier attempts no longer move it, and a
        DELIVERED of one of them becomes a late delivery. Returns the record
        and the command to publish (then call :meth:`mark_dispatched`). A
        fallback policy is not restarted.
        """
        now = _db_time(self.now())
        async with self._write() as conn:
            row = await _lock_message(conn, message_id)
            if row is None:
                raise MessageNotFoundError(message_id)
            if int(row.state) not in REJECTED_STATES:
                raise NotRetryableError(
                    f"message {message_id} is {DeliveryState.Name(row.state)}; only a failed "
                    "message can be retried"
                )
            if not row.command:
                raise NotRetryableError(f"message {message_id} has no stored command")
            attempts = await _attempts(conn, message_id)
            current = attempts[int(row.attempt) - 1]
            number = len(attempts) + 1
            await conn.execute(
                schema.attempts.insert(),
                {
                    "message_id": message_id,
                    "attempt": number,
                    "channel": current.channel,
                    "provider": current.provider,
                    "address": current.address,
                    "state": S.DELIVERY_STATE_ACCEPTED,
                    "provider_message_id": "",
                    "dispatched": False,
                    "created_at": now,
                },
            )
            await conn.execute(
                update(schema.messages)
                .where(schema.messages.c.message_id == message_id)
                .values(attempt=number)
            )
            new_attempt = replace(
                current,
                attempt=number,
                state=S.DELIVERY_STATE_ACCEPTED,
                provider_message_id="",
                dispatched=False,
                created_at=_out_time(now),
            )
            await _transition(
                conn,
                row,
                state=S.DELIVERY_STATE_ACCEPTED,
                attempt=new_attempt,
                reason_code=REASON_RETRY,
                reason=f"explicit retry after {DeliveryState.Name(row.state)}",
                permanent=False,
                now=now,
            )
            command = _next_command(
                row.command, current.channel, current.provider, current.address, number
            )
        # Statuses of the new attempt may have arrived before it existed.
        await self._drain(message_ids=[message_id])
        return await self.get(message_id), command

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
                        a.dispatched == false(),
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


def _is_conflict(exc: DBAPIError) -> bool:
    orig = exc.orig
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state in _CONFLICT_STATES


def _run_migrations(connection: SyncConnection) -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    alembic_command.upgrade(config, "head")


async def _insert_ignore(conn: AsyncConnection, table: Any, values: Mapping[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when the row was inserted."""
    insert = pg_dialect.insert if conn.dialect.name == "postgresql" else sqlite_dialect.insert
    # Parameters passed separately: the statement's compiled form is cached.
    stmt = insert(table).on_conflict_do_nothing()
    return (await conn.execute(stmt, dict(values))).rowcount == 1


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


async def _attempts(conn: AsyncConnection, message_id: str) -> list[Attempt]:
    return [att for _, att in await _attempts_of(conn, [message_id])]


def _match_attempt(attempts: Sequence[Attempt], update: StatusUpdate, current: int) -> Attempt:
    """The attempt a status is about: by provider id, then attempt number, then the
    latest attempt on the status's connector, else the current attempt. An attempt
    that already has another provider id never matches."""
    if update.provider_message_id:
        for att in attempts:
            if att.provider_message_id == update.provider_message_id:
                return att

    def fits(att: Attempt) -> bool:
        return (
            (not update.channel or att.channel == update.channel)
            and (not update.provider or att.provider == update.provider)
            and (not att.provider_message_id or not update.provider_message_id)
        )

    if 0 < update.attempt <= len(attempts) and fits(attempts[update.attempt - 1]):
        return attempts[update.attempt - 1]
    if update.channel or update.provider:
        for att in reversed(attempts):
            if fits(att):
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


@dataclass
class _Drained:
    results: list[Applied]
    #: The latest record of every message touched.
    latest: dict[str, MessageRecord]
    #: Event ids applied (not left pending, not duplicates).
    applied_ids: set[str]
    #: Results of pending statuses that were applied because of this batch.
    released: list[Applied]


@dataclass(frozen=True)
class _Item:
    update: StatusUpdate
    event_id: str
    from_pending: bool


@dataclass
class _Msg:
    """A locked message while a batch is applied to it (changes kept in memory)."""

    values: dict[str, Any]
    attempts: list[Attempt]
    timer: bool
    dirty: bool = False
    dirty_attempts: set[int] = field(default_factory=set)
    #: None, "due" (set ``timer_due``) or "delete".
    timer_op: str | None = None
    timer_due: datetime | None = None

    @property
    def message_id(self) -> str:
        return str(self.values["message_id"])

    def policy(self) -> FallbackPolicy | None:
        raw = self.values["fallback_json"]
        return FallbackPolicy.from_json(json.loads(raw)) if raw else None


@dataclass
class _BatchOutcome:
    results: list[Applied]
    linked: set[str]
    unknown_message_ids: set[str]
    unknown_provider_ids: set[str]


async def _apply_batch(
    conn: AsyncConnection, items: Sequence[_Item], now: datetime, *, final_view: bool = False
) -> _BatchOutcome:
    """Apply statuses in one transaction with a fixed number of statements.

    ``final_view``: no other writer can commit before this transaction does
    (SQLite), so what it reads is final.

    Lock order: message rows (sorted, one statement), then pending and seen
    rows, as everywhere else in the ledger.
    """
    m, a, p = schema.messages.c, schema.attempts.c, schema.pending.c
    # Which message each status is about.
    pid_only = sorted({i.update.provider_message_id for i in items if not i.update.message_id})
    pid_map: dict[str, str] = {}
    if pid_only:
        for r in await conn.execute(
            select(a.provider_message_id, a.message_id)
            .where(a.provider_message_id.in_(pid_only))
            .order_by(a.created_at)
        ):
            pid_map[str(r.provider_message_id)] = str(r.message_id)
    mids = sorted(
        {i.update.message_id or pid_map.get(i.update.provider_message_id, "") for i in items} - {""}
    )
    msgs: dict[str, _Msg] = {}
    if mids:
        rows = (
            await conn.execute(
                select(schema.messages)
                .where(m.message_id.in_(mids))
                .order_by(m.message_id)
                .with_for_update()
            )
        ).all()
        for r in rows:
            msgs[str(r.message_id)] = _Msg(values=dict(r._mapping), attempts=[], timer=False)
    taken: set[str] = set()
    from_pending = sorted({i.event_id for i in items if i.from_pending})
    if from_pending:
        taken = {
            str(r.event_id)
            for r in await conn.execute(
                delete(schema.pending).where(p.event_id.in_(from_pending)).returning(p.event_id)
            )
        }
    if msgs:
        for att in await _attempts_of(conn, sorted(msgs)):
            msgs[att[0]].attempts.append(att[1])
        with_policy = sorted(k for k, v in msgs.items() if v.values["fallback_json"])
        if with_policy:
            for r in await conn.execute(
                select(schema.timers.c.message_id).where(
                    schema.timers.c.message_id.in_(with_policy)
                )
            ):
                msgs[str(r.message_id)].timer = True
    candidate_ids = sorted({i.event_id for i in items})
    seen = {
        str(r.event_id)
        for r in await conn.execute(
            select(schema.seen_events.c.event_id).where(
                schema.seen_events.c.event_id.in_(candidate_ids)
            )
        )
    }
    linked_now: dict[str, str] = {}
    pending_rows: dict[str, dict[str, Any]] = {}
    seen_rows: list[dict[str, Any]] = []
    entry_rows: list[dict[str, Any]] = []
    # Per item: (kind of result, message, indexes into entry_rows, fallback due)
    plans: list[tuple[str, _Msg | None, list[int], bool]] = []
    linked: set[str] = set()
    unknown_mids: set[str] = set()
    unknown_pids: set[str] = set()
    for item in items:
        u = item.update
        if item.from_pending and item.event_id not in taken:
            plans.append(("duplicate", None, [], False))  # another drain applied it
            continue
        mid = (
            u.message_id
            or pid_map.get(u.provider_message_id)
            or linked_now.get(u.provider_message_id, "")
        )
        msg = msgs.get(mid)
        early_attempt = (
            msg is not None
            and msg.values["fallback_json"] is not None
            and u.attempt > len(msg.attempts)
        )
        if msg is None or early_attempt:
            pending_rows.setdefault(
                item.event_id,
                {
                    "event_id": item.event_id,
                    "message_id": u.message_id,
                    "provider_message_id": u.provider_message_id,
                    "payload": _update_to_json(u),
                    "received_at": now,
                },
            )
            if msg is None:
                if u.message_id:
                    unknown_mids.add(u.message_id)
                else:
                    unknown_pids.add(u.provider_message_id)
            plans.append(("pending", msg, [], False))
            continue
        if item.event_id in seen:
            plans.append(("duplicate", msg, [], False))
            continue
        seen.add(item.event_id)
        seen_rows.append({"event_id": item.event_id, "message_id": mid, "recorded_at": now})
        entries, due, new_links = _apply_one(msg, u, item.event_id, now)
        for pid in new_links:
            linked_now[pid] = mid
            linked.add(pid)
        start = len(entry_rows)
        entry_rows.extend(entries)
        plans.append(("applied", msg, list(range(start, len(entry_rows))), due))
    # Write everything back: a handful of statements whatever the batch size.
    if seen_rows:
        # Sorted: concurrent transactions take unique-index locks in one order.
        seen_rows.sort(key=lambda r: str(r["event_id"]))
        await _insert_many_ignore(conn, schema.seen_events, seen_rows)
    if pending_rows:
        await _insert_many_ignore(
            conn, schema.pending, [pending_rows[k] for k in sorted(pending_rows)]
        )
    seqs: list[int] = []
    if entry_rows:
        result = await conn.execute(
            schema.timeline.insert().returning(schema.timeline.c.seq, sort_by_parameter_order=True),
            entry_rows,
        )
        seqs = [int(r.seq) for r in result]
    attempt_rows = [
        {
            "b_mid": msg.message_id,
            "b_attempt": att.attempt,
            "state": att.state,
            "provider_message_id": att.provider_message_id,
        }
        for msg in msgs.values()
        for att in msg.attempts
        if att.attempt in msg.dirty_attempts
    ]
    if attempt_rows:
        await conn.execute(
            update(schema.attempts)
            .where(a.message_id == bindparam("b_mid"), a.attempt == bindparam("b_attempt"))
            .values(state=bindparam("state"), provider_message_id=bindparam("provider_message_id")),
            attempt_rows,
        )
    message_rows = [
        {
            "b_mid": msg.message_id,
            "state": msg.values["state"],
            "reason_code": msg.values["reason_code"],
            "reason": msg.values["reason"],
            "late_delivery": msg.values["late_delivery"],
            "updated_at": msg.values["updated_at"],
        }
        for msg in msgs.values()
        if msg.dirty
    ]
    if message_rows:
        await conn.execute(
            update(schema.messages)
            .where(m.message_id == bindparam("b_mid"))
            .values(
                state=bindparam("state"),
                reason_code=bindparam("reason_code"),
                reason=bindparam("reason"),
                late_delivery=bindparam("late_delivery"),
                updated_at=bindparam("updated_at"),
            ),
            message_rows,
        )
    timer_deletes = sorted(k for k, v in msgs.items() if v.timer_op == "delete")
    if timer_deletes:
        await conn.execute(
            delete(schema.timers).where(schema.timers.c.message_id.in_(timer_deletes))
        )
    timer_dues = [
        {"b_mid": k, "due_at": v.timer_due} for k, v in msgs.items() if v.timer_op == "due"
    ]
    if timer_dues:
        await conn.execute(
            update(schema.timers)
            .where(schema.timers.c.message_id == bindparam("b_mid"))
            .values(due_at=bindparam("due_at")),
            timer_dues,
        )
    records = {k: _build_record(v.values, v.attempts, active=v.timer) for k, v in msgs.items()}
    results: list[Applied] = []
    for kind, msg, indexes, due in plans:
        record = records[msg.message_id] if msg is not None else None
        if kind == "applied":
            made = tuple(_entry(entry_rows[i], seqs[i]) for i in indexes)
            results.append(Applied(record=record, entries=made, fallback_due=due))
        else:
            results.append(
                Applied(record=record, duplicate=kind == "duplicate", pending=kind == "pending")
            )
    if linked and final_view:
        # Nobody else writes before our commit: only provider ids with pending
        # statuses need a drain.
        result = await conn.execute(
            select(p.provider_message_id).where(p.provider_message_id.in_(sorted(linked)))
        )
        linked = {str(r.provider_message_id) for r in result}
    return _BatchOutcome(
        results=results,
        linked=linked,
        unknown_message_ids=unknown_mids,
        unknown_provider_ids=unknown_pids,
    )


def _apply_one(
    msg: _Msg, u: StatusUpdate, event_id: str, now: datetime
) -> tuple[list[dict[str, Any]], bool, list[str]]:
    """Apply one status to a locked message in memory: (timeline rows, fallback due now,
    provider ids newly linked to an attempt)."""
    current_number = int(msg.values["attempt"])
    target = _match_attempt(msg.attempts, u, current_number)
    linked: list[str] = []
    changes: dict[str, Any] = {}
    if u.provider_message_id and not target.provider_message_id:
        changes["provider_message_id"] = u.provider_message_id
        linked.append(u.provider_message_id)
    attempt_advanced = advance(target.state, u.state)
    if attempt_advanced:
        changes["state"] = u.state
    if changes:
        msg.attempts[target.attempt - 1] = replace(target, **changes)
        msg.dirty_attempts.add(target.attempt)
    timer_active = msg.timer
    base: dict[str, Any] = {
        "message_id": msg.message_id,
        "attempt": target.attempt,
        "channel": u.channel or target.channel,
        "provider": u.provider or target.provider,
        "provider_status": u.provider_status,
        "reason_code": u.reason_code,
        "reason": u.reason,
        "permanent": u.permanent,
        "provider_message_id": u.provider_message_id or target.provider_message_id,
        "trace_id": u.trace_id,
        "event_id": event_id,
        "occurred_at": _db_time(u.occurred_at) if u.occurred_at else None,
        "recorded_at": now,
    }
    rows: list[dict[str, Any]] = []
    due = False
    state = int(msg.values["state"])
    values: dict[str, Any] = {}
    if target.attempt == current_number:
        if timer_active and u.state in REJECTED_STATES:
            if attempt_advanced:
                # The fallback engine decides what comes next (switch or exhausted).
                rows.append(dict(base, kind=EntryKind.ATTEMPT.value, state=u.state))
                msg.timer_op, msg.timer_due = "due", now
                due = True
        elif advance(state, u.state):
            rows.append(dict(base, kind=EntryKind.TRANSITION.value, state=u.state))
            values.update(state=u.state, reason_code=u.reason_code, reason=u.reason)
            policy = msg.policy()
            if timer_active and policy is not None:
                step = policy.steps[target.attempt - 1]
                if success_reached(u.state, step.success_state):
                    msg.timer, msg.timer_op = False, "delete"
    elif attempt_advanced:
        late = u.state in (S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_READ) and not bool(
            msg.values["late_delivery"]
        )
        if late:
            reason = u.reason or (
                f"attempt {target.attempt} on {target.channel}/{target.provider} delivered "
                "after the switch; suppress the duplicate"
            )
            rows.append(
                dict(
                    base,
                    kind=EntryKind.LATE_DELIVERY.value,
                    state=u.state,
                    reason_code=REASON_LATE_DELIVERY,
                    reason=reason,
                )
            )
            values["late_delivery"] = True
            if timer_active:
                # The recipient has it: trying more channels would only add duplicates.
                msg.timer, msg.timer_op = False, "delete"
            if advance(state, u.state):
                values.update(state=u.state, reason_code=REASON_LATE_DELIVERY, reason=reason)
        else:
            rows.append(dict(base, kind=EntryKind.ATTEMPT.value, state=u.state))
    if rows or values:
        values["updated_at"] = now
        msg.values.update(values)
        msg.dirty = True
    return rows, due, linked


def _entry(row: Mapping[Any, Any], seq: int) -> StatusEntry:
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
        occurred_at=_opt_out_time(row["occurred_at"]),
        recorded_at=_out_time(row["recorded_at"]),
    )


async def _insert_many_ignore(
    conn: AsyncConnection, table: Any, rows: list[dict[str, Any]]
) -> None:
    """Multi-row INSERT ... ON CONFLICT DO NOTHING."""
    insert = pg_dialect.insert if conn.dialect.name == "postgresql" else sqlite_dialect.insert
    await conn.execute(insert(table).values(rows).on_conflict_do_nothing())


async def _attempts_of(
    conn: AsyncConnection, message_ids: Sequence[str]
) -> list[tuple[str, Attempt]]:
    rows = (
        await conn.execute(
            select(schema.attempts)
            .where(schema.attempts.c.message_id.in_(message_ids))
            .order_by(schema.attempts.c.message_id, schema.attempts.c.attempt)
        )
    ).all()
    return [(str(r.message_id), _attempt(r)) for r in rows]


def _attempt(r: Row[Any]) -> Attempt:
    return Attempt(
        attempt=int(r.attempt),
        channel=str(r.channel),
        provider=str(r.provider),
        address=str(r.address),
        state=int(r.state),
        provider_message_id=str(r.provider_message_id),
        dispatched=bool(r.dispatched),
        created_at=_out_time(r.created_at),
    )


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
        result = await conn.execute(
            select(schema.timeline).where(t.message_id == message_id).order_by(t.seq)
        )
        entries = [_entry(e._mapping, int(e.seq)) for e in result]
    active = (
        values["fallback_json"] is not None
        and await conn.scalar(
            select(schema.timers.c.message_id).where(schema.timers.c.message_id == message_id)
        )
        is not None
    )
    return _build_record(values, attempts, active=active, timeline=entries)


async def _records(conn: AsyncConnection, rows: Sequence[Row[Any]]) -> list[MessageRecord]:
    """Records (without timeline) of many message rows, in three queries."""
    ids = [str(r.message_id) for r in rows]
    if not ids:
        return []
    attempts: dict[str, list[Attempt]] = {i: [] for i in ids}
    for mid, att in await _attempts_of(conn, ids):
        attempts[mid].append(att)
    with_policy = [str(r.message_id) for r in rows if r.fallback_json]
    active: set[str] = set()
    if with_policy:
        result = await conn.execute(
            select(schema.timers.c.message_id).where(schema.timers.c.message_id.in_(with_policy))
        )
        active = {str(r.message_id) for r in result}
    return [
        _build_record(r._mapping, attempts[str(r.message_id)], active=str(r.message_id) in active)
        for r in rows
    ]


def _build_record(
    values: Mapping[Any, Any],
    attempts: Sequence[Attempt],
    *,
    active: bool,
    timeline: Sequence[StatusEntry] = (),
) -> MessageRecord:
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
        expires_at=_opt_out_time(values["expires_at"]),
        trace_id=str(values["trace_id"]),
        reason_code=str(values["reason_code"]),
        reason=str(values["reason"]),
        late_delivery=bool(values["late_delivery"]),
        created_at=_out_time(values["created_at"]),
        updated_at=_out_time(values["updated_at"]),
        attempts=tuple(attempts),
        timeline=tuple(timeline),
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
