"""The gateway runs ledger retention periodically (and a read-only replica does not)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.ledger import NewMessage, StatusUpdate
from gateway.runtime.memory_bus import InMemoryBus
from gateway.server.app import GatewayServer
from tests.server.conftest import settings

S = DeliveryState
#: About 9 ms: settled messages are past retention almost at once.
TINY_DAYS = 1e-7


async def _settled(server: GatewayServer, key: str) -> str:
    record, _ = await server.ledger.accept(
        NewMessage(idempotency_key=key, channel="sms", provider="twilio", address="+15550001111")
    )
    await server.ledger.apply_status(
        StatusUpdate(state=S.DELIVERY_STATE_DELIVERED, message_id=record.message_id)
    )
    return record.message_id


async def test_gateway_purges_settled_messages_periodically(tmp_path: Path) -> None:
    bus = InMemoryBus()
    await bus.connect()
    config = settings(tmp_path, retention={"messages_days": TINY_DAYS, "interval_seconds": 0.05})
    server = GatewayServer(config, bus=bus)
    await server.start()
    try:
        # Created after the first pass ran: a later pass must find it.
        await asyncio.sleep(0.1)
        message_id = await _settled(server, "done")
        in_flight, _ = await server.ledger.accept(
            NewMessage(
                idempotency_key="open", channel="sms", provider="twilio", address="+15550001111"
            )
        )
        for _ in range(100):  # at most ~5 s
            if await server.ledger.find(message_id) is None:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the settled message outlived its retention")
        # Not settled: kept however old.
        assert await server.ledger.find(in_flight.message_id) is not None
    finally:
        await server.stop()
        await bus.close()


async def test_read_only_replica_runs_no_retention(tmp_path: Path) -> None:
    bus = InMemoryBus()
    await bus.connect()
    config = settings(
        tmp_path,
        run_ingestor=False,
        retention={"messages_days": TINY_DAYS, "interval_seconds": 0.05},
    )
    server = GatewayServer(config, bus=bus)
    await server.start()
    try:
        message_id = await _settled(server, "done")
        await asyncio.sleep(0.4)  # several intervals
        assert await server.ledger.find(message_id) is not None
    finally:
        await server.stop()
        await bus.close()
