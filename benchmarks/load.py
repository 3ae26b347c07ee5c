"""A small HTTP/1.1 load generator on raw asyncio streams.

Requests are pre-serialized bytes (signed once, before a phase), sent over
keep-alive connections to one ``127.0.0.1`` port. Two ways to drive them:

- :func:`closed_loop`: ``concurrency`` connections, each sending its next
  request as soon as the previous answer arrived; the rate it reaches is the
  server's saturation throughput.
- :func:`open_loop`: requests are due at a fixed rate whatever the server
  does, and latency is measured from when a request was *due*, not when it
  was sent, so a stalled server shows up in the percentiles (no coordinated
  omission).

It does no more per request than write the bytes, read the status line and
headers, and read ``Content-Length`` bytes of body, so it costs far less CPU
than an aiohttp client; :func:`closed_loop` against a trivial handler shows
its ceiling.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

#: Requests are sent whatever the answer; these count as accepted.
ACCEPTED = range(200, 300)


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 this client understands."""


class RequestSource:
    """Pre-built requests handed out once each, made on demand when they run out.

    ``made_late`` counts those built during a phase (their signing cost then
    lands on the load generator; sizing the pre-built batch keeps it zero).
    """

    def __init__(self, make: Callable[[int], bytes], prebuilt: int) -> None:
        self._make = make
        self._next = 0
        self._ready: list[bytes] = [make(i) for i in range(prebuilt)]
        self.made_late = 0

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        i = self._next
        self._next += 1
        if i < len(self._ready):
            request = self._ready[i]
            self._ready[i] = b""  # let it go: phases can use tens of MB of requests
            return request
        self.made_late += 1
        return self._make(i)

    @property
    def used(self) -> int:
        """How many requests were handed out."""
        return self._next


