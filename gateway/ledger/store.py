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
import contextlib
import json
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection as SyncConnection
from sqlalchemy import and_, delete, event, false, func, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.contract.status import FINAL_STATES
from gateway.ledger import calls, schema
from gateway.ledger.apply import StatusItem, apply_batch
from gateway.ledger.calls import (
    CallCommandNotFoundError,
    CallCommandRecord,
    CallOutcome,
    CallOutcomeApplied,
    NewCallCommand,
)
from gateway.ledger.models import (
    REASON_FALLBACK_EXHAUSTED,
    REASON_FALLBACK_TTL,
    REASON_REJECTED,
    REASON_RETRY,
    REASON_TIMEOUT,
    REJECTED_STATES,
    Applied,
    Attempt,
    EntryKind,
    FallbackPolicy,
    IdempotencyConflictError,
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
from gateway.ledger.paging import decode_token, encode_token, filter_digest
from gateway.ledger.rows import (
    append_entry,
    build_record,
    db_time,
    gateway_event_id,
    gateway_transition,
    insert_ignore,
    load_attempts,
    load_record,
    load_records,
    lock_message,
    message_id_for_provider_id,
    next_command,
    out_time,
    status_event_id,
    step_due,
    update_from_json,
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
        # alembic keeps its migration context in module globals: two upgrades
        # interleaving in one process (two ledgers on one event loop) would
        # overwrite each other's, so they take turns here as well.
        async with _migration_lock(), self._write() as conn:
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
        now = db_time(new.created_at or self.now())
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
            "expires_at": db_time(new.expires_at) if new.expires_at else None,
            "trace_id": new.trace_id,
            "reason_code": "",
            "reason": "",
            "late_delivery": False,
            "created_at": now,
            "updated_at": now,
        }
        has_pending = False
        async with self._write() as conn:
            created = await insert_ignore(conn, schema.messages, values)
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
                entry = await append_entry(
                    conn,
                    new.message_id,
                    kind=EntryKind.TRANSITION,
                    state=S.DELIVERY_STATE_ACCEPTED,
                    attempt=1,
                    channel=new.channel,
                    provider=new.provider,
                    trace_id=new.trace_id,
                    event_id=gateway_event_id(new.message_id, "accept", 1, 1),
                    occurred_at=now,
                    recorded_at=now,
                )
                if new.fallback is not None:
                    step = new.fallback.steps[0]
                    await conn.execute(
                        schema.timers.insert(),
                        {
                            "message_id": new.message_id,
                            "due_at": step_due(now, step.wait, now, new.fallback),
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
                    created_at=out_time(now),
                )
                record = build_record(
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
        items = [StatusItem(u, status_event_id(u), from_pending=False) for u in updates]
        return await self._apply_and_drain(items)

    async def _apply_and_drain(self, items: list[StatusItem]) -> list[Applied]:
        drained = await self._apply_batch_and_drain(items)
        if drained.released and drained.results:
            # Reported once, with the first status of the batch.
            first = drained.results[0]
            drained.results[0] = replace(first, released=tuple(drained.released))
        return drained.results

    async def _apply_batch_and_drain(self, items: list[StatusItem]) -> _Drained:
        """Apply a batch, then drain the pending statuses it released."""
        for attempt in range(1, _CONFLICT_RETRIES + 1):
            try:
                async with self._write() as conn:
                    outcome = await apply_batch(
                        conn, items, db_time(self.now()), final_view=self._serial_writes
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
            StatusItem(update_from_json(r.payload), str(r.event_id), from_pending=True)
            for r in rows
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
                        m.updated_at < db_time(before),
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
                .where(schema.pending.c.received_at < db_time(older_than))
                .returning(schema.pending.c.event_id)
            )
            return len(result.all())

    async def pending_count(self) -> int:
        """Statuses waiting for their message (for metrics and tests)."""
        async with self._read() as conn:
            return int(await conn.scalar(select(func.count()).select_from(schema.pending)) or 0)

    # -- call commands -----------------------------------------------------

    async def accept_call_command(self, new: NewCallCommand) -> tuple[CallCommandRecord, bool]:
        """Record a call command as PENDING, keyed by its idempotency key.

        Returns ``(record, True)`` when this call created it and ``(existing
        record, False)`` when the key was seen before (from any process): the
        caller then must not publish again unless ``record.dispatched`` is
        False. Raises :class:`IdempotencyConflictError` when the key was used
        for another request or the command id is taken.
        """
        async with self._write() as conn:
            return await calls.accept_call_command(conn, new, self.now())

    async def mark_call_dispatched(self, command_id: str) -> None:
        """Note that the broker confirmed the call command."""
        async with self._write() as conn:
            await calls.mark_call_dispatched(conn, command_id, self.now())

    async def record_call_outcome(self, outcome: CallOutcome) -> CallOutcomeApplied:
        """Apply a ``call.command`` outcome (idempotent; the first outcome wins).

        An outcome for an unknown command id is stored as a command of its own.
        """
        async with self._write() as conn:
            return await calls.record_call_outcome(conn, outcome, self.now())

    async def find_call_command(self, command_id: str) -> CallCommandRecord | None:
        """The call command, or None."""
        async with self._read() as conn:
            return await calls.load_call_command(conn, command_id)

    async def get_call_command(self, command_id: str) -> CallCommandRecord:
        """The call command; :class:`CallCommandNotFoundError` for an unknown id."""
        record = await self.find_call_command(command_id)
        if record is None:
            raise CallCommandNotFoundError(command_id)
        return record

    async def purge_call_commands(self, before: datetime, *, limit: int = 1000) -> int:
        """Retention: delete call commands last updated before ``before`` (at most
        ``limit``); their idempotency keys become free again. Returns how many."""
        async with self._write() as conn:
            return await calls.purge_call_commands(conn, before, limit)

    # -- reads -------------------------------------------------------------

    async def find(self, message_id: str) -> MessageRecord | None:
        """The message with its attempts and timeline, or None."""
        async with self._read() as conn:
            return await load_record(conn, message_id, timeline=True)

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
            return await load_record(conn, str(mid), timeline=True) if mid else None

    async def find_by_provider_message_id(self, provider_message_id: str) -> MessageRecord | None:
        """The message one of whose attempts has this provider id, or None."""
        async with self._read() as conn:
            mid = await message_id_for_provider_id(conn, provider_message_id)
            return await load_record(conn, mid, timeline=True) if mid else None

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
        digest = filter_digest(flt)
        query = select(schema.messages)
        m = schema.messages.c
        if flt.conversation_id:
            query = query.where(m.conversation_id == flt.conversation_id)
        if flt.correlation_id:
            query = query.where(m.correlation_id == flt.correlation_id)
        if flt.since is not None:
            query = query.where(m.created_at >= db_time(flt.since))
        if flt.until is not None:
            query = query.where(m.created_at < db_time(flt.until))
        if page_token:
            created, last_id = decode_token(page_token, digest)
            query = query.where(
                or_(m.created_at < created, and_(m.created_at == created, m.message_id < last_id))
            )
        query = query.order_by(m.created_at.desc(), m.message_id.desc()).limit(size + 1)
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
            more = len(rows) > size
            rows = rows[:size]
            records = await load_records(conn, rows)
        token = ""
        if more and rows:
            token = encode_token(rows[-1].created_at, str(rows[-1].message_id), digest)
        return Page(messages=tuple(records), next_page_token=token)

    # -- fallback timers ---------------------------------------------------

    async def due_timers(self, now: datetime | None = None, limit: int = 100) -> Sequence[Timer]:
        """Fallback timers due at ``now`` (default: the ledger clock), earliest first."""
        at = db_time(now or self.now())
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
            Timer(message_id=str(r.message_id), due_at=out_time(r.due_at), attempt=int(r.attempt))
            for r in rows
        ]

    async def next_timer_due(self) -> datetime | None:
        """When the earliest fallback timer is due (None without timers)."""
        async with self._read() as conn:
            due = await conn.scalar(select(func.min(schema.timers.c.due_at)))
        return out_time(due) if due is not None else None

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
        at = db_time(now or self.now())
        async with self._write() as conn:
            row = await lock_message(conn, message_id)
            timer = (
                await conn.execute(
                    select(schema.timers).where(schema.timers.c.message_id == message_id)
                )
            ).first()
            if row is None or timer is None or timer.due_at > at or row.fallback_json is None:
                return TimerOutcome(action=TimerAction.NOTHING, record=None)
            policy = FallbackPolicy.from_json(json.loads(row.fallback_json))
            attempts = await load_attempts(conn, message_id)
            current = attempts[int(row.attempt) - 1]
            step = policy.steps[current.attempt - 1]
            drop_timer = delete(schema.timers).where(schema.timers.c.message_id == message_id)
            if int(row.state) in FINAL_STATES or success_reached(current.state, step.success_state):
                await conn.execute(drop_timer)
                return TimerOutcome(
                    action=TimerAction.DONE, record=await load_record(conn, message_id)
                )
            created = row.created_at
            ttl_deadline = created + policy.ttl if policy.ttl is not None else None
            entries: list[StatusEntry] = []
            if ttl_deadline is not None and at >= ttl_deadline:
                await conn.execute(drop_timer)
                entries.append(
                    await gateway_transition(
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
                    record=await load_record(conn, message_id),
                    entries=tuple(entries),
                )
            rejected = current.state in REJECTED_STATES
            waited_out = at >= db_time(current.created_at) + step.wait
            if not rejected and not waited_out:
                # Not due after all (e.g. a clock step): put it where it belongs.
                await conn.execute(
                    update(schema.timers)
                    .where(schema.timers.c.message_id == message_id)
                    .values(
                        due_at=step_due(db_time(current.created_at), step.wait, created, policy)
                    )
                )
                return TimerOutcome(action=TimerAction.NOTHING, record=None)
            reason_code = REASON_REJECTED if rejected else REASON_TIMEOUT
            if current.attempt >= len(policy.steps):
                await conn.execute(drop_timer)
                entries.append(
                    await gateway_transition(
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
                    record=await load_record(conn, message_id),
                    entries=tuple(entries),
                )
            nxt = policy.steps[current.attempt]
            number = current.attempt + 1
            entries.append(
                await gateway_transition(
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
                created_at=out_time(at),
            )
            await conn.execute(
                update(schema.messages)
                .where(schema.messages.c.message_id == message_id)
                .values(attempt=number)
            )
            entries.append(
                await gateway_transition(
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
                .values(due_at=step_due(at, nxt.wait, created, policy), attempt=number)
            )
            command = next_command(row.command, nxt.channel, nxt.provider, nxt.address, number)
            record = await load_record(conn, message_id)
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
        now = db_time(self.now())
        async with self._write() as conn:
            row = await lock_message(conn, message_id)
            if row is None:
                raise MessageNotFoundError(message_id)
            if int(row.state) not in REJECTED_STATES:
                raise NotRetryableError(
                    f"message {message_id} is {DeliveryState.Name(row.state)}; only a failed "
                    "message can be retried"
                )
            if not row.command:
                raise NotRetryableError(f"message {message_id} has no stored command")
            attempts = await load_attempts(conn, message_id)
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
                created_at=out_time(now),
            )
            await gateway_transition(
                conn,
                row,
                state=S.DELIVERY_STATE_ACCEPTED,
                attempt=new_attempt,
                reason_code=REASON_RETRY,
                reason=f"explicit retry after {DeliveryState.Name(row.state)}",
                permanent=False,
                now=now,
            )
            command = next_command(
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
                        a.created_at < db_time(older_than),
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
            found = [a for a in await load_attempts(conn, message_id) if a.attempt == attempt]
        if not found:
            raise MessageNotFoundError(f"{message_id} attempt {attempt}")
        att = found[0]
        return next_command(row.command, att.channel, att.provider, att.address, attempt)


# -- helpers (module level so they are shared by every transaction) ---------


def _is_conflict(exc: DBAPIError) -> bool:
    orig = exc.orig
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state in _CONFLICT_STATES


_MIGRATION_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _migration_lock() -> asyncio.Lock:
    """This event loop's lock around alembic upgrades (an asyncio lock serves one loop)."""
    loop = asyncio.get_running_loop()
    lock = _MIGRATION_LOCKS.get(loop)
    if lock is None:
        lock = _MIGRATION_LOCKS[loop] = asyncio.Lock()
    return lock


def _run_migrations(connection: SyncConnection) -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    alembic_command.upgrade(config, "head")


@dataclass
class _Drained:
    results: list[Applied]
    #: The latest record of every message touched.
    latest: dict[str, MessageRecord]
    #: Event ids applied (not left pending, not duplicates).
    applied_ids: set[str]
    #: Results of pending statuses that were applied because of this batch.
    released: list[Applied]


#: How long a connection keeps trying to switch a new database file to WAL.
_WAL_SWITCH_SECONDS = 10.0


def _enable_wal(cursor: Any) -> None:
    """Put the database in WAL mode (persistent: once per file).

    Switching needs the database to itself, and SQLite answers "database is
    locked" at once, busy timeout or not, while another process holds a
    write lock on a file not yet in WAL mode (two replicas creating the
    ledger together). That only happens on a new file, so the switch is
    retried for a while; an existing WAL file is only read.
    """
    deadline = time.monotonic() + _WAL_SWITCH_SECONDS
    while True:
        cursor.execute("PRAGMA journal_mode")
        if str(cursor.fetchone()[0]).lower() == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:  # the DB-API's OperationalError, through the async adapter
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _sqlite_setup(engine: AsyncEngine) -> None:
    """WAL, a busy timeout and BEGIN IMMEDIATE for writes, so writers from several
    processes queue instead of failing, and reads do not block them."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, load_record_row: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit BEGIN is DEFERRED).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # The busy timeout first: every statement below may meet another
        # process's lock.
        cursor.execute("PRAGMA busy_timeout=10000")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
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
