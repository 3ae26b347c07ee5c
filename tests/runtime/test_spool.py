"""The durable spool: order, exact round trip, bounds, broken files, crash safety, replay."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.runtime.bus import OutgoingMessage
from gateway.runtime.codec import decode_event
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.spool import Spool, SpoolDrainer, SpoolError, SpoolFullError
from gateway.runtime.topology import EVENTS_EXCHANGE, base_topology

ROOT = Path(__file__).resolve().parents[2]


def _message(n: int, body: bytes | None = None) -> OutgoingMessage:
    return OutgoingMessage(
        body=body if body is not None else f"body-{n}".encode(),
        message_id=f"ev-{n}",
        type="gateway.api.v1.Event",
        headers={
            "cloudEvents_id": f"ev-{n}",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "count": n,
            "ratio": 0.5,
            "flag": True,
            "nothing": None,
            "raw": b"\x00\xffbytes",
        },
        timestamp=datetime(2026, 11, 23, 12, 0, n % 60, 123456, tzinfo=UTC),
        correlation_id=f"corr-{n}",
    )


async def _open(path: Path, **bounds: int) -> Spool:
    spool = Spool(
        path,
        max_events=bounds.get("max_events", 1000),
        max_bytes=bounds.get("max_bytes", 10_000_000),
        lock_timeout=0.2,
    )
    await spool.open()
    return spool


async def test_rows_come_back_oldest_first_exactly_as_written(tmp_path: Path) -> None:
    spool = await _open(tmp_path / "s.sqlite")
    try:
        written = [_message(n) for n in range(20)]
        # Concurrent puts (as from concurrent webhooks) keep their call order.
        seqs = await asyncio.gather(
            *(spool.put("sms.twilio", EVENTS_EXCHANGE, f"rk.{i}", m) for i, m in enumerate(written))
        )
        assert seqs == sorted(seqs)
        assert spool.stats.events == 20
        first = await spool.lease(5, lease_seconds=30)
        rest = await spool.lease(100, lease_seconds=30)
        assert [r.message for r in first + rest] == written
        assert [r.routing_key for r in first + rest] == [f"rk.{i}" for i in range(20)]
        assert {(r.connector, r.exchange, r.attempts) for r in first + rest} == {
            ("sms.twilio", EVENTS_EXCHANGE, 0)
        }
        # Leased rows are not handed out twice while their lease runs.
        assert await spool.lease(100, lease_seconds=30) == []
        await spool.delete([r.seq for r in first])
        assert spool.stats.events == 15
    finally:
        await spool.close()


async def test_message_without_optional_fields_round_trips(tmp_path: Path) -> None:
    spool = await _open(tmp_path / "s.sqlite")
    try:
        bare = OutgoingMessage(body=b"", message_id="x", type="t")
        await spool.put("voice.twilio", EVENTS_EXCHANGE, "call.ringing.voice.twilio", bare)
        (row,) = await spool.lease(10, lease_seconds=30)
        assert row.message == bare
    finally:
        await spool.close()


async def test_count_bound_refuses_and_frees_after_delete(tmp_path: Path) -> None:
    spool = await _open(tmp_path / "s.sqlite", max_events=3)
    try:
        results = await asyncio.gather(
            *(spool.put("sms.twilio", EVENTS_EXCHANGE, "rk", _message(n)) for n in range(5)),
            return_exceptions=True,
        )
        assert [isinstance(r, int) for r in results] == [True, True, True, False, False]
        assert all(isinstance(r, SpoolFullError) for r in results[3:])
        assert "full" in str(results[3])
        assert str(spool.path) in str(results[3])
        assert not spool.accepting
        rows = await spool.lease(1, lease_seconds=30)
        await spool.delete([rows[0].seq])
        assert spool.accepting
        await spool.put("sms.twilio", EVENTS_EXCHANGE, "rk", _message(9))
        assert spool.stats.events == 3
    finally:
        await spool.close()


async def test_byte_bound_refuses(tmp_path: Path) -> None:
    spool = await _open(tmp_path / "s.sqlite", max_bytes=4000)
    try:
        await spool.put("sms.twilio", EVENTS_EXCHANGE, "rk", _message(1, body=b"x" * 2000))
        with pytest.raises(SpoolFullError):
            await spool.put("sms.twilio", EVENTS_EXCHANGE, "rk", _message(2, body=b"y" * 2000))
        assert spool.stats.events == 1
        small = _message(3, body=b"z")
        await spool.put("sms.twilio", EVENTS_EXCHANGE, "rk", small)
        assert spool.stats.events == 2
    finally:
        await spool.close()


async def test_bound_counts_rows_of_other_processes_sharing_the_file(tmp_path: Path) -> None:
    first = await _open(tmp_path / "s.sqlite", max_events=2)
    second = await _open(tmp_path / "s.sqlite", max_events=2)
    try:
        await first.put("sms.twilio", EVENTS_EXCHANGE, "rk", _message(1))
        await second.put("sms.twilio", EVENTS_EXCHANGE, "rk", _message(2))
        with pytest.raises(SpoolFullError):
            await first.put("sms.twilio", EVENTS_EXCHANGE, "rk", _message(3))
        # A drainer's lease keeps its rows from the other one.
        mine = await first.lease(10, lease_seconds=30)
        assert len(mine) == 2
        assert await second.lease(10, lease_seconds=30) == []
        # An ended lease (a drainer that died) makes the rows due again.
        await first.retry_later([mine[0].seq], delay=0, error="test")
        (again,) = await second.lease(10, lease_seconds=30)
        assert again.seq == mine[0].seq
        assert again.attempts == 1
    finally:
        await first.close()
        await second.close()


async def test_rows_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    spool = await _open(path)
    await spool.put("sms.twilio", EVENTS_EXCHANGE, "rk", _message(1))
    await spool.close()
    with sqlite3.connect(path) as db:
        # Persistent in the file: every connection, every process, writes through the WAL.
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened = Spool(path, max_events=10, max_bytes=10**6)
    left = await reopened.open()
    try:
        assert left.events == 1
        (row,) = await reopened.lease(10, lease_seconds=30)
        assert row.message == _message(1)
    finally:
        await reopened.close()


async def test_a_file_that_is_not_a_spool_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not an SQLite database, it is text " * 200)
    spool = Spool(path, max_events=10, max_bytes=10**6)
    with pytest.raises(SpoolError) as info:
        await spool.open()
    assert str(path) in str(info.value)
    assert "corrupt" in str(info.value)
    assert "move the file aside" in str(info.value)


async def test_a_damaged_page_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    spool = await _open(path)
    for n in range(200):
        await spool.put("sms.twilio", EVENTS_EXCHANGE, "rk", _message(n, body=os.urandom(300)))
    await spool.close()  # checkpoints the WAL into the main file
    data = bytearray(path.read_bytes())
    # Overwrite a b-tree page of the table (not the header page) with garbage.
    page = int.from_bytes(data[16:18], "big")
    data[page * 2 : page * 3] = b"\xa5" * page
    path.write_bytes(bytes(data))
    damaged = Spool(path, max_events=10, max_bytes=10**6)
    with pytest.raises(SpoolError, match="corrupt"):
        await damaged.open()


async def test_a_spool_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(SpoolError, match="newer"):
        await Spool(path, max_events=10, max_bytes=10**6).open()


async def test_an_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(SpoolError, match="cannot create the spool directory"):
        await Spool(blocker / "spool" / "s.sqlite", max_events=10, max_bytes=10**6).open()


async def test_a_file_locked_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    spool = await _open(path)
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(SpoolError) as info:
            await spool.put("sms.twilio", EVENTS_EXCHANGE, "rk", _message(1))
        assert "locked by another process" in str(info.value)
        assert str(path) in str(info.value)
        assert not spool.accepting
        assert spool.failure is not None
        locker.execute("ROLLBACK")
        # Once the lock is gone the spool takes writes again.
        await spool.put("sms.twilio", EVENTS_EXCHANGE, "rk", _message(2))
        assert spool.accepting
        assert spool.failure is None
    finally:
        locker.close()
        await spool.close()


_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.runtime.bus import OutgoingMessage
    from gateway.runtime.spool import Spool

    async def main() -> None:
        spool = Spool(sys.argv[1], max_events=10**6, max_bytes=10**9)
        await spool.open()
        n = 0
        while True:
            # Bursts of concurrent puts, as concurrent webhooks make them.
            burst = [
                OutgoingMessage(body=b"x" * 200, message_id=f"ev-{n + i}", type="t")
                for i in range(8)
            ]
            n += len(burst)

            async def put(message: OutgoingMessage) -> None:
                await spool.put("sms.twilio", "channels.events", "rk", message)
                # Acknowledged: only now may a webhook answer 2xx.
                sys.stdout.write(message.message_id + "\\n")
                sys.stdout.flush()

            await asyncio.gather(*(put(m) for m in burst))

    asyncio.run(main())
    """
)


