"""An in-process gateway: real gRPC server on loopback, in-memory bus, SQLite ledger."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
from grpc import aio
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.api.v1.gateway_service_pb2_grpc import GatewayServiceStub
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.memory_bus import InMemoryBus
from gateway.server.app import GatewayServer
from gateway.server.connectors import QueueInfo

ACCOUNT_SID = "AC" + "ab" * 16
RABBITMQCTL = os.environ.get("TEST_RABBITMQCTL", "rabbitmqctl")


def settings(
    tmp_path: Path,
    *,
    broker: str = "memory://",
    connectors: dict[str, dict[str, Any]] | None = None,
    **gateway: Any,
) -> RuntimeSettings:
    """Gateway settings with Twilio (and, when asked, Vonage) enabled."""
    return RuntimeSettings.model_validate(
        {
            "broker": {"url": broker, "publish_timeout": 2.0},
            "connectors": connectors if connectors is not None else {"sms.twilio": {}},
            "gateway": {
                "host": "127.0.0.1",
                "port": 0,
                "ledger_url": f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}",
                "shutdown_grace": 1.0,
                **gateway,
            },
        }
    )


class FixedProbe:
    """A queue probe answering from a dict (None: cannot tell)."""

    def __init__(self, answers: dict[str, QueueInfo | None]) -> None:
        self.answers = answers

    async def inspect(self, queue: str) -> QueueInfo | None:
        return self.answers.get(queue)

    async def close(self) -> None:
        return None


@dataclass
class Gateway:
    """A running in-process gateway and a client stub."""

    server: GatewayServer
    bus: InMemoryBus
    channel: aio.Channel
    stub: GatewayServiceStub


async def start_gateway(
    config: RuntimeSettings, *, bus: InMemoryBus, probe: Any = None
) -> tuple[GatewayServer, aio.Channel]:
    """Start a gateway on ``bus`` and open a channel to it."""
    server = GatewayServer(config, bus=bus, probe=probe)
    await server.start()
    channel = aio.insecure_channel(server.address)
    return server, channel


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway with sms.twilio enabled on the in-memory bus."""
    bus = InMemoryBus()
    await bus.connect()
    probe = FixedProbe({"connector.sms.twilio.send": QueueInfo(exists=True, consumers=2)})
    server, channel = await start_gateway(settings(tmp_path), bus=bus, probe=probe)
    try:
        yield Gateway(server=server, bus=bus, channel=channel, stub=GatewayServiceStub(channel))
    finally:
        await channel.close()
        await server.stop()
        await bus.close()


def _rabbitmqctl(*args: str) -> None:
    if shutil.which(RABBITMQCTL) is None:
        pytest.fail(f"{RABBITMQCTL} is not installed; the broker tests need a private vhost")
    out = subprocess.run(
        [RABBITMQCTL, *args], capture_output=True, text=True, timeout=30, check=False
    )
    if out.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {out.stderr.strip()}")


@pytest.fixture
def vhost_url(rabbitmq_url: str, unique: str) -> Iterator[str]:
    """URL of a fresh vhost on the real RabbitMQ, deleted afterwards, so the standard
    topology (command queues, the ledger's status queue) never mixes with other runs."""
    name = f"cgtest-gw-{unique}"
    parts = urlsplit(rabbitmq_url)
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, parts.username or "guest", ".*", ".*", ".*")
        yield urlunsplit(parts._replace(path="/" + quote(name, safe="")))
    finally:
        _rabbitmqctl("delete_vhost", name)


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
