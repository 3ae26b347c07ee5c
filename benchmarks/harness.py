"""Pieces every webhook benchmark shares: server subprocesses, the broker, the report.

- :class:`Server` / :func:`running`: a server (the real service via
  ``python -m gateway.cli ... run <connector>``, or :mod:`benchmarks.bare`) in
  its own subprocess and session, ready when it logs ``service started``;
  stopped with SIGTERM (graceful drain), SIGKILL after 15 s.
- :class:`Broker`: a throw-away RabbitMQ vhost for the run (``rabbitmqctl``),
  counting what landed on a queue after a phase.
- :func:`signed_twilio_form`: a pre-serialized HTTP/1.1 request carrying a
  Twilio form webhook signed as Twilio signs it.
- :func:`machine` / :func:`write_report`: what the figures were measured on,
  and the JSON document every benchmark writes.
- :func:`idle_slowdown`: how much slower this machine runs the same Python
  code right after a short idle gap than back to back (the reason a server's
  CPU per request at a moderate rate can be twice its cost at saturation).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import aio_pika
from multidict import MultiDict

from connectors.sms.twilio.mapping import inbound_message
from connectors.sms.twilio.webhooks import SIGNATURE_HEADER, compute_signature
from gateway.api.v1.envelope_pb2 import RawPayload
from gateway.contract.connector import parse_form
from gateway.runtime.codec import encode_event

ROOT = Path(__file__).resolve().parent.parent
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_local(url: str) -> bool:
    """True for a URL on this machine (the benchmarks talk to nothing else)."""
    return urlsplit(url).hostname in LOCAL_HOSTS


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (the service's worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def with_vhost(url: str, vhost: str) -> str:
    """``url`` pointing at ``vhost``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + vhost))