def _write_then_kill_9(path: Path, acks: int) -> tuple[list[str], int]:
    """Run the writer until it acknowledged ``acks`` rows, SIGKILL it mid-write;
    returns every id it acknowledged and its exit status."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    assert proc.stdout is not None
    acknowledged: list[str] = []
    try:
        while len(acknowledged) < acks:
            line = proc.stdout.readline()
            assert line, f"the writer exited early: {proc.communicate(timeout=10)[1]}"
            acknowledged.append(line.strip())
        proc.send_signal(signal.SIGKILL)  # while it keeps writing
        # Acks printed before the kill landed count too.
        rest, _ = proc.communicate(timeout=30)
        acknowledged.extend(rest.split())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    return acknowledged, proc.returncode


async def test_acknowledged_rows_survive_kill_9_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    acknowledged, status = await asyncio.to_thread(_write_then_kill_9, path, 300)
    assert status == -signal.SIGKILL
    spool = Spool(path, max_events=10**6, max_bytes=10**9)
    left = await spool.open()
    try:
        rows = await spool.lease(10**6, lease_seconds=30)
        stored = [r.message.message_id for r in rows]
        assert left.events == len(stored)
        missing = set(acknowledged) - set(stored)
        assert not missing, f"{len(missing)} acknowledged rows lost"
        # Oldest first, as written, and nothing half-written.
        assert stored == sorted(stored, key=lambda i: int(i.split("-")[1]))
        assert {r.message.body for r in rows} == {b"x" * 200}
    finally:
        await spool.close()


async def _bus() -> tuple[InMemoryBus, str]:
    bus = InMemoryBus()
    await bus.connect()
    await bus.declare(base_topology())
    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["message.received.#"])
    return bus, queue


async def _wait_until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polls state with no event to wait on
            await asyncio.sleep(0.01)


async def test_drainer_republishes_oldest_first_and_deletes_after_confirm(tmp_path: Path) -> None:
    bus, queue = await _bus()
    spool = await _open(tmp_path / "s.sqlite")
    written = [_message(n) for n in range(30)]
    for message in written:
        await spool.put("sms.twilio", EVENTS_EXCHANGE, "message.received.sms.twilio", message)
    bus.available = False  # the broker is down when the service starts
    drainer = SpoolDrainer(
        spool, bus, publish_timeout=1.0, batch_size=7, initial_backoff=0.01, max_backoff=0.05
    )
    drainer.start()
    try:
        await asyncio.sleep(0.1)
        assert bus.queue_depth(queue) == 0
        assert spool.stats.events == 30
        bus.available = True
        await _wait_until(lambda: spool.stats.events == 0)
        delivered = [await bus.get(queue) for _ in range(bus.queue_depth(queue))]
        assert [d.message_id for d in delivered] == [m.message_id for m in written]
        assert [d.body for d in delivered] == [m.body for m in written]
        assert [dict(d.headers) for d in delivered] == [dict(m.headers) for m in written]
        assert drainer.replayed == 30
        # New rows are picked up without waiting for the idle poll.
        await spool.put("sms.twilio", EVENTS_EXCHANGE, "message.received.sms.twilio", _message(99))
        await _wait_until(lambda: spool.stats.events == 0)
        assert (await bus.get(queue)).message_id == "ev-99"
    finally:
        await drainer.stop()
        await spool.close()


async def test_a_row_the_broker_refuses_does_not_hold_up_the_others(tmp_path: Path) -> None:
    bus, queue = await _bus()
    spool = await _open(tmp_path / "s.sqlite")
    await spool.put("sms.twilio", EVENTS_EXCHANGE, "nobody.binds.this", _message(1))
    await spool.put("sms.twilio", EVENTS_EXCHANGE, "message.received.sms.twilio", _message(2))
    drainer = SpoolDrainer(
        spool, bus, publish_timeout=1.0, initial_backoff=10.0, max_backoff=10.0, idle_poll=0.05
    )
    drainer.start()
    try:
        await _wait_until(lambda: bus.queue_depth(queue) == 1)
        assert (await bus.get(queue)).message_id == "ev-2"
        await asyncio.sleep(0.2)
        # Unroutable: kept (never dropped), retried on its own backoff.
        assert spool.stats.events == 1
        assert await spool.lease(10, lease_seconds=1) == []
    finally:
        await drainer.stop()
        await spool.close()
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        ((error, attempts),) = db.execute("SELECT last_error, attempts FROM spool").fetchall()
    assert "Unroutable" in error
    assert attempts == 1


async def test_drainer_stops_promptly_while_the_broker_is_down(tmp_path: Path) -> None:
    bus, _ = await _bus()
    bus.available = False
    spool = await _open(tmp_path / "s.sqlite")
    await spool.put("sms.twilio", EVENTS_EXCHANGE, "message.received.sms.twilio", _message(1))
    drainer = SpoolDrainer(spool, bus, publish_timeout=1.0, initial_backoff=30, max_backoff=30)
    drainer.start()
    await asyncio.sleep(0.05)
    async with asyncio.timeout(2):
        await drainer.stop()
    assert spool.stats.events == 1
    await spool.close()


async def test_spooled_event_decodes_like_a_published_one(tmp_path: Path) -> None:
    """The codec's message is what is stored: a consumer cannot tell a replay apart."""
    from gateway.api.v1.envelope_pb2 import Event
    from gateway.runtime.codec import encode_event

    bus, queue = await _bus()
    spool = await _open(tmp_path / "s.sqlite")
    event = Event(id="ev-codec", type="message.received", channel="sms", provider="twilio")
    await spool.put(
        "sms.twilio", EVENTS_EXCHANGE, "message.received.sms.twilio", encode_event(event)
    )
    drainer = SpoolDrainer(spool, bus, publish_timeout=1.0)
    drainer.start()
    try:
        await _wait_until(lambda: bus.queue_depth(queue) == 1)
        decoded = decode_event(await bus.get(queue))
        assert decoded.id == "ev-codec"
        assert decoded.traceparent == event.traceparent
    finally:
        await drainer.stop()
        await spool.close()
