"""The gateway runs ledger retention periodically (and a read-only replica does not)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import REGISTRY

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.ledger import NewMessage, StatusUpdate
from gateway.runtime.memory_bus import InMemoryBus
from gateway.server.app import GatewayServer
from gateway.server.retention import RetentionTask
from gateway.server.settings import RetentionSettings
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


class FlakyLedger:
    """Stands in for the ledger: the first purge fails (database down), later ones work."""

    def __init__(self) -> None:
        self.calls = 0
        self.deleted = asyncio.Event()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def purge(self, before: datetime, *, limit: int) -> int:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionRefusedError("database down")
        self.deleted.set()
        return 0

    async def purge_pending(self, older_than: datetime) -> int:
        return 0

    async def purge_call_commands(self, before: datetime, *, limit: int) -> int:
        return 0


async def test_a_failed_pass_is_counted_and_the_next_one_retries() -> None:
    ledger = FlakyLedger()
    task = RetentionTask(ledger, RetentionSettings(interval_seconds=0.05))  # type: ignore[arg-type]
    failures = REGISTRY.get_sample_value("gateway_ledger_retention_failures_total") or 0.0
    task.start()
    try:
        await asyncio.wait_for(ledger.deleted.wait(), 5)
    finally:
        await task.stop()
    assert ledger.calls >= 2
    assert REGISTRY.get_sample_value("gateway_ledger_retention_failures_total") == failures + 1
