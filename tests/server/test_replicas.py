"""Two gateway processes on one PostgreSQL ledger and one RabbitMQ: the same
idempotency key gives one message id and one command, whichever replica answers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from grpc import aio
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.api.v1.gateway_service_pb2_grpc import GatewayServiceStub
from tests.server.test_send import text_request

CLI = [sys.executable, "-m", "gateway.cli"]
ROOT = Path(__file__).resolve().parent.parent.parent
KEYS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def pg_schema(postgres_url: str, unique: str) -> AsyncIterator[tuple[str, str]]:
    """(asyncpg URL, a fresh schema) on the real PostgreSQL; dropped afterwards."""
    url = "postgresql+asyncpg://" + postgres_url.split("://", 1)[1]
    schema = f"gateway_test_{unique}"
    admin = create_async_engine(url)
    try:
        async with admin.begin() as conn:
            await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        yield url, schema
    finally:
        async with admin.begin() as conn:
            await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.dispose()


async def _wait_listening(proc: asyncio.subprocess.Process, port: int) -> None:
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


async def test_two_gateway_processes_share_idempotency(
    tmp_path: Path, vhost_url: str, pg_schema: tuple[str, str]
) -> None:
    url, schema = pg_schema
    ports = [_free_port(), _free_port()]
    procs = []
    for i, port in enumerate(ports):
        config = tmp_path / f"gateway-{i}.yaml"
        config.write_text(
            f"""
broker: {{url: "{vhost_url}"}}
telemetry: {{log_level: WARNING}}
gateway:
  host: 127.0.0.1
  port: {port}
  ledger_url: "{url}"
  ledger_schema: "{schema}"
  shutdown_grace: 2
connectors:
  sms.twilio: {{}}
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
            *(_wait_listening(p, port) for p, port in zip(procs, ports, strict=True))
        )
        channels = [aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        stubs = [GatewayServiceStub(c) for c in channels]
        # Every key is sent to both replicas at once, twice.
        calls = [
            stubs[n % 2].SendMessage(text_request(f"rep-{k}"), timeout=15)
            for k in range(KEYS)
            for n in range(4)
        ]
        replies = await asyncio.gather(*calls)
        for channel in channels:
            await channel.close()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(p.wait(), 20) for p in procs]
    assert codes == [0, 0]
    by_key: dict[str, set[str]] = {}
    for reply, k in zip(replies, [k for k in range(KEYS) for _ in range(4)], strict=True):
        by_key.setdefault(f"rep-{k}", set()).add(reply.message_id)
    assert all(len(ids) == 1 for ids in by_key.values()), by_key
    assert sum(r.created for r in replies) == KEYS
    # No connector consumes the command queue: it holds exactly one command per key.
    connection = await aio_pika.connect(vhost_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("connector.sms.twilio.send", passive=True)
        assert queue.declaration_result.message_count == KEYS
    finally:
        await connection.close()
