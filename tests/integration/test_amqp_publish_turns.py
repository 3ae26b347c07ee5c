"""AmqpBus publishes sharing one message id take turns, and a cancelled one leaks nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest

from gateway.runtime.amqp_bus import AmqpBus
from gateway.runtime.bus import OutgoingMessage, UnroutableError
from gateway.runtime.topology import EVENTS_EXCHANGE, Topology, base_topology, subscription_queue
from tests.integration.conftest import Vhost

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def bus(vhost: Vhost) -> AsyncIterator[AmqpBus]:
    bus = AmqpBus(vhost.url, connect_timeout=5)
    await bus.connect()
    await bus.declare(
        base_topology().merge(
            Topology(queues=(subscription_queue("crm.inbound", ["message.received.#"], 5),))
        )
    )
    try:
        yield bus
    finally:
        await bus.close()


def _msg(message_id: str) -> OutgoingMessage:
    return OutgoingMessage(body=b"x", message_id=message_id, type="test.Type", headers={"h": "v"})


async def _count(connection: aio_pika.abc.AbstractConnection) -> int:
    channel = await connection.channel()
    queue = await channel.declare_queue("crm.inbound", passive=True)
    await channel.close()
    return int(queue.declaration_result.message_count or 0)


async def test_same_id_publishes_take_turns_and_a_cancelled_waiter_is_skipped(
    bus: AmqpBus, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    publishes = [
        asyncio.create_task(
            bus.publish(EVENTS_EXCHANGE, "message.received.a.b", _msg("same"), timeout=5)
        )
        for _ in range(5)
    ]
    await asyncio.sleep(0)  # all started: one publishing, four waiting their turn
    publishes[2].cancel()
    results = await asyncio.gather(*publishes, return_exceptions=True)
    assert isinstance(results[2], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 2] == [None] * 4
    assert bus._inflight_ids == {}
    assert await _count(vhost_connection) == 4


async def test_an_unroutable_publish_passes_the_turn_on(
    bus: AmqpBus, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    lost = bus.publish(EVENTS_EXCHANGE, "nobody.listens", _msg("shared"), timeout=5)
    kept = bus.publish(EVENTS_EXCHANGE, "message.received.a.b", _msg("shared"), timeout=5)
    first, second = await asyncio.gather(lost, kept, return_exceptions=True)
    assert isinstance(first, UnroutableError)
    assert second is None
    assert bus._inflight_ids == {}
    assert await _count(vhost_connection) == 1


async def test_one_batch_mixes_returned_large_and_plain_publishes(
    bus: AmqpBus, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    """Publishes of one loop turn go out as one write; each still gets its own outcome."""
    large = OutgoingMessage(body=b"L" * 300_000, message_id="large", type="test.Type", headers={})
    results = await asyncio.gather(
        *(
            bus.publish(EVENTS_EXCHANGE, "message.received.a.b", _msg(f"m{i}"), timeout=5)
            for i in range(10)
        ),
        bus.publish(EVENTS_EXCHANGE, "nobody.listens", _msg("lost"), timeout=5),
        bus.publish(EVENTS_EXCHANGE, "message.received.a.b", large, timeout=5),
        return_exceptions=True,
    )
    assert results[:10] == [None] * 10
    assert isinstance(results[10], UnroutableError)
    assert results[11] is None
    assert await _count(vhost_connection) == 11
    channel = await vhost_connection.channel()
    queue = await channel.declare_queue("crm.inbound", passive=True)
    bodies = {}
    async with queue.iterator(no_ack=True) as messages:
        async for message in messages:
            bodies[message.message_id] = message.body
            if len(bodies) == 11:
                break
    assert bodies["large"] == large.body  # split over several body frames, intact
    assert set(bodies) == {f"m{i}" for i in range(10)} | {"large"}
