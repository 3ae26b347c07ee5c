"""Gateway send benchmark: SendMessage calls/s and latency to SENT, SQLite vs PostgreSQL.

``python -m benchmarks.gateway_send`` runs, for each ledger backend:

* ``channel-gateway run gateway`` (gRPC API, ledger, fallback engine) and
  ``channel-gateway run sms`` (the Twilio connector) as subprocesses;
* a fake Twilio on 127.0.0.1 in this process that answers every send with
  ``queued`` and immediately plays a signed ``sent`` StatusCallback back to
  the SMS service, as Twilio does;
* a closed loop of ``--concurrency`` gRPC clients calling ``SendMessage``
  (distinct idempotency keys) for ``--duration`` seconds, once per
  concurrency level given (1: the path's latency unloaded; 32: throughput);
* a consumer of ``message.status.#`` on ``channels.events`` that stamps when
  each message's SENT status reached the broker.

So a SENT is the whole path: gRPC -> ledger (ACCEPTED) -> confirmed command
on RabbitMQ -> connector -> provider HTTP call -> signed callback -> webhook
-> confirmed status event. Latency to SENT is from the client's call to the
SENT event on the broker. After the window the run waits (bounded) for the
stragglers and checks the provider saw exactly one call per accepted send and
the ledger agrees (GetMessage on a sample).

Everything is on 127.0.0.1: the broker and PostgreSQL URLs are refused
otherwise. Broker state lives in a throw-away vhost (``rabbitmqctl``), and the
PostgreSQL ledger in a throw-away schema; both are deleted at the end.
Results go to ``benchmarks/results/gateway_send.json`` and stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from grpc import aio
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.api.v1.content_pb2 import Text
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.gateway_service_pb2 import (
    ChannelIdentity,
    GetMessageRequest,
    Recipient,
    SendMessageRequest,
)
from gateway.api.v1.gateway_service_pb2_grpc import GatewayServiceStub
from gateway.api.v1.message_pb2 import Message
from gateway.testing.fake_twilio import FakeTwilio

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gateway_send.json"
TOKEN_ENV = "BENCH_TWILIO_TOKEN"
ACCOUNT_SID = "AC" + "cd" * 16
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
#: Final states a send may end in instead of SENT (counted, not timed).
_NOT_SENT = frozenset({DeliveryState.DELIVERY_STATE_FAILED, DeliveryState.DELIVERY_STATE_EXPIRED})


def _require_loopback(url: str, what: str) -> None:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"{what} must be on 127.0.0.1 (got host {host!r})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise SystemExit("rabbitmqctl not found: it creates the benchmark's throw-away vhost")
    subprocess.run([exe, *args], check=True, capture_output=True, timeout=60)


@contextlib.asynccontextmanager
async def _vhost(broker_url: str) -> AsyncIterator[str]:
    name = f"bench-gw-{secrets.token_hex(4)}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        parts = urlsplit(broker_url)
        yield urlunsplit(parts._replace(path="/" + name))
    finally:
        _rabbitmqctl("delete_vhost", name)


@contextlib.asynccontextmanager
async def _ledger(backend: str, tmp: Path, postgres_url: str) -> AsyncIterator[dict[str, str]]:
    if backend == "sqlite":
        yield {"ledger_url": f"sqlite+aiosqlite:///{tmp / 'ledger.db'}"}
        return
    schema = f"bench_gw_{secrets.token_hex(4)}"
    engine = create_async_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        yield {"ledger_url": postgres_url, "ledger_schema": schema}
    finally:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await engine.dispose()


async def _wait_port(port: int, proc: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _request(key: str) -> SendMessageRequest:
    return SendMessageRequest(
        idempotency_key=key,
        recipient=Recipient(address=ChannelIdentity(channel="sms", address="+447700900123")),
        message=Message(text=Text(body="Your order ships today.")),
    )


def _quantile(values: list[float], q: int) -> float:
    """The q-th percentile in milliseconds (0.0 for too few samples)."""
    if len(values) < 2:
        return values[0] * 1000 if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


async def run_backend(backend: str, concurrency: int, cfg: argparse.Namespace) -> dict[str, Any]:
    """One backend's measurement (the gateway and SMS service are fresh processes)."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bench-gw-") as tmpdir:
        tmp = Path(tmpdir)
        async with (
            _vhost(cfg.broker_url) as amqp_url,
            _ledger(backend, tmp, cfg.postgres_url) as ledger,
            FakeTwilio(auth_token=token, callback_statuses=("sent",), callback_delay=0) as fake,
        ):
            grpc_port, http_port = _free_port(), _free_port()
            config = {
                "http": {"host": "127.0.0.1", "port": http_port},
                "broker": {"url": amqp_url},
                "telemetry": {"log_level": "WARNING"},
                "gateway": {"host": "127.0.0.1", "port": grpc_port, **ledger},
                "connectors": {
                    "sms.twilio": {
                        "api_base_url": fake.url,
                        "accounts": {
                            "main": {
                                "account_sid": ACCOUNT_SID,
                                "auth_token": {"env": TOKEN_ENV},
                                "numbers": ["+14155550100"],
                            }
                        },
                    }
                },
            }
            config_path = tmp / "config.yaml"
            config_path.write_text(json.dumps(config))  # JSON is YAML
            env = {**os.environ, TOKEN_ENV: token}
            cli = [sys.executable, "-m", "gateway.cli", "--config", str(config_path), "run"]
            procs = [
                await asyncio.create_subprocess_exec(*cli, what, cwd=ROOT, env=env)
                for what in ("gateway", "sms.twilio")
            ]
            try:
                await _wait_port(grpc_port, procs[0])
                await _wait_port(http_port, procs[1])
                return await _measure(backend, concurrency, cfg, amqp_url, grpc_port, fake)
            finally:
                for proc in procs:
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                for proc in procs:
                    try:
                        await asyncio.wait_for(proc.wait(), 30)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()


