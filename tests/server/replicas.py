"""Gateway replicas for the multi-process tests: ``channel-gateway run gateway`` processes
on one PostgreSQL ledger schema and one RabbitMQ vhost."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
from grpc import aio

from gateway.api.v1.gateway_service_pb2_grpc import GatewayServiceStub

CLI = [sys.executable, "-m", "gateway.cli"]
ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(proc: asyncio.subprocess.Process, port: int) -> None:
    """Return once ``proc`` accepts connections on ``port``; fail if it exits first."""
    for _ in range(300):
        if proc.returncode is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise AssertionError("gateway did not start listening")


@asynccontextmanager
async def gateway_replicas(
    tmp_path: Path,
    *,
    broker_url: str,
    ledger: tuple[str, str],
    connector: str,
    count: int = 2,
) -> AsyncIterator[list[GatewayServiceStub]]:
    """``count`` gateway processes hosting ``connector`` on the ledger ``(url, schema)``
    and the broker at ``broker_url``; yields a stub per replica, in order.

    On leaving, every replica gets SIGTERM; after a body that did not raise, each
    must have exited 0 (a graceful stop).
    """
    url, schema = ledger
    ports = [free_port() for _ in range(count)]
    procs = []
    for i, port in enumerate(ports):
        config = tmp_path / f"gateway-{i}.yaml"
        config.write_text(
            f"""
broker: {{url: "{broker_url}"}}
telemetry: {{log_level: WARNING}}
gateway:
  host: 127.0.0.1
  port: {port}
  ledger_url: "{url}"
  ledger_schema: "{schema}"
  shutdown_grace: 2
connectors:
  {connector}: {{}}
"""
        )
        procs.append(
            await asyncio.create_subprocess_exec(
                *CLI,
                "--config",
                str(config),
                "run",
                "gateway",
                cwd=ROOT,
                env=dict(os.environ),
                stderr=asyncio.subprocess.PIPE,
            )
        )
    try:
        await asyncio.gather(
            *(wait_listening(p, port) for p, port in zip(procs, ports, strict=True))
        )
        channels = [aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        try:
            yield [GatewayServiceStub(c) for c in channels]
        finally:
            for channel in channels:
                await channel.close()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(p.wait(), 20) for p in procs]
    assert codes == [0] * count


async def queue_depth(broker_url: str, queue: str) -> int:
    """Messages ready in an existing queue (a passive declare: it must exist)."""
    connection = await aio_pika.connect(broker_url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await connection.close()
