"""AmqpBus on the real RabbitMQ: topology, confirms, returns, acks, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import pytest

from gateway.contract.errors import BadRequestError, ConfigError, PermanentError
from gateway.runtime.amqp_bus import AmqpBus
from gateway.runtime.bus import (
    BrokerUnavailableError,
    Delivery,
    OutgoingMessage,
    PublishError,
    UnroutableError,
)
from gateway.runtime.topology import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    Topology,
    base_topology,
    command_queue,
    subscription_queue,
)
from gateway.testing.rabbitmq_node import free_port
from tests.integration.conftest import Vhost

pytestmark = pytest.mark.rabbitmq

QUEUE = "connector.sms.fake.send"


def _topology(limit: int = 5) -> Topology:
    return base_topology().merge(
        Topology(
            queues=(
                command_queue("sms", "fake", limit),
                subscription_queue("crm.inbound", ["message.received.#"], limit),
            )
        )
    )


def _msg(n: int = 1, **headers: str) -> OutgoingMessage:
    return OutgoingMessage(
        body=b"body-%d" % n, message_id=f"m{n}", type="test.Type", headers=dict(headers)
    )


@pytest.fixture
async def bus(vhost: Vhost) -> AsyncIterator[AmqpBus]:
    bus = AmqpBus(vhost.url, connect_timeout=5)
    await bus.connect()
    try:
        yield bus
    finally:
        await bus.close()


async def test_declares_topology_idempotently_with_the_declared_arguments(
    bus: AmqpBus, vhost: Vhost, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    await bus.declare(_topology())
    await bus.declare(_topology())  # a second service start declares the same: no error
    queues = vhost.queue_arguments()
    assert queues[QUEUE] == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": "channels.dead",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert queues["crm.inbound"] == queues[QUEUE]
    assert queues[DEAD_LETTER_QUEUE] == {"x-queue-type": "quorum"}
    channel = await vhost_connection.channel()
    for name in (EVENTS_EXCHANGE, COMMANDS_EXCHANGE, "channels.dead"):
        await channel.declare_exchange(name, passive=True)  # exists
    for name in (QUEUE, DEAD_LETTER_QUEUE, "crm.inbound"):
        await channel.declare_queue(name, passive=True)
    # Declaring the queue with other arguments is refused: proof they are what we declared.
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
        await channel.declare_queue(
            QUEUE, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 9}
        )


async def test_confirmed_publish_arrives_persistent_with_its_properties(
    bus: AmqpBus, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    await bus.declare(_topology())
    await bus.publish(
        EVENTS_EXCHANGE, "message.received.sms.twilio", _msg(1, cloudEvents_id="m1"), timeout=5
    )
    channel = await vhost_connection.channel()
    queue = await channel.declare_queue("crm.inbound", passive=True)
    got = await queue.get(timeout=5)
    assert got.body == b"body-1"
    assert got.message_id == "m1"
    assert got.type == "test.Type"
    assert got.content_type == "application/protobuf"
    assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert got.headers["cloudEvents_id"] == "m1"
    await got.ack()


async def test_unroutable_publish_is_an_error_and_the_bus_stays_usable(bus: AmqpBus) -> None:
    await bus.declare(_topology())
    with pytest.raises(UnroutableError, match=r"message\.status\.sms\.nobody"):
        await bus.publish(EVENTS_EXCHANGE, "message.status.sms.nobody", _msg(), timeout=5)
    assert bus.is_ready()
    await bus.publish(EVENTS_EXCHANGE, "message.received.sms.x", _msg(2), timeout=5)


async def test_a_body_larger_than_a_frame_arrives_whole(
    bus: AmqpBus, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    await bus.declare(_topology())
    body = bytes(range(256)) * 1200  # 300 KiB: several body frames at frame_max 128 KiB
    await bus.publish(
        EVENTS_EXCHANGE,
        "message.received.sms.big",
        OutgoingMessage(body=body, message_id="big", type="test.Type"),
        timeout=5,
    )
    channel = await vhost_connection.channel()
    queue = await channel.declare_queue("crm.inbound", passive=True)
    got = await queue.get(timeout=5)
    assert got.body == body
    await got.ack()


async def test_a_message_amqp_cannot_carry_fails_at_once_and_nothing_is_sent(
    bus: AmqpBus, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    await bus.declare(_topology())
    too_long = OutgoingMessage(
        body=b"b", message_id="m-long", type="test.Type", correlation_id="c" * 300
    )
    # Refused before anything is queued: a ValueError, not a PublishTimeoutError
    # after waiting for a confirm that could never come.
    with pytest.raises(ValueError, match="correlation id too long for AMQP"):
        await bus.publish(EVENTS_EXCHANGE, "message.received.sms.x", too_long, timeout=5)
    await bus.publish(EVENTS_EXCHANGE, "message.received.sms.x", _msg(7), timeout=5)
    channel = await vhost_connection.channel()
    queue = await channel.declare_queue("crm.inbound", passive=True)
    got = await queue.get(timeout=5)
    assert got.message_id == "m7"  # the refused one never reached the broker
    await got.ack()
    assert await queue.get(fail=False) is None


async def test_concurrent_publishes_are_all_confirmed(
    bus: AmqpBus, vhost: Vhost, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    await bus.declare(_topology())
    # Including two with one message id: they are serialized, never confused.
    messages = [_msg(n) for n in range(20)] + [_msg(3)]
    await asyncio.gather(
        *(bus.publish(EVENTS_EXCHANGE, "message.received.a.b", m, timeout=5) for m in messages)
    )
    channel = await vhost_connection.channel()
    queue = await channel.declare_queue("crm.inbound", passive=True)
    assert queue.declaration_result.message_count == 21


async def _consume_until(
    bus: AmqpBus, queue: str, handler_error: Exception | None, *, expect: int
) -> list[Delivery]:
    seen: list[Delivery] = []
    enough = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery)
        if len(seen) >= expect:
            enough.set()
        if handler_error is not None:
            raise handler_error

    sub = await bus.consume(queue, handler, prefetch=1)
    try:
        await asyncio.wait_for(enough.wait(), 10)
        await asyncio.sleep(0.3)  # a further delivery would arrive now
    finally:
        await sub.cancel()
    return seen


async def _dead_letter(
    connection: aio_pika.abc.AbstractConnection,
) -> aio_pika.abc.AbstractIncomingMessage:
    channel = await connection.channel()
    queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
    for _ in range(50):
        message = await queue.get(fail=False)
        if message is not None:
            await message.ack()
            return message
        await asyncio.sleep(0.1)
    raise AssertionError("nothing reached the dead-letter queue")


async def test_acked_message_is_gone(
    bus: AmqpBus, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    await bus.declare(_topology())
    await bus.publish(COMMANDS_EXCHANGE, "send.sms.fake", _msg(), timeout=5)
    seen = await _consume_until(bus, QUEUE, None, expect=1)
    assert [d.body for d in seen] == [b"body-1"]
    assert seen[0].routing_key == "send.sms.fake"
    assert seen[0].exchange == COMMANDS_EXCHANGE
    channel = await vhost_connection.channel()
    assert (await channel.declare_queue(QUEUE, passive=True)).declaration_result.message_count == 0


@pytest.mark.parametrize("error", [PermanentError("no"), BadRequestError("garbage")])
async def test_permanently_failed_command_lands_in_the_dead_letter_queue(
    bus: AmqpBus, vhost_connection: aio_pika.abc.AbstractConnection, error: Exception
) -> None:
    await bus.declare(_topology())
    await bus.publish(COMMANDS_EXCHANGE, "send.sms.fake", _msg(7), timeout=5)
    seen = await _consume_until(bus, QUEUE, error, expect=1)
    assert len(seen) == 1  # rejected, not requeued
    dead = await _dead_letter(vhost_connection)
    assert dead.body == b"body-7"
    assert dead.message_id == "m7"
    assert dead.headers["x-first-death-reason"] == "rejected"
    assert dead.headers["x-first-death-queue"] == QUEUE


async def test_delivery_limit_dead_letters_a_poison_command(
    bus: AmqpBus, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    await bus.declare(_topology(limit=2))
    await bus.publish(COMMANDS_EXCHANGE, "send.sms.fake", _msg(9), timeout=5)
    seen = await _consume_until(bus, QUEUE, RuntimeError("poison"), expect=3)
    dead = await _dead_letter(vhost_connection)
    assert dead.body == b"body-9"
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    assert [d.redelivered for d in seen] == [False, True, True]
    assert [d.delivery_count for d in seen] == [0, 1, 2]
    assert len(seen) == 3  # the first delivery plus `limit` redeliveries


async def test_connect_to_a_dead_port_fails_fast_and_clearly() -> None:
    bus = AmqpBus(f"amqp://guest:guest@127.0.0.1:{free_port()}/", connect_timeout=2)
    async with asyncio.timeout(5):
        with pytest.raises(BrokerUnavailableError, match="cannot connect to RabbitMQ"):
            await bus.connect()
    assert not bus.is_ready()


async def test_nacked_publish_is_an_error(
    bus: AmqpBus, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    """A full queue with reject-publish overflow makes the broker nack: no false success."""
    await bus.declare(base_topology())
    channel = await vhost_connection.channel()
    full = await channel.declare_queue(
        "full", durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    await full.bind(EVENTS_EXCHANGE, routing_key="message.received.#")
    await bus.publish(EVENTS_EXCHANGE, "message.received.a.b", _msg(1), timeout=5)
    with pytest.raises(PublishError) as info:
        await bus.publish(EVENTS_EXCHANGE, "message.received.a.b", _msg(2), timeout=5)
    assert not isinstance(info.value, UnroutableError)
    assert "nacked" in str(info.value)
    assert bus.is_ready()


async def test_conflicting_existing_queue_is_a_clear_config_error(bus: AmqpBus) -> None:
    """Changing broker.delivery_limit after a queue exists: RabbitMQ refuses the
    declaration; start-up must say which queue and why, not crash obscurely."""
    await bus.declare(_topology(limit=5))
    with pytest.raises(ConfigError) as info:
        await bus.declare(_topology(limit=7))
    message = str(info.value)
    assert QUEUE in message
    assert "x-delivery-limit" in message
    assert bus.is_ready()  # the publish channel is untouched


async def test_wrong_credentials_fail_fast_and_say_so(rabbitmq_url: str) -> None:
    parts = urlsplit(rabbitmq_url)
    wrong = urlunsplit(
        parts._replace(netloc=f"guest:not-the-password@{parts.hostname}:{parts.port}")
    )
    bus = AmqpBus(wrong, connect_timeout=3)
    async with asyncio.timeout(8):
        with pytest.raises(BrokerUnavailableError) as info:
            await bus.connect()
    assert "ACCESS_REFUSED" in str(info.value) or "authentication" in str(info.value).lower()
    assert not bus.is_ready()
