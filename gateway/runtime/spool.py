"""A durable local spool for events the broker could not confirm (architecture rule 1).

Some providers do not retry a 5xx (Twilio), so answering 503 during a broker
outage loses their traffic. For connectors whose spec sets
``spool_on_outage``, an event whose publish failed is written here instead,
and the provider gets its 2xx once the write is durable; a
:class:`SpoolDrainer` republishes the spooled messages, oldest first, with
publisher confirms once the broker is back, and deletes each row only after
its confirm. Downstream dedupes on the deterministic event id, so the
at-least-once replay (a crash between confirm and delete publishes a row
again) is harmless.

Storage is one SQLite file in WAL mode with ``synchronous=FULL``: a write
acknowledged to the caller has been fsynced, so it survives a crash or a
power loss. Every database call runs on one dedicated thread, off the event
loop; writes that arrive while a commit is in progress are grouped into the
next transaction (one fsync for many concurrent webhooks). The spool is
bounded by event count and bytes: when full it refuses (:class:`SpoolFullError`)
and the webhook gets the 503 it would get without a spool, so nothing is
ever dropped silently.

Several processes may share one file (``run --workers N``): SQLite's locks
serialize their writes, the size bound is checked inside each write
transaction, and a drainer *leases* the rows it is republishing (their
``not_before`` moves past the publish timeout), so two drainers do not
publish the same row at once and a crashed drainer's rows become due again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from gateway.contract.errors import ConfigError, TransientError
from gateway.runtime.bus import (
    BrokerUnavailableError,
    Bus,
    HeaderValue,
    OutgoingMessage,
    PublishTimeoutError,
)
from gateway.runtime.config import RuntimeSettings, SpoolSettings
from gateway.runtime.telemetry import (
    SPOOL_BYTES,
    SPOOL_DEPTH,
    SPOOL_REPLAYED,
    get_logger,
)

log = get_logger("gateway.spool")

#: ``PRAGMA user_version`` of the schema below; a newer file is refused.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    connector TEXT NOT NULL,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    type TEXT NOT NULL,
    content_type TEXT NOT NULL,
    headers TEXT NOT NULL,
    timestamp TEXT,
    correlation_id TEXT,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    spooled_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    events INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, events, bytes) VALUES (1, 0, 0);
CREATE TRIGGER IF NOT EXISTS spool_inserted AFTER INSERT ON spool BEGIN
    UPDATE totals SET events = events + 1, bytes = bytes + NEW.size WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS spool_deleted AFTER DELETE ON spool BEGIN
    UPDATE totals SET events = events - 1, bytes = bytes - OLD.size WHERE id = 1;
END;
"""

_COLUMNS = (
    "seq, connector, exchange, routing_key, message_id, type, content_type, headers, "
    "timestamp, correlation_id, body, attempts"
)

#: Bytes a row costs besides its body and headers (columns, b-tree overhead).
_ROW_OVERHEAD = 128


class SpoolError(TransientError):
    """The spool cannot take or give events (unwritable, locked, corrupt)."""

    code = "spool_unavailable"


class SpoolFullError(SpoolError):
    """The spool is at its configured bound: the event was refused, not stored."""

    code = "spool_full"


@dataclass(frozen=True, slots=True, kw_only=True)
class SpooledMessage:
    """One spooled publish, exactly as it was first attempted."""

    seq: int
    connector: str
    exchange: str
    routing_key: str
    message: OutgoingMessage
    #: Replays attempted before this one.
    attempts: int


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """What the spool file holds (all processes' rows)."""

    events: int
    bytes: int


def _encode_headers(headers: Mapping[str, HeaderValue]) -> str:
    # JSON keeps str/int/float/bool/None apart; bytes are tagged (a header
    # value is never a dict otherwise, so the tag is unambiguous).
    return json.dumps(
        {
            k: {"$b64": base64.b64encode(v).decode("ascii")} if isinstance(v, bytes) else v
            for k, v in headers.items()
        },
        separators=(",", ":"),
    )


