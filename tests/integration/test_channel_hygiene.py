"""Subscriptions and temporary queues give their broker channels back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.runtime.amqp_bus import AmqpBus
from gateway.runtime.bus import Delivery
from gateway.runtime.topology import EVENTS_EXCHANGE, base_topology
from tests.integration.conftest import Vhost

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def bus(vhost: Vhost) -> AsyncIterator[AmqpBus]:
    bus = AmqpBus(vhost.url, connect_timeout=5)
    await bus.connect()
    try:
        await bus.declare(base_topology())
        yield bus
    finally:
        await bus.close()


def _open_channels(bus: AmqpBus) -> int:
    connection = bus._sub_conn  # the consuming connection owns the channels under test
    assert connection is not None
    underlay = connection.transport
    assert underlay is not None
    return sum(1 for ch in underlay.connection.channels.values() if ch is not None)


async def test_tail_style_subscriptions_do_not_leak_channels(bus: AmqpBus) -> None:
    async def ignore(_: Delivery) -> None:
        return None

    before = _open_channels(bus)
    for _ in range(10):
        queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["message.received.#"])
        subscription = await bus.consume(queue, ignore, prefetch=10)
        await subscription.cancel()
    assert _open_channels(bus) == before
