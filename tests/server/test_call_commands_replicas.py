"""Two gateway processes on one PostgreSQL ledger and one RabbitMQ: SendCallCommand with
the same idempotency key gives one command id and one published command, whichever
replica answers."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aio_pika
from grpc import aio

from gateway.api.v1.gateway_service_pb2_grpc import GatewayServiceStub
from tests.server.test_call_commands import place_request
from tests.server.test_replicas import CLI, ROOT, _free_port, _wait_listening, pg_schema

__all__ = ["pg_schema"]  # the fixture, used by name
KEYS = 8


async def test_two_gateway_processes_send_each_call_command_once(
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
  voice.twilio: {{}}
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
        # Every key goes to both replicas at once, twice.
        keys = [f"call-{k}" for k in range(KEYS) for _ in range(4)]
        replies = await asyncio.gather(
            *(
                stubs[n % 2].SendCallCommand(place_request(key), timeout=15)
                for n, key in enumerate(keys)
            )
        )
        for channel in channels:
            await channel.close()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(p.wait(), 20) for p in procs]
    assert codes == [0, 0]
    by_key: dict[str, set[str]] = {}
    for reply, key in zip(replies, keys, strict=True):
        by_key.setdefault(key, set()).add(reply.command_id)
    assert all(len(ids) == 1 for ids in by_key.values()), by_key
    assert sum(r.created for r in replies) == KEYS
    # No voice service consumes the call queue (the gateways declared it): one command per key.
    connection = await aio_pika.connect(vhost_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("connector.voice.twilio.call", passive=True)
        assert queue.declaration_result.message_count == KEYS
    finally:
        await connection.close()