@dataclass
class PhaseResult:
    """What one phase measured (latencies in seconds, of the measured window only)."""

    mode: str
    duration: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    #: 2xx answers over the whole phase, warm-up and drain included (for the queue check).
    accepted_total: int = 0
    sent_total: int = 0
    #: Load generator CPU seconds per wall second over the measured window.
    loadgen_cpu: float = 0.0
    #: Open loop only: the rate asked for, and how late the generator sent (its own lag).
    target_rate: float | None = None
    max_send_lag: float = 0.0

    @property
    def accepted(self) -> int:
        """2xx answers in the measured window."""
        return sum(n for status, n in self.statuses.items() if status in ACCEPTED)

    @property
    def throughput(self) -> float:
        """Accepted requests per second in the measured window."""
        return self.accepted / self.duration if self.duration else 0.0

    def percentile(self, q: float) -> float:
        """Latency percentile ``q`` (0-100) in seconds, nearest-rank."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
        return ordered[rank]

    def summary(self) -> dict[str, object]:
        """JSON-ready figures (milliseconds for latencies)."""
        ms = 1000.0
        return {
            "mode": self.mode,
            "duration_s": round(self.duration, 3),
            "target_rate": self.target_rate,
            "requests_per_s": round(self.throughput, 1),
            "accepted": self.accepted,
            "non_2xx": {str(k): v for k, v in sorted(self.statuses.items()) if k not in ACCEPTED},
            "errors": dict(self.errors),
            "p50_ms": round(self.percentile(50) * ms, 2),
            "p90_ms": round(self.percentile(90) * ms, 2),
            "p99_ms": round(self.percentile(99) * ms, 2),
            "max_ms": round(max(self.latencies, default=float("nan")) * ms, 2),
            "accepted_total": self.accepted_total,
            "sent_total": self.sent_total,
            "loadgen_cpu": round(self.loadgen_cpu, 2),
            "max_send_lag_ms": round(self.max_send_lag * ms, 2),
        }


class _Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> int:
        """Send one request, read its whole answer, return the status code."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        try:
            status = int(head[9:12])
        except ValueError as exc:
            raise ProtocolError(f"bad status line {head[:40]!r}") from exc
        length = 0
        lowered = head.lower()
        at = lowered.find(b"\r\ncontent-length:")
        if at >= 0:
            end = lowered.index(b"\r\n", at + 2)
            length = int(lowered[at + 17 : end])
        elif b"\r\ntransfer-encoding:" in lowered:
            raise ProtocolError("chunked answers are not supported by this client")
        if length:
            await self.reader.readexactly(length)
        if b"\r\nconnection: close" in lowered:
            raise ProtocolError("server closed the keep-alive connection")
        return status

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.contextmanager
def _no_gc_pauses() -> Iterator[None]:
    """No cyclic-GC pause in the load generator while a phase runs.

    A full collection here (tens of milliseconds over this process's heap,
    seen at 46 ms) would hold every answer that arrives meanwhile and be
    measured as the server's latency. Garbage cycles of one bounded phase
    wait until it ends; reference counting frees everything else as usual.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _count(table: dict[str, int], exc: BaseException) -> None:
    name = type(exc).__name__
    table[name] = table.get(name, 0) + 1


async def closed_loop(
    port: int,
    requests: RequestSource,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
) -> PhaseResult:
    """Saturate the server with ``concurrency`` connections for ``warmup + duration`` s.

    Only answers completing in the last ``duration`` seconds are measured;
    requests still in flight at the end are awaited (and counted in
    ``accepted_total``) so none is abandoned half-way.
    """
    result = PhaseResult(mode="closed", duration=duration)
    conns = [await _Connection.open(port) for _ in range(concurrency)]
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration
    cpu_at_measure: list[float] = []

    async def run(conn: _Connection) -> None:
        while True:
            sent = time.perf_counter()
            if sent >= stop_at:
                return
            result.sent_total += 1
            try:
                status = await conn.exchange(next(requests))
            except (OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
                _count(result.errors, exc)
                return
            done = time.perf_counter()
            if status in ACCEPTED:
                result.accepted_total += 1
            if measure_from <= sent and done <= stop_at:
                result.latencies.append(done - sent)
                result.statuses[status] = result.statuses.get(status, 0) + 1

    async def mark_cpu() -> None:
        await asyncio.sleep(warmup)
        cpu_at_measure.append(time.process_time())

    marker = asyncio.create_task(mark_cpu())
    try:
        with _no_gc_pauses():
            await asyncio.gather(*(run(c) for c in conns))
    finally:
        for conn in conns:
            await conn.close()
    await marker
    cpu_end = time.process_time()
    # The measured window ends when the last send started; in-flight answers drain after.
    elapsed = max(time.perf_counter() - measure_from, 1e-9)
    result.loadgen_cpu = (cpu_end - cpu_at_measure[0]) / elapsed
    return result


async def open_loop(
    port: int,
    requests: RequestSource,
    *,
    rate: float,
    duration: float,
    warmup: float,
    connections: int,
) -> PhaseResult:
    """Send ``rate`` requests/s for ``warmup + duration`` s whatever the server does.

    A request goes out on an idle connection when it is due; if every
    connection is busy it waits, and that wait counts in its latency.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    result = PhaseResult(mode="open", duration=duration, target_rate=round(rate, 1))
    conns = [await _Connection.open(port) for _ in range(connections)]
    with _no_gc_pauses():
        due: asyncio.Queue[float | None] = asyncio.Queue()
        start = time.perf_counter() + 0.05
        measure_from = start + warmup
        total = int((warmup + duration) * rate)

        async def worker(conn: _Connection) -> None:
            while (intended := await due.get()) is not None:
                result.sent_total += 1
                try:
                    status = await conn.exchange(next(requests))
                except (OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
                    _count(result.errors, exc)
                    # Keep consuming the schedule on a fresh connection.
                    await conn.close()
                    conn = await _Connection.open(port)
                    continue
                done = time.perf_counter()
                if status in ACCEPTED:
                    result.accepted_total += 1
                if intended >= measure_from:
                    result.latencies.append(done - intended)
                    result.statuses[status] = result.statuses.get(status, 0) + 1
            await conn.close()

        workers = [asyncio.create_task(worker(c)) for c in conns]
        cpu_start = 0.0
        try:
            for i in range(total):
                intended = start + i / rate
                now = time.perf_counter()
                if intended > now:
                    await asyncio.sleep(intended - now)
                    now = time.perf_counter()
                if intended >= measure_from and not cpu_start:
                    cpu_start = time.process_time()
                result.max_send_lag = max(result.max_send_lag, now - intended)
                due.put_nowait(intended)
            cpu_end = time.process_time()
            for _ in workers:
                due.put_nowait(None)
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
    result.loadgen_cpu = (cpu_end - cpu_start) / duration if cpu_start else 0.0
    return result
