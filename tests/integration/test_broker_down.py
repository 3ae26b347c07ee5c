"""Broker outages on a PRIVATE RabbitMQ node (never the shared broker).

The node is started once for this module on its own ports and data directory
(gateway.testing.rabbitmq_node), its RabbitMQ application is stopped and
started to cut every connection, and it is torn down at the end whatever
happens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import aio_pika
import aiohttp
import pytest

from gateway.runtime.config import SubscriptionSettings
from gateway.runtime.service import Service
from gateway.testing.rabbitmq_node import RabbitMQNode
from tests.runtime import service_helpers as h

pytestmark = pytest.mark.rabbitmq

SUBSCRIPTION = "crm.inbound"


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitMQNode]:
    with RabbitMQNode.start(timeout=60) as private:
        yield private


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # The client gives up after 3 s: a webhook that hangs fails the test.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        yield session


@pytest.fixture
async def svc(node: RabbitMQNode) -> AsyncIterator[Service]:
    runtime = h.settings(
        # Reconnect quickly, so recovery is visible within the test.
        node.url + "?reconnect_interval=0.5",
        # The default publish timeout: the fast 503 must not come from a short one.
        publish_timeout=5.0,
        connect_timeout=2.0,
    ).model_copy(
        update={
            "subscriptions": [
                SubscriptionSettings(queue=SUBSCRIPTION, bindings=["message.received.#"])
            ]
        }
    )
    service = h.service(runtime)
    await service.start()
    try:
        yield service
    finally:
        async with asyncio.timeout(15):
            await service.stop()


async def _ready(http: aiohttp.ClientSession, svc: Service) -> tuple[int, dict[str, object]]:
    async with http.get(f"http://127.0.0.1:{svc.port}/readyz") as resp:
        return resp.status, await resp.json()


async def _drain_subscription(node: RabbitMQNode) -> list[str]:
    """Provider message ids of the events waiting in the subscription queue."""
    connection = await aio_pika.connect(node.url, timeout=5)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(SUBSCRIPTION, passive=True)
        sids = []
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            event = h.consumed_event(message)
            sids.append(event.message.provider_message_id)
        return sids
    finally:
        await connection.close()


async def test_private_node_is_controlled_with_its_own_cookie(node: RabbitMQNode) -> None:
    out = await asyncio.to_thread(node.ctl, "status")
    assert node.nodename in out
    assert str(node.port) in out  # its own listener, not the shared broker's 5672
    assert node.port != 5672


async def test_broker_down_answers_503_fast_and_recovers(
    node: RabbitMQNode, svc: Service, http: aiohttp.ClientSession
) -> None:
    before = h.inbound_form()
    assert (await h.post_signed(http, h.inbound_url(svc), before, timeout=3))[0] == 200
    assert await _ready(http, svc) == (200, {"status": "ready", "checks": {"broker": True}})

    await asyncio.to_thread(node.stop_app)
    during = h.inbound_form()
    try:
        started = time.monotonic()
        status, _ = await h.post_signed(http, h.inbound_url(svc), during, timeout=3)
        elapsed = time.monotonic() - started
        print(f"webhook answered {status} {elapsed * 1000:.0f} ms after the broker stopped")
        assert status == 503, "a provider must never get 2xx for an unconfirmed event"
        assert elapsed < 2.5, f"webhook took {elapsed:.1f}s to fail"  # a bound, not a benchmark
        ready_status, body = await _ready(http, svc)
        assert ready_status == 503
        assert body["checks"] == {"broker": False}
    finally:
        await asyncio.to_thread(node.start_app)

    # The robust connection comes back by itself; then the provider's retry is accepted.
    deadline = time.monotonic() + 20
    while (await _ready(http, svc))[0] != 200:
        assert time.monotonic() < deadline, "service did not reconnect within 20 s"
        await asyncio.sleep(0.2)
    assert (await h.post_signed(http, h.inbound_url(svc), during, timeout=3))[0] == 200
    after = h.inbound_form()
    assert (await h.post_signed(http, h.inbound_url(svc), after, timeout=3))[0] == 200
    assert await _drain_subscription(node) == [
        before["MessageSid"],
        during["MessageSid"],
        after["MessageSid"],
    ]


async def test_service_stops_promptly_while_the_broker_is_down(node: RabbitMQNode) -> None:
    service = h.service(h.settings(node.url + "?reconnect_interval=0.5"))
    await service.start()
    await asyncio.to_thread(node.stop_app)
    try:
        # Graceful shutdown must not wait for a broker that is not coming back.
        async with asyncio.timeout(10):
            await service.stop()
    finally:
        await asyncio.to_thread(node.start_app)


async def test_hung_broker_answers_503_within_the_publish_timeout(
    node: RabbitMQNode, http: aiohttp.ClientSession
) -> None:
    runtime = h.settings(node.url + "?reconnect_interval=0.5", publish_timeout=1.0).model_copy(
        update={
            "subscriptions": [
                SubscriptionSettings(queue=SUBSCRIPTION, bindings=["message.received.#"])
            ]
        }
    )
    service = h.service(runtime)
    await service.start()
    form = h.inbound_form()
    try:
        await _drain_subscription(node)
        node.pause()
        try:
            # The connection looks fine but no confirm comes: the publish timeout
            # bounds the wait (the client gives up after 3 s, failing the test).
            status, _ = await h.post_signed(http, h.inbound_url(service), form, timeout=3)
            assert status == 503
        finally:
            node.resume()
        assert (await h.post_signed(http, h.inbound_url(service), form, timeout=5))[0] == 200
    finally:
        async with asyncio.timeout(15):
            await service.stop()
    # The frozen broker may still have routed the first copy once it woke up:
    # at least once, and every copy carries the same provider message.
    sids = await _drain_subscription(node)
    assert sids
    assert set(sids) == {form["MessageSid"]}
