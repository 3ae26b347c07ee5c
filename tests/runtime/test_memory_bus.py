"""The in-memory bus models the RabbitMQ behaviour handlers rely on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.contract.errors import BadRequestError, PermanentError, TransientError
from gateway.runtime.bus import (
    BrokerUnavailableError,
    Delivery,
    OutgoingMessage,
    UnroutableError,
)
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.topology import (
    COMMANDS_EXCHANGE,
    DEAD_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    Topology,
    base_topology,
    command_queue,
)

QUEUE = "connector.sms.fake.send"


def _msg(n: int = 1) -> OutgoingMessage:
    return OutgoingMessage(body=b"x%d" % n, message_id=f"m{n}", type="t", headers={"h": "v"})


@pytest.fixture
async def bus() -> AsyncIterator[InMemoryBus]:
    bus = InMemoryBus()
    await bus.connect()
    await bus.declare(base_topology().merge(Topology(queues=(command_queue("sms", "fake", 3),))))
    yield bus
    await bus.close()


async def test_routes_by_topic_and_counts_nothing_twice(bus: InMemoryBus) -> None:
    await bus.publish(COMMANDS_EXCHANGE, "send.sms.fake", _msg(), timeout=1)
    assert bus.queue_depth(QUEUE) == 1
    got = await bus.get(QUEUE)
    assert (got.body, got.message_id, got.routing_key, got.exchange) == (
        b"x1",
        "m1",
        "send.sms.fake",
        COMMANDS_EXCHANGE,
    )
    assert got.headers == {"h": "v"}
    assert not got.redelivered
    assert got.delivery_count == 0


async def test_unroutable_and_undeclared_exchange(bus: InMemoryBus) -> None:
    with pytest.raises(UnroutableError, match="no queue bound"):
        await bus.publish(COMMANDS_EXCHANGE, "send.sms.nobody", _msg(), timeout=1)
    with pytest.raises(UnroutableError, match="not declared"):
        await bus.publish("nope", "k", _msg(), timeout=1)
    assert bus.published == []


async def test_unavailable_bus_refuses_publish_and_is_not_ready(bus: InMemoryBus) -> None:
    bus.available = False
    assert not bus.is_ready()
    with pytest.raises(BrokerUnavailableError) as info:
        await bus.publish(COMMANDS_EXCHANGE, "send.sms.fake", _msg(), timeout=1)
    assert isinstance(info.value, TransientError)
    bus.available = True
    assert bus.is_ready()
    await bus.publish(COMMANDS_EXCHANGE, "send.sms.fake", _msg(), timeout=1)


async def test_requeue_then_ack(bus: InMemoryBus) -> None:
    seen: list[Delivery] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery)
        if len(seen) < 2:
            raise RuntimeError("crash in handler")
        done.set()

    sub = await bus.consume(QUEUE, handler, prefetch=1)
    await bus.publish(COMMANDS_EXCHANGE, "send.sms.fake", _msg(), timeout=1)
    await asyncio.wait_for(done.wait(), 2)
    await sub.cancel()
    assert [d.delivery_count for d in seen] == [0, 1]
    assert [d.redelivered for d in seen] == [False, True]
    assert bus.queue_depth(QUEUE) == 0
    assert bus.queue_depth(DEAD_LETTER_QUEUE) == 0


async def test_delivery_limit_dead_letters_a_poison_message(bus: InMemoryBus) -> None:
    attempts: list[int] = []

    async def handler(delivery: Delivery) -> None:
        attempts.append(delivery.delivery_count)
        raise RuntimeError("poison")

    sub = await bus.consume(QUEUE, handler, prefetch=4)
    await bus.publish(COMMANDS_EXCHANGE, "send.sms.fake", _msg(), timeout=1)
    dead = await bus.get(DEAD_LETTER_QUEUE, timeout=2)
    await sub.cancel()
    assert attempts == [0, 1, 2, 3]  # delivery limit 3: first delivery + 3 redeliveries
    assert dead.exchange == DEAD_EXCHANGE
    assert dead.routing_key == "send.sms.fake"
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    assert dead.body == b"x1"
    assert bus.queue_depth(QUEUE) == 0


@pytest.mark.parametrize("error", [PermanentError("no"), BadRequestError("bad")])
async def test_permanent_failures_are_rejected_to_dead_letters(
    bus: InMemoryBus, error: Exception
) -> None:
    calls = 0

    async def handler(_: Delivery) -> None:
        nonlocal calls
        calls += 1
        raise error

    sub = await bus.consume(QUEUE, handler, prefetch=1)
    await bus.publish(COMMANDS_EXCHANGE, "send.sms.fake", _msg(), timeout=1)
    dead = await bus.get(DEAD_LETTER_QUEUE, timeout=2)
    await sub.cancel()
    assert calls == 1
    assert dead.headers["x-first-death-reason"] == "rejected"


async def test_prefetch_bounds_concurrency(bus: InMemoryBus) -> None:
    running = peak = 0
    finished = 0
    all_done = asyncio.Event()

    async def handler(_: Delivery) -> None:
        nonlocal running, peak, finished
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        finished += 1
        if finished == 10:
            all_done.set()

    sub = await bus.consume(QUEUE, handler, prefetch=3)
    for n in range(10):
        await bus.publish(COMMANDS_EXCHANGE, "send.sms.fake", _msg(n), timeout=1)
    await asyncio.wait_for(all_done.wait(), 5)
    await sub.cancel()
    assert peak == 3


async def test_temporary_queue_receives_matching_events(bus: InMemoryBus) -> None:
    name = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["message.received.#"])
    await bus.publish(EVENTS_EXCHANGE, "message.received.sms.twilio", _msg(1), timeout=1)
    with pytest.raises(UnroutableError):
        await bus.publish(EVENTS_EXCHANGE, "message.status.sms.twilio", _msg(2), timeout=1)
    assert (await bus.get(name)).message_id == "m1"


async def test_consuming_an_undeclared_queue_is_an_error(bus: InMemoryBus) -> None:
    async def handler(_: Delivery) -> None:
        return None

    with pytest.raises(PermanentError, match="not declared"):
        await bus.consume("nope", handler, prefetch=1)