class Server:
    """A server subprocess; ``ready_marker`` lines on its output say it listens."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], ready: int) -> None:
        self.name, self._argv, self._env, self._ready_needed = name, argv, env, ready
        self._proc: asyncio.subprocess.Process | None = None
        self._tail: deque[str] = deque(maxlen=30)
        self._ready = asyncio.Event()
        self._ready_count = 0
        self._readers: list[asyncio.Task[None]] = []

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            self._tail.append(text)
            if text == "ready" or '"event": "service started"' in text:
                self._ready_count += 1
                if self._ready_count >= self._ready_needed:
                    self._ready.set()

    async def start(self, timeout: float = 30.0) -> None:
        """Start and wait until every process of it listens."""
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv,
            cwd=ROOT,
            env=self._env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C here reaches it only through stop()
        )
        assert self._proc.stdout is not None
        assert self._proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self._proc.stdout)),
            asyncio.create_task(self._read(self._proc.stderr)),
        ]
        exited = asyncio.create_task(self._proc.wait())
        ready = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait(
            {exited, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in (exited, ready):
            if task not in done:
                task.cancel()
        if ready not in done:
            await self.stop()
            raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self._tail))

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server's processes (Linux)."""
        if self._proc is None:
            return 0.0
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in process_tree(self._proc.pid):
            with contextlib.suppress(OSError, ValueError, IndexError):
                # Fields after the ")" closing the command name; utime, stime are 14, 15.
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / tick

    async def stop(self) -> None:
        """SIGTERM (graceful drain), then SIGKILL after 15 s."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if proc.returncode not in (0, -signal.SIGTERM):
            print(f"warning: {self.name} exited with {proc.returncode}", file=sys.stderr)


@contextlib.asynccontextmanager
async def running(server: Server) -> AsyncIterator[Server]:
    """Start ``server`` and stop it whatever happens."""
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


class Broker:
    """A throw-away vhost for the run, and counting what landed on a queue."""

    def __init__(self, url: str, vhost: str | None) -> None:
        self.base_url, self.vhost = url, vhost
        self.url = with_vhost(url, vhost) if vhost else url
        self._conn: aio_pika.abc.AbstractConnection | None = None

    @staticmethod
    def _ctl(*args: str) -> None:
        out = subprocess.run(
            ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=30, check=False
        )
        if out.returncode != 0:
            raise SystemExit(
                f"benchmark: rabbitmqctl {' '.join(args)} failed ({out.stderr.strip()}); "
                "it needs to run where rabbitmqctl can reach the broker (e.g. as root)"
            )

    async def open(self) -> None:
        """Create the vhost (when one is used) and connect."""
        if self.vhost:
            user = urlsplit(self.base_url).username or "guest"
            await asyncio.to_thread(self._ctl, "add_vhost", self.vhost)
            await asyncio.to_thread(
                self._ctl, "set_permissions", "-p", self.vhost, user, ".*", ".*", ".*"
            )
        self._conn = await aio_pika.connect(self.url)

    async def declare_bare(self, name: str) -> None:
        """The bare bound's exchange and its quorum queue (catch-all binding)."""
        assert self._conn is not None
        async with self._conn.channel() as channel:
            exchange = await channel.declare_exchange(
                name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(
                name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind(exchange, routing_key="#")

    async def count_and_purge(self, queue_name: str) -> int:
        """Messages on ``queue_name`` (all confirmed before their 2xx), then empty it."""
        assert self._conn is not None
        async with self._conn.channel() as channel:
            queue = await channel.declare_queue(queue_name, passive=True)
            count = int(queue.declaration_result.message_count or 0)
            await queue.purge()
        return count

    async def _count(self, queue_name: str) -> int:
        assert self._conn is not None
        async with self._conn.channel() as channel:
            queue = await channel.declare_queue(queue_name, passive=True)
            return int(queue.declaration_result.message_count or 0)

    async def settled_count_and_purge(
        self, queue_name: str, expected: int, *, timeout: float = 15.0, quiet: float = 3.0
    ) -> int:
        """Messages on ``queue_name`` once ``expected`` arrived, then empty it.

        For servers that may answer before the confirm (voice answer webhooks
        answer within a budget and keep publishing in the background): waits
        until the queue holds ``expected`` messages, stops growing for
        ``quiet`` seconds, or ``timeout`` passes, whichever comes first.
        """
        deadline = time.monotonic() + timeout
        count, changed = -1, time.monotonic()
        while True:
            now_count = await self._count(queue_name)
            now = time.monotonic()
            if now_count != count:
                count, changed = now_count, now
            if count >= expected or now >= deadline or now - changed >= quiet:
                break
            await asyncio.sleep(0.1)
        return await self.count_and_purge(queue_name)

    async def close(self, cleanup: list[tuple[str, str]]) -> None:
        """Delete what the run declared (the whole vhost when there is one)."""
        if self._conn is not None:
            if not self.vhost:
                async with self._conn.channel() as channel:
                    for kind, name in cleanup:
                        with contextlib.suppress(aio_pika.exceptions.AMQPError):
                            if kind == "queue":
                                await channel.queue_delete(name)
                            else:
                                await channel.exchange_delete(name)
            await self._conn.close()
        if self.vhost:
            await asyncio.to_thread(self._ctl, "delete_vhost", self.vhost)


def twilio_request_head(port: int, path: str) -> str:
    """The request line and fixed headers of a Twilio form webhook to ``port``."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "User-Agent: TwilioProxy/1.1\r\nAccept: */*\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
    )


def signed_twilio_form(
    head: str, url: str, token: str, params: Mapping[str, str], extra_headers: str = ""
) -> bytes:
    """One request: ``head`` (see :func:`twilio_request_head`), ``X-Twilio-Signature``
    over ``url`` and ``params`` with ``token``, then the form body."""
    body = urlencode(params).encode()
    signature = compute_signature(token, url, {k: [v] for k, v in params.items()})
    return (
        f"{head}{extra_headers}{SIGNATURE_HEADER}: {signature}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def machine() -> dict[str, object]:
    """The machine the figures come from (CPU, Python, load when the run started)."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def idle_slowdown(gap: float = 0.001, per_block: int = 150, blocks: int = 3) -> dict[str, float]:
    """Time one webhook's own work run back to back and run after an idle ``gap`` each time.

    The work is what the SMS service does with a Twilio inbound webhook
    besides HTTP and AMQP: check its signature, parse the form, map it to an
    event and encode that. Blocks of each kind alternate, so a drift of the
    machine's speed weighs on both; ``slowdown`` is the ratio of the median
    times (after a gap / back to back). Near 1 on an idle bare-metal core;
    above 1 where an idle CPU loses its caches (deep sleep, or a virtual CPU
    whose physical core runs something else meanwhile): then every request
    of an open-loop phase at a moderate rate pays it, while a saturated
    server, never idle, does not.
    """
    token, url = "0" * 32, "http://127.0.0.1:8000/webhooks/sms/twilio/bench/inbound"
    params = {
        "MessageSid": "SM" + "0" * 32,
        "AccountSid": "AC" + "0" * 32,
        "From": "+447700900123",
        "To": "+14155550100",
        "Body": "Hi! Where is my order #1234? Thanks",
        "NumMedia": "0",
        "NumSegments": "1",
        "SmsStatus": "received",
        "ApiVersion": "2010-04-01",
    }
    body = urlencode(params).encode()
    signature = compute_signature(token, url, {k: [v] for k, v in params.items()})
    raw = RawPayload(content_type="application/x-www-form-urlencoded", data=body)

    def work() -> None:
        form = MultiDict(parse_form(body.decode()))
        pairs = {name: form.getall(name) for name in form}
        if compute_signature(token, url, pairs) != signature:
            raise AssertionError("the probe's own signature does not verify")
        event = inbound_message(form, account="bench", raw=raw, received_at=datetime.now(UTC))
        encode_event(event)

    timings: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(blocks):
        for idle in (False, True):
            for _ in range(per_block):
                if idle:
                    time.sleep(gap)
                start = time.perf_counter()
                work()
                timings[idle].append(time.perf_counter() - start)
    busy, after_gap = statistics.median(timings[False]), statistics.median(timings[True])
    return {
        "gap_ms": gap * 1e3,
        "back_to_back_us": round(busy * 1e6, 1),
        "after_gap_us": round(after_gap * 1e6, 1),
        "slowdown": round(after_gap / busy, 2),
    }


def write_report(path: Path, report: dict[str, object]) -> None:
    """Write a benchmark's JSON document (creating ``benchmarks/results/``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
