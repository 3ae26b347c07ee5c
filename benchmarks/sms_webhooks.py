"""SMS webhook benchmark: the real SMS service against the bare bound, over loopback.

``python -m benchmarks.sms_webhooks`` (or ``make bench``) runs, in one go:

1. ``loadgen ceiling``: the load generator against a trivial aiohttp handler,
   to show it is not what limits the other figures.
2. ``bare``: a minimal aiohttp handler that verifies ``X-Twilio-Signature``
   and does a confirmed, mandatory aio-pika publish to an exchange bound to a
   quorum queue (see :mod:`benchmarks.bare`).
3. ``service x1``: ``channel-gateway run sms.twilio`` (the real service, the
   standard quorum topology, dedup, tracing, metrics) in one process.
4. ``service x2``: the same with ``--workers 2`` (SO_REUSEPORT).

Each server runs in its own subprocess; the load generator runs here. Each
system gets a closed-loop saturation phase and then an open-loop phase at
half of the throughput it saturated at (for latency under normal load).
Every request is a distinct signed Twilio inbound-SMS webhook (unique
``MessageSid``), signed before the phase. After each phase the queue the
events land on is counted: what the server accepted must be exactly what
the broker holds.

Everything on the broker lives in a throw-away vhost (created with
``rabbitmqctl`` and deleted at the end), so the service's standard topology
(command queue included) never meets other users of the broker. Results go
to ``benchmarks/results/sms_webhooks.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import aio_pika

from benchmarks.load import PhaseResult, RequestSource, closed_loop, open_loop
from connectors.sms.twilio.webhooks import SIGNATURE_HEADER, compute_signature

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "sms_webhooks.json"
TOKEN_ENV = "BENCH_TWILIO_TOKEN"
#: Target of the issue: the service reaches this share of the bare bound's throughput.
TARGET_SHARE = 0.85
#: ... and keeps p99 under this at half its saturation rate.
TARGET_P99_MS = 25.0


@dataclass(frozen=True)
class Webhooks:
    """Builds signed Twilio inbound-SMS webhooks for one server."""

    token: str
    account_key: str
    account_sid: str
    run_id: str

    def factory(self, port: int, tag: int) -> Callable[[int], bytes]:
        """Request ``i`` of a phase: its own MessageSid, signed for ``port``."""
        path = f"/webhooks/sms/twilio/{self.account_key}/inbound"
        url = f"http://127.0.0.1:{port}{path}"
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "User-Agent: TwilioProxy/1.1\r\nAccept: */*\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
        )

        def make(i: int) -> bytes:
            sid = f"SM{self.run_id}{tag:02x}{i:022x}"
            # The parameters Twilio sends with an inbound SMS, in its order.
            params = {
                "ToCountry": "US",
                "ToState": "CA",
                "SmsMessageSid": sid,
                "NumMedia": "0",
                "ToCity": "SAN FRANCISCO",
                "FromZip": "",
                "SmsSid": sid,
                "FromState": "",
                "SmsStatus": "received",
                "FromCity": "",
                "Body": f"Hi! Where is my order #{i}? Thanks",
                "FromCountry": "GB",
                "To": "+14155550100",
                "ToZip": "94105",
                "NumSegments": "1",
                "ReferralNumMedia": "0",
                "MessageSid": sid,
                "AccountSid": self.account_sid,
                "From": "+447700900123",
                "ApiVersion": "2010-04-01",
            }
            body = urlencode(params).encode()
            signature = compute_signature(self.token, url, {k: [v] for k, v in params.items()})
            return (
                f"{head}{SIGNATURE_HEADER}: {signature}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body

        return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _process_tree(root: int) -> list[int]:
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


def _with_vhost(url: str, vhost: str) -> str:
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
        for pid in _process_tree(self._proc.pid):
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
        self.url = _with_vhost(url, vhost) if vhost else url
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


@dataclass
class Settings:
    """Command-line knobs."""

    duration: float
    warmup: float
    concurrency: int
    connections: int
    workers: list[int]
    dedup: str
    broker_url: str
    output: Path


async def _phase_pair(
    label: str,
    server: Server,
    port: int,
    webhooks: Webhooks,
    tag: int,
    cfg: Settings,
    count: Callable[[], Awaitable[int]],
    expected_rate: float,
) -> dict[str, object]:
    """Saturation then half-rate on one running server; each checked against the queue."""
    out: dict[str, object] = {"label": label}
    budget = int(expected_rate * (cfg.warmup + cfg.duration) * 1.3) + cfg.concurrency
    source = RequestSource(webhooks.factory(port, tag), budget)
    cpu = server.cpu_seconds()
    saturated = await closed_loop(
        port, source, concurrency=cfg.concurrency, duration=cfg.duration, warmup=cfg.warmup
    )
    cpu = server.cpu_seconds() - cpu
    out["saturation"] = _with_check(saturated, await count(), source.made_late, cpu)
    half = saturated.throughput / 2
    source = RequestSource(
        webhooks.factory(port, tag + 1), int(half * (cfg.warmup + cfg.duration)) + 16
    )
    cpu = server.cpu_seconds()
    paced = await open_loop(
        port,
        source,
        rate=half,
        duration=cfg.duration,
        warmup=cfg.warmup,
        connections=cfg.connections,
    )
    cpu = server.cpu_seconds() - cpu
    out["half_rate"] = _with_check(paced, await count(), source.made_late, cpu)
    _print_row(label, saturated, paced, float(out["saturation"]["server_cpu_ms_per_request"]))  # type: ignore[index]
    return out


def _with_check(
    result: PhaseResult, on_queue: int, made_late: int, server_cpu: float
) -> dict[str, object]:
    summary = result.summary()
    # CPU the server spent per request it answered: steadier than req/s on a busy machine.
    summary["server_cpu_ms_per_request"] = round(1000 * server_cpu / max(result.sent_total, 1), 3)
    summary["on_queue"] = on_queue
    summary["queue_matches_accepted"] = on_queue == result.accepted_total
    summary["requests_signed_during_phase"] = made_late
    return summary


def _print_row(label: str, saturated: PhaseResult, paced: PhaseResult, cpu_ms: float) -> None:
    print(
        f"{label:<22} {saturated.throughput:>9.0f} {saturated.percentile(50) * 1e3:>8.2f} "
        f"{saturated.percentile(99) * 1e3:>8.2f} | {paced.target_rate or 0:>7.0f} "
        f"{paced.throughput:>8.0f} {paced.percentile(50) * 1e3:>8.2f} "
        f"{paced.percentile(99) * 1e3:>8.2f} | {cpu_ms:>6.3f}",
        flush=True,
    )


def _machine() -> dict[str, object]:
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


async def run(cfg: Settings) -> dict[str, object]:
    """The whole benchmark; returns the JSON document it also writes."""
    run_id = secrets.token_hex(4)
    webhooks = Webhooks(
        token=secrets.token_hex(16),
        account_key=f"bench{run_id}",
        account_sid="AC" + secrets.token_hex(16),
        run_id=run_id,
    )
    use_vhost = shutil.which("rabbitmqctl") is not None
    if not use_vhost:
        print(
            "warning: rabbitmqctl not found; using the broker's default vhost (the service "
            "will also consume the shared connector.sms.twilio.send queue while it runs)",
            file=sys.stderr,
        )
    broker = Broker(cfg.broker_url, f"bench-sms-{run_id}" if use_vhost else None)
    bare_name = f"bench.bare.{run_id}"
    events_queue = f"bench.sms.{run_id}"
    cleanup = [("queue", bare_name), ("exchange", bare_name), ("queue", events_queue)]
    env = {**os.environ, TOKEN_ENV: webhooks.token, "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    report: dict[str, object] = {
        "command": "python -m benchmarks.sms_webhooks " + " ".join(sys.argv[1:]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "settings": {
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "concurrency": cfg.concurrency,
            "open_loop_connections": cfg.connections,
            "dedup": cfg.dedup,
            "broker": "RabbitMQ at " + (urlsplit(cfg.broker_url).hostname or "?"),
        },
    }
    systems: list[dict[str, object]] = []
    print(
        f"{'':<22} {'saturation (closed loop)':^27} | {'half rate (open loop)':^34}\n"
        f"{'system':<22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} | {'target':>7} "
        f"{'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} | cpu ms/req",
        flush=True,
    )
    await broker.open()
    try:
        await broker.declare_bare(bare_name)

        # 1. The load generator's own ceiling, against a handler that does nothing.
        port = _free_port()
        trivial = Server(
            "trivial",
            [py, "-m", "benchmarks.bare", "--port", str(port), "--trivial"],
            env=env,
            ready=1,
        )
        async with running(trivial):
            fixed = webhooks.factory(port, 0)(0)
            source = RequestSource(lambda _: fixed, 0)
            ceiling = await closed_loop(
                port,
                source,
                concurrency=cfg.concurrency,
                duration=min(cfg.duration, 5.0),
                warmup=cfg.warmup,
            )
        report["loadgen_ceiling"] = ceiling.summary()
        print(
            f"{'trivial handler':<22} {ceiling.throughput:>9.0f} "
            f"{ceiling.percentile(50) * 1e3:>8.2f} {ceiling.percentile(99) * 1e3:>8.2f} |"
            f"  (load generator ceiling; its cpu {ceiling.loadgen_cpu:.2f})",
            flush=True,
        )

        # 2. The bare bound.
        port = _free_port()
        bare = Server(
            "bare",
            [
                *(py, "-m", "benchmarks.bare", "--port", str(port), "--amqp", broker.url),
                *("--exchange", bare_name, "--token-env", TOKEN_ENV),
            ],
            env=env,
            ready=1,
        )
        async with running(bare):
            bare_result = await _phase_pair(
                "bare bound",
                bare,
                port,
                webhooks,
                0x10,
                cfg,
                lambda: broker.count_and_purge(bare_name),
                expected_rate=6000,
            )
        systems.append(bare_result)
        bare_rate = float(bare_result["saturation"]["requests_per_s"])  # type: ignore[index]

        # 3. The SMS service, one process then more.
        with tempfile.TemporaryDirectory(prefix="bench-sms-") as tmp:
            for i, workers in enumerate(cfg.workers):
                port = _free_port()
                config = Path(tmp) / f"config-{workers}.json"
                config.write_text(json.dumps(_service_config(port, broker.url, cfg, webhooks)))
                argv = [py, "-m", "gateway.cli", "--config", str(config), "run", "sms.twilio"]
                if workers > 1:
                    argv += ["--workers", str(workers)]
                service = Server(f"service x{workers}", argv, env=env, ready=workers)
                async with running(service):
                    result = await _phase_pair(
                        f"service x{workers}",
                        service,
                        port,
                        webhooks,
                        0x20 + 2 * i,
                        cfg,
                        lambda: broker.count_and_purge(events_queue),
                        expected_rate=bare_rate * workers,
                    )
                result["workers"] = workers
                result["dedup"] = cfg.dedup
                systems.append(result)
    finally:
        await broker.close(cleanup)
    report["systems"] = systems
    report["verdict"] = _verdict(systems)
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return report


def _service_config(port: int, url: str, cfg: Settings, webhooks: Webhooks) -> dict[str, object]:
    return {
        "http": {"host": "127.0.0.1", "port": port},
        "broker": {"url": url},
        "dedup": {"url": cfg.dedup},
        "telemetry": {"log_level": "INFO", "log_format": "json"},
        "subscriptions": [
            {"queue": f"bench.sms.{webhooks.run_id}", "bindings": ["message.received.sms.twilio"]}
        ],
        "connectors": {
            "sms.twilio": {
                "accounts": {
                    webhooks.account_key: {
                        "account_sid": webhooks.account_sid,
                        "auth_token": {"env": TOKEN_ENV},
                        "numbers": ["+14155550100"],
                    }
                }
            }
        },
    }


def _verdict(systems: list[dict[str, object]]) -> dict[str, object]:
    by_label = {str(s["label"]): s for s in systems}
    bare = by_label.get("bare bound")
    one = by_label.get("service x1")
    if bare is None or one is None:
        return {}
    bare_sat = bare["saturation"]
    one_sat, one_half = one["saturation"], one["half_rate"]
    assert isinstance(bare_sat, dict)
    assert isinstance(one_sat, dict)
    assert isinstance(one_half, dict)
    share = float(one_sat["requests_per_s"]) / max(float(bare_sat["requests_per_s"]), 1e-9)
    verdict: dict[str, object] = {
        "service_share_of_bare": round(share, 3),
        "throughput_target_met": share >= TARGET_SHARE,
        "service_p99_ms_at_half_rate": one_half["p99_ms"],
        "p99_target_met": float(one_half["p99_ms"]) < TARGET_P99_MS,
        "all_accepted_on_queue": all(
            bool(s[phase]["queue_matches_accepted"])  # type: ignore[index]
            for s in systems
            for phase in ("saturation", "half_rate")
        ),
    }
    one_rate = max(float(one_sat["requests_per_s"]), 1e-9)
    for s in systems:
        if s.get("workers", 1) != 1 and isinstance(s["saturation"], dict):
            rate = float(s["saturation"]["requests_per_s"])
            verdict[f"scaling_x{s['workers']}"] = round(rate / one_rate, 3)
    return verdict


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m benchmarks.sms_webhooks``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds first")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="connections in the saturation phase"
    )
    parser.add_argument(
        "--connections", type=int, default=64, help="connection pool of the open-loop phase"
    )
    parser.add_argument(
        "--workers", default="1,2", help="service process counts to run (default 1,2)"
    )
    parser.add_argument(
        "--dedup", default="memory://", help="service dedup store (memory:// or redis://...)"
    )
    parser.add_argument("--broker-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    host = urlsplit(args.broker_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the benchmark only talks to a local broker (127.0.0.1)")
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--workers takes a comma-separated list of numbers, got {args.workers!r}")
    if not workers or min(workers) < 1:
        parser.error("--workers needs at least one count >= 1")
    if args.duration <= 0 or args.warmup < 0 or args.concurrency < 1 or args.connections < 1:
        parser.error("--duration, --concurrency and --connections must be positive")
    cfg = Settings(
        duration=args.duration,
        warmup=args.warmup,
        concurrency=args.concurrency,
        connections=args.connections,
        workers=workers,
        dedup=args.dedup,
        broker_url=args.broker_url,
        output=args.output,
    )
    started = time.monotonic()
    report = asyncio.run(run(cfg))
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(json.dumps(report, indent=2) + "\n")
    verdict = report.get("verdict", {})
    print(f"\n{json.dumps(verdict, indent=2)}\nwritten to {cfg.output}")
    return 0 if isinstance(verdict, dict) and verdict.get("all_accepted_on_queue") else 1


if __name__ == "__main__":
    sys.exit(main())