def _decode_headers(text: str) -> dict[str, HeaderValue]:
    raw: dict[str, Any] = json.loads(text)
    return {k: base64.b64decode(v["$b64"]) if isinstance(v, dict) else v for k, v in raw.items()}


_T = TypeVar("_T")


class Spool:
    """A bounded, crash-safe queue of encoded AMQP publishes in one SQLite file."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_events: int,
        max_bytes: int,
        lock_timeout: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.max_events, self.max_bytes = max_events, max_bytes
        self._lock_timeout = lock_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._stats = SpoolStats(0, 0)
        self._failing: str | None = None
        self._added = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> SpoolStats:
        """Open (or create) the file and check it; returns what a previous run left.

        Raises :class:`SpoolError` naming the file when it cannot be created,
        is locked for longer than the lock timeout, is not a spool, or is corrupt.
        """
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        try:
            self._stats = await self._call(self._open_db)
        except BaseException:
            await self.close()
            raise
        self._publish_stats()
        return self._stats

    async def close(self) -> None:
        """Finish queued writes and close the file (safe to call twice)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer
        if self._executor is not None:
            if self._db is not None:
                with contextlib.suppress(Exception):
                    await self._call(self._close_db)
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- state -------------------------------------------------------------------

    @property
    def stats(self) -> SpoolStats:
        """Events and bytes in the file as of this process's last transaction."""
        return self._stats

    @property
    def accepting(self) -> bool:
        """True when a write would be taken now (room left, last write succeeded)."""
        stats = self._stats
        return (
            self._db is not None
            and self._failing is None
            and stats.events < self.max_events
            and stats.bytes < self.max_bytes
        )

    @property
    def failure(self) -> str | None:
        """Why the last write failed (None after a success)."""
        return self._failing

    # -- writes ------------------------------------------------------------------

    async def put(
        self, connector: str, exchange: str, routing_key: str, message: OutgoingMessage
    ) -> int:
        """Store one publish durably; returns its sequence number once fsynced.

        Raises :class:`SpoolFullError` when the bound is reached and
        :class:`SpoolError` when the file cannot be written: the event is then
        NOT stored and the caller must refuse its input.
        """
        if self._executor is None:
            raise SpoolError(f"spool {self.path} is not open")
        headers = _encode_headers(message.headers)
        size = len(message.body) + len(headers) + _ROW_OVERHEAD
        row = (
            connector,
            exchange,
            routing_key,
            message.message_id,
            message.type,
            message.content_type,
            headers,
            message.timestamp.isoformat() if message.timestamp is not None else None,
            message.correlation_id,
            message.body,
            size,
        )
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending(), name="spool writer")
        return await future

    async def _write_pending(self) -> None:
        # While one transaction commits (fsync), new puts queue up; the next
        # round writes all of them in one transaction.
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                seqs, stats = await self._call(self._insert, [row for row, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every waiting put
                error = (
                    exc
                    if isinstance(exc, SpoolError)
                    else SpoolError(f"spool {self.path}: {exc!r}")
                )
                self._failing = str(error)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            except BaseException:
                # Cancelled (loop shutting down): no put may wait forever.
                for _, future in [*batch, *self._pending]:
                    future.cancel()
                self._pending = []
                raise
            self._failing = None
            self._stats = stats
            self._publish_stats()
            for (_, future), seq in zip(batch, seqs, strict=True):
                if future.done():
                    continue
                if seq is None:
                    future.set_exception(
                        SpoolFullError(
                            f"spool {self.path} is full ({stats.events} events, "
                            f"{stats.bytes} bytes; bounds {self.max_events} events, "
                            f"{self.max_bytes} bytes)"
                        )
                    )
                else:
                    future.set_result(seq)
            self._added.set()

    # -- reads (the drainer) -----------------------------------------------------

    async def lease(self, limit: int, *, lease_seconds: float) -> list[SpooledMessage]:
        """The oldest due rows (up to ``limit``), leased for ``lease_seconds``.

        A leased row is not due for other drainers until the lease ends, so a
        drainer that dies mid-replay leaves its rows to the next one.
        """
        return await self._call(self._lease, limit, lease_seconds)

    async def delete(self, seqs: Sequence[int]) -> None:
        """Forget rows whose publish the broker confirmed."""
        if seqs:
            self._stats = await self._call(self._delete, list(seqs))
            self._publish_stats()

    async def retry_later(self, seqs: Sequence[int], *, delay: float, error: str) -> None:
        """Make leased rows due again after ``delay`` seconds (0: at once)."""
        if seqs:
            await self._call(self._reschedule, list(seqs), delay, error)

    async def wait_for_rows(self, timeout: float) -> None:
        """Return when this process spooled something, or after ``timeout``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._added.wait()
        self._added.clear()

    # -- the database thread -----------------------------------------------------

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            raise SpoolError(f"spool {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _error(self, exc: sqlite3.Error, doing: str) -> SpoolError:
        text = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
            return SpoolError(
                f"spool {self.path} is locked by another process (waited "
                f"{self._lock_timeout:g}s while {doing}): {text}"
            )
        if isinstance(exc, sqlite3.DatabaseError) and (
            "not a database" in text or "malformed" in text or "corrupt" in text
        ):
            return SpoolError(
                f"spool {self.path} is corrupt ({text}) while {doing}: move the file aside "
                "(keep it, it may hold events) and restart"
            )
        return SpoolError(f"spool {self.path}: {text} while {doing}")

    def _open_db(self) -> SpoolStats:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(
                f"cannot create the spool directory {self.path.parent}: {exc.strerror}"
            ) from exc
        try:
            db = sqlite3.connect(
                self.path, timeout=self._lock_timeout, isolation_level=None, check_same_thread=True
            )
        except sqlite3.Error as exc:
            raise self._error(exc, "opening") from exc
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SpoolError(f"spool {self.path}: WAL mode unavailable (got {mode})")
            # FULL: the WAL is fsynced at every commit, so an acknowledged
            # write survives power loss (NORMAL would only survive a crash).
            db.execute("PRAGMA synchronous=FULL")
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise SpoolError(
                    f"spool {self.path} has schema version {version}, newer than this "
                    f"release's {SCHEMA_VERSION}: drain it with the release that wrote it"
                )
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {check}")
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_statements(_SCHEMA):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            events, size = db.execute("SELECT events, bytes FROM totals WHERE id = 1").fetchone()
        except sqlite3.Error as exc:
            db.close()
            raise self._error(exc, "opening") from exc
        except BaseException:
            db.close()
            raise
        self._db = db
        return SpoolStats(int(events), int(size))

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError(f"spool {self.path} is not open")
        return self._db

    @contextlib.contextmanager
    def _transaction(self, doing: str) -> Iterator[sqlite3.Connection]:
        """A write transaction (IMMEDIATE: other processes wait up to the lock
        timeout), committed when the block ends and rolled back when it raises;
        a SQLite error becomes a SpoolError saying what was being ``doing``."""
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._error(exc, doing) from exc

    def _insert(self, rows: list[tuple[Any, ...]]) -> tuple[list[int | None], SpoolStats]:
        now = time.time()
        with self._transaction("writing") as db:
            # Read inside the write transaction: another process's rows count.
            events, size = db.execute("SELECT events, bytes FROM totals WHERE id = 1").fetchone()
            seqs: list[int | None] = []
            for row in rows:
                if events + 1 > self.max_events or size + row[-1] > self.max_bytes:
                    seqs.append(None)
                    continue
                cursor = db.execute(
                    "INSERT INTO spool (connector, exchange, routing_key, message_id, type, "
                    "content_type, headers, timestamp, correlation_id, body, size, "
                    "spooled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*row, now),
                )
                seqs.append(cursor.lastrowid)
                events, size = events + 1, size + row[-1]
        return seqs, SpoolStats(events, size)

    def _lease(self, limit: int, lease_seconds: float) -> list[SpooledMessage]:
        now = time.time()
        with self._transaction("reading") as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM spool WHERE not_before <= ? ORDER BY seq LIMIT ?",
                (now, limit),
            ).fetchall()
            if rows:
                db.executemany(
                    "UPDATE spool SET not_before = ?, attempts = attempts + 1 WHERE seq = ?",
                    [(now + lease_seconds, row[0]) for row in rows],
                )
        return [
            SpooledMessage(
                seq=seq,
                connector=connector,
                exchange=exchange,
                routing_key=routing_key,
                message=OutgoingMessage(
                    body=bytes(body),
                    message_id=message_id,
                    type=type_,
                    content_type=content_type,
                    headers=_decode_headers(headers),
                    timestamp=datetime.fromisoformat(timestamp) if timestamp else None,
                    correlation_id=correlation_id,
                ),
                attempts=attempts,
            )
            for (
                seq,
                connector,
                exchange,
                routing_key,
                message_id,
                type_,
                content_type,
                headers,
                timestamp,
                correlation_id,
                body,
                attempts,
            ) in rows
        ]

    def _delete(self, seqs: list[int]) -> SpoolStats:
        with self._transaction("deleting") as db:
            db.executemany("DELETE FROM spool WHERE seq = ?", [(s,) for s in seqs])
            events, size = db.execute("SELECT events, bytes FROM totals WHERE id = 1").fetchone()
        return SpoolStats(int(events), int(size))

    def _reschedule(self, seqs: list[int], delay: float, error: str) -> None:
        not_before = time.time() + delay if delay > 0 else 0.0
        with self._transaction("rescheduling") as db:
            db.executemany(
                "UPDATE spool SET not_before = ?, last_error = ? WHERE seq = ?",
                [(not_before, error[:500], s) for s in seqs],
            )

    def _publish_stats(self) -> None:
        SPOOL_DEPTH.set(self._stats.events)
        SPOOL_BYTES.set(self._stats.bytes)


def _split_statements(script: str) -> list[str]:
    """The schema's statements (``executescript`` would commit our transaction)."""
    statements, current = [], ""
    for line in script.strip().splitlines():
        current += line + "\n"
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements


class SpoolDrainer:
    """Republishes spooled messages with confirms while the broker is up.

    Oldest first, in batches published together (the bus pipelines them on
    one channel, in order); a row is deleted only after its confirm. While
    the broker is down it backs off; a row the broker refuses on its own
    (unroutable, nacked) is retried later with its own backoff so it does
    not hold up the rows behind it.
    """

    def __init__(
        self,
        spool: Spool,
        bus: Bus,
        *,
        publish_timeout: float,
        batch_size: int = 100,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        idle_poll: float = 5.0,
    ) -> None:
        self._spool, self._bus = spool, bus
        self._timeout = publish_timeout
        self._batch = batch_size
        self._initial, self._max = initial_backoff, max_backoff
        self._idle_poll = idle_poll
        # Long enough that a batch in flight always finishes inside its lease.
        self._lease = 2 * publish_timeout + 5.0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.replayed = 0

    def start(self) -> None:
        """Start draining in the background (rows left by a previous run included)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="spool drainer")

    async def stop(self) -> None:
        """Let the batch in flight finish (bounded by the publish timeout), then stop."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            async with asyncio.timeout(self._timeout + 5.0):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            log.warning("spool drainer cancelled at shutdown; its leased rows stay spooled")

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _run(self) -> None:
        backoff = self._initial
        while not self._stopping.is_set():
            if not self._bus.is_ready():
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._max)
                continue
            try:
                batch = await self._spool.lease(self._batch, lease_seconds=self._lease)
            except SpoolError as exc:
                log.error("spool drainer cannot read the spool", error=str(exc))
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._max)
                continue
            if not batch:
                backoff = self._initial
                # Rows of other processes or ends of leases are found by polling.
                waiter = asyncio.ensure_future(self._spool.wait_for_rows(self._idle_poll))
                stopper = asyncio.ensure_future(self._stopping.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                for pending in (waiter, stopper):
                    pending.cancel()
                await asyncio.gather(waiter, stopper, return_exceptions=True)
                continue
            if await self._replay(batch):
                backoff = self._initial
            else:
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._max)

    async def _replay(self, batch: list[SpooledMessage]) -> bool:
        """Publish one leased batch; False when the broker itself failed."""
        results = await asyncio.gather(
            *(
                self._bus.publish(m.exchange, m.routing_key, m.message, timeout=self._timeout)
                for m in batch
            ),
            return_exceptions=True,
        )
        confirmed = [m for m, r in zip(batch, results, strict=True) if r is None]
        broker_down: list[tuple[SpooledMessage, BaseException]] = []
        refused: list[tuple[SpooledMessage, BaseException]] = []
        for m, r in zip(batch, results, strict=True):
            if isinstance(r, BaseException):
                if isinstance(r, BrokerUnavailableError | PublishTimeoutError):
                    broker_down.append((m, r))
                else:
                    refused.append((m, r))
        try:
            await self._spool.delete([m.seq for m in confirmed])
            if broker_down:
                # Due again at once: the broker, not the rows, was the problem.
                await self._spool.retry_later(
                    [m.seq for m, _ in broker_down], delay=0, error=repr(broker_down[0][1])
                )
            for m, error in refused:
                delay = min(self._initial * 2 ** min(m.attempts, 16), self._max)
                log.error(
                    "spooled event refused by the broker; retrying later",
                    message_id=m.message.message_id,
                    routing_key=m.routing_key,
                    error=repr(error),
                    attempts=m.attempts + 1,
                    retry_in=delay,
                )
                await self._spool.retry_later([m.seq], delay=delay, error=repr(error))
        except SpoolError as exc:
            # Confirmed rows not deleted are published again later: at least once.
            log.error("spool drainer cannot update the spool", error=str(exc))
            return False
        for m in confirmed:
            SPOOL_REPLAYED.labels(m.connector).inc()
        self.replayed += len(confirmed)
        if confirmed:
            log.info(
                "spooled events republished",
                count=len(confirmed),
                left=self._spool.stats.events,
            )
        if broker_down:
            log.warning(
                "spool replay paused: broker unavailable",
                error=repr(broker_down[0][1]),
                left=self._spool.stats.events,
            )
        return not broker_down


async def open_spool(path: Path, config: SpoolSettings) -> tuple[Spool, SpoolStats]:
    """The spool file at ``path`` opened with the configured bounds, and what it
    holds; a file that cannot be opened (locked, corrupt, not writable) is a
    ConfigError: the process must not start as if it had a spool."""
    spool = Spool(
        path,
        max_events=config.max_events,
        max_bytes=config.max_bytes,
        lock_timeout=config.lock_timeout,
    )
    try:
        found = await spool.open()
    except SpoolError as exc:
        raise ConfigError(f"spool: {exc}") from exc
    return spool, found


def configured_drainer(spool: Spool, bus: Bus, settings: RuntimeSettings) -> SpoolDrainer:
    """A drainer of ``spool`` to ``bus`` with the configured batch size, replay
    backoff and broker publish timeout (a service's and ``spool drain``'s)."""
    return SpoolDrainer(
        spool,
        bus,
        publish_timeout=settings.broker.publish_timeout,
        batch_size=settings.spool.replay_batch,
        initial_backoff=settings.spool.initial_backoff,
        max_backoff=settings.spool.max_backoff,
    )