async def _measure(
    backend: str,
    concurrency: int,
    cfg: argparse.Namespace,
    amqp_url: str,
    grpc_port: int,
    fake: FakeTwilio,
) -> dict[str, Any]:
    sent_at: dict[str, float] = {}
    not_sent: set[str] = set()
    started: dict[str, float] = {}
    outstanding: set[str] = set()  # accepted, neither SENT nor failed yet
    measuring = False
    all_done = asyncio.Event()
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1024)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind("channels.events", "message.status.#")

        async def on_status(message: AbstractIncomingMessage) -> None:
            event = Event()
            event.ParseFromString(message.body)
            state, message_id = event.status.state, event.status.message_id
            if state == DeliveryState.DELIVERY_STATE_SENT:
                sent_at.setdefault(message_id, time.perf_counter())
            elif state in _NOT_SENT:
                not_sent.add(message_id)
            else:
                await message.ack()
                return
            outstanding.discard(message_id)
            if not measuring and not outstanding:
                all_done.set()
            await message.ack()

        await queue.consume(on_status)
        async with aio.insecure_channel(f"127.0.0.1:{grpc_port}") as grpc_channel:
            stub = GatewayServiceStub(grpc_channel)
            run_id = secrets.token_hex(3)
            # Warm-up: connections, prepared statements, JIT-less caches.
            for i in range(cfg.warmup):
                reply = await stub.SendMessage(_request(f"warm-{run_id}-{i}"), timeout=10)
                if reply.message_id not in sent_at and reply.message_id not in not_sent:
                    outstanding.add(reply.message_id)
            # The warm-up's provider calls and statuses are over before the window opens.
            if outstanding:
                await asyncio.wait_for(all_done.wait(), cfg.drain_timeout)
            calls_before = len(fake.calls)
            rpc_seconds: list[float] = []
            errors = 0
            stop_at = time.perf_counter() + cfg.duration
            counter = iter(range(10**9))

            async def client() -> None:
                nonlocal errors
                for i in counter:
                    now = time.perf_counter()
                    if now >= stop_at:
                        return
                    try:
                        reply = await stub.SendMessage(_request(f"b-{run_id}-{i}"), timeout=30)
                    except aio.AioRpcError:
                        errors += 1
                        continue
                    rpc_seconds.append(time.perf_counter() - now)
                    started[reply.message_id] = now
                    if reply.message_id not in sent_at and reply.message_id not in not_sent:
                        outstanding.add(reply.message_id)

            load_before = os.getloadavg()
            measuring = True
            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            window = time.perf_counter() - t0
            measuring = False
            # Stragglers: bounded wait for every accepted send to be SENT (or failed).
            # (Warm-up statuses may have set the event: only what follows counts.)
            all_done.clear()
            if outstanding:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_done.wait(), cfg.drain_timeout)
            load_after = os.getloadavg()
            reached = [m for m in started if m in sent_at]
            to_sent = sorted(sent_at[m] - started[m] for m in reached)
            last_sent = max((sent_at[m] for m in reached), default=t0)
            # The ledger agrees: a sample of messages is SENT there too.
            # The ledger applies statuses from its own queue: give it a bounded moment.
            sample = random.sample(reached, min(20, len(reached)))
            ledger_sent = 0
            ledger_deadline = time.perf_counter() + 10
            for message_id in sample:
                while True:
                    got = await stub.GetMessage(
                        GetMessageRequest(message_id=message_id), timeout=10
                    )
                    if got.message.state == DeliveryState.DELIVERY_STATE_SENT:
                        ledger_sent += 1
                        break
                    if time.perf_counter() > ledger_deadline:
                        break
                    await asyncio.sleep(0.1)
    finally:
        await connection.close()
    accepted = len(started)
    provider_calls = len(fake.calls) - calls_before
    return {
        "backend": backend,
        "concurrency": concurrency,
        "window_seconds": round(window, 2),
        "accepted": accepted,
        "rpc_errors": errors,
        "sends_per_second": round(accepted / window, 1),
        "sent_per_second_end_to_end": round(len(reached) / (last_sent - t0), 1) if reached else 0.0,
        "rpc_p50_ms": round(_quantile(rpc_seconds, 50), 1),
        "rpc_p99_ms": round(_quantile(rpc_seconds, 99), 1),
        "to_sent_p50_ms": round(_quantile(to_sent, 50), 1),
        "to_sent_p99_ms": round(_quantile(to_sent, 99), 1),
        "reached_sent": len(reached),
        "failed_or_expired": len(not_sent & started.keys()),
        "missing_after_drain": accepted - len(reached) - len(not_sent & started.keys()),
        "provider_calls": provider_calls,
        "ledger_sample_sent": f"{ledger_sent}/{len(sample)}",
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per backend")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 32],
        help="concurrent gRPC clients (one run per level and backend)",
    )
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured sends first")
    parser.add_argument(
        "--drain-timeout", type=float, default=30.0, help="max seconds to wait for stragglers"
    )
    parser.add_argument(
        "--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"]
    )
    parser.add_argument("--broker-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument(
        "--postgres-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    cfg = parser.parse_args(argv)
    if not 0 < cfg.duration <= 300:
        parser.error("--duration must be in (0, 300] seconds")
    if not 0 < cfg.drain_timeout <= 300:
        parser.error("--drain-timeout must be in (0, 300] seconds")
    if min(cfg.concurrency) < 1:
        parser.error("--concurrency must be at least 1")
    _require_loopback(cfg.broker_url, "--broker-url")
    _require_loopback(cfg.postgres_url, "--postgres-url")
    results = []
    for backend in cfg.backends:
        for concurrency in cfg.concurrency:
            result = asyncio.run(run_backend(backend, concurrency, cfg))
            results.append(result)
            print(json.dumps(result), flush=True)
    report = {
        "benchmark": "gateway_send",
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.gateway_send " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": results,
    }
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {cfg.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
