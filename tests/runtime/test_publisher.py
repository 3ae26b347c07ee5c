"""Confirmed publishing with inbound dedup (rules 1, 3 and 4)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Message
from gateway.contract.errors import TransientError
from gateway.runtime.bus import BrokerUnavailableError, UnroutableError
from gateway.runtime.codec import decode_event
from gateway.runtime.idempotency import MemoryIdempotencyStore, RedisIdempotencyStore
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.publisher import ConcurrentDeliveryError, EventPublisher
from gateway.runtime.topology import EVENTS_EXCHANGE, base_topology
from gateway.testing.rabbitmq_node import free_port


def _event(n: int, type: str = "message.received") -> Event:
    return Event(
        id=f"ev-{n}",
        type=type,
        channel="sms",
        provider="fake",
        account="main",
        message=Message(provider_message_id=f"P{n}"),
    )


async def _setup(
    patterns: tuple[str, ...] = ("message.received.#",), pending_wait: float = 0.0
) -> tuple[InMemoryBus, MemoryIdempotencyStore, EventPublisher, str]:
    bus = InMemoryBus()
    await bus.connect()
    await bus.declare(base_topology())
    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, list(patterns))
    store = MemoryIdempotencyStore()
    publisher = EventPublisher(
        bus, store, connector="sms.fake", publish_timeout=1, pending_wait=pending_wait
    )
    return bus, store, publisher, queue


async def _ids(bus: InMemoryBus, queue: str) -> list[str]:
    ids = []
    while bus.queue_depth(queue):
        ids.append(decode_event(await bus.get(queue)).id)
    return ids


async def test_batch_is_published_whole_and_duplicates_inside_it_once() -> None:
    bus, _, publisher, queue = await _setup()
    outcome = await publisher.publish_inbound(
        [_event(1), _event(2), _event(1), _event(3)], dedup_ttl=60
    )
    assert (outcome.published, outcome.duplicates) == (3, 0)
    assert sorted(await _ids(bus, queue)) == ["ev-1", "ev-2", "ev-3"]
    again = await publisher.publish_inbound([_event(1), _event(2), _event(3)], dedup_ttl=60)
    assert (again.published, again.duplicates) == (0, 3)
    assert await _ids(bus, queue) == []


async def test_partial_failure_raises_and_the_retry_emits_only_what_is_missing() -> None:
    bus, _, publisher, queue = await _setup()
    batch = [_event(1), _event(2, type="message.status"), _event(3)]
    with pytest.raises(UnroutableError):  # nobody is bound to message.status yet
        await publisher.publish_inbound(batch, dedup_ttl=60)
    assert sorted(await _ids(bus, queue)) == ["ev-1", "ev-3"]
    status_queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["message.status.#"])
    outcome = await publisher.publish_inbound(batch, dedup_ttl=60)  # the provider's retry
    assert (outcome.published, outcome.duplicates) == (1, 2)
    assert await _ids(bus, queue) == []
    assert await _ids(bus, status_queue) == ["ev-2"]


async def test_broker_down_releases_the_claim() -> None:
    bus, _, publisher, queue = await _setup()
    bus.available = False
    with pytest.raises(BrokerUnavailableError):
        await publisher.publish_inbound([_event(1)], dedup_ttl=60)
    bus.available = True
    assert (await publisher.publish_inbound([_event(1)], dedup_ttl=60)).published == 1
    assert await _ids(bus, queue) == ["ev-1"]


async def test_concurrent_copy_waits_for_the_first_then_is_a_duplicate() -> None:
    bus, store, publisher, queue = await _setup(pending_wait=1.0)
    await store.claim("ev-1", ttl=30)  # another request is publishing ev-1 right now

    async def other_request_finishes() -> None:
        await asyncio.sleep(0.1)
        await store.complete("ev-1", "1", ttl=60)

    finisher = asyncio.create_task(other_request_finishes())
    outcome = await publisher.publish_inbound([_event(1)], dedup_ttl=60)
    await finisher
    assert (outcome.published, outcome.duplicates) == (0, 1)
    assert await _ids(bus, queue) == []


async def test_concurrent_copy_that_does_not_finish_is_told_to_retry() -> None:
    _, store, publisher, _ = await _setup(pending_wait=0.1)
    await store.claim("ev-1", ttl=30)
    with pytest.raises(ConcurrentDeliveryError):
        await publisher.publish_inbound([_event(1)], dedup_ttl=60)
    with pytest.raises(ConcurrentDeliveryError):
        await publisher.publish_inbound([_event(1), _event(2)], dedup_ttl=60)


async def test_dedup_store_down_is_transient_and_publishes_nothing() -> None:
    bus = InMemoryBus()
    await bus.connect()
    await bus.declare(base_topology())
    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["#"])
    store = RedisIdempotencyStore(f"redis://127.0.0.1:{free_port()}/0")
    publisher = EventPublisher(bus, store, connector="sms.fake", publish_timeout=1, pending_wait=0)
    try:
        with pytest.raises(TransientError) as info:
            await publisher.publish_inbound([_event(1)], dedup_ttl=60)
        assert info.value.code == "dedup_unavailable"
        assert bus.queue_depth(queue) == 0
    finally:
        await store.close()
