"""A Twilio-hosting Service on the real RabbitMQ, driven over real HTTP."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Text
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.runtime import outbound
from gateway.runtime.codec import encode_command
from gateway.runtime.idempotency import RedisIdempotencyStore
from gateway.runtime.service import Service
from gateway.runtime.topology import COMMANDS_EXCHANGE, DEAD_LETTER_QUEUE, EVENTS_EXCHANGE
from gateway.testing.fake_twilio import FakeTwilio
from gateway.testing.rabbitmq_node import free_port
from tests.integration.conftest import Vhost
from tests.runtime import service_helpers as h

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisIdempotencyStore]:
    prefix = f"cgtest:{uuid.uuid4().hex[:8]}:"
    store = RedisIdempotencyStore(redis_url, prefix=prefix)
    try:
        yield store
    finally:
        await store.close()
        client = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def _bind(
    connection: aio_pika.abc.AbstractConnection, pattern: str
) -> aio_pika.abc.AbstractQueue:
    """A consumer's queue bound to ``pattern`` on channels.events (gone with the connection)."""
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(EVENTS_EXCHANGE, routing_key=pattern)
    return queue


async def _poll(
    queue: aio_pika.abc.AbstractQueue, timeout: float = 5.0
) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message of ``queue``, waiting up to ``timeout`` seconds (then acked)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (message := await queue.get(fail=False)) is None:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no message in {queue.name} within {timeout}s")
        await asyncio.sleep(0.05)
    await message.ack()
    return message


async def _events(queue: aio_pika.abc.AbstractQueue, *, settle: float = 0.3) -> list[Event]:
    """Every event in ``queue`` now (after ``settle`` seconds), decoded as a consumer would."""
    await asyncio.sleep(settle)
    events = []
    while (message := await queue.get(fail=False)) is not None:
        await message.ack()
        events.append(h.consumed_event(message))
    return events


async def test_twilio_webhook_reaches_a_consumer_of_message_received(
    vhost: Vhost,
    vhost_connection: aio_pika.abc.AbstractConnection,
    http: aiohttp.ClientSession,
) -> None:
    svc = h.service(h.settings(vhost.url))
    await svc.start()
    try:
        queue = await _bind(vhost_connection, "message.received.#")
        form = h.inbound_form(body="über 🚀")
        status, body = await h.post_signed(http, h.inbound_url(svc), form)
        assert status == 200
        assert "<Response></Response>" in body
        message = await _poll(queue)
        assert message.routing_key == "message.received.sms.twilio"
        assert message.type == "gateway.api.v1.Event"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        headers = message.headers
        assert headers["cloudEvents_specversion"] == "1.0"
        assert headers["cloudEvents_type"] == "io.channelgateway.message.received"
        assert str(headers["traceparent"]).startswith("00-")
        event = h.consumed_event(message)
        assert message.message_id == event.id == headers["cloudEvents_id"]
        assert event.message.provider_message_id == form["MessageSid"]
        assert event.message.text.body == "über 🚀"
        assert event.message.sender.address == h.CUSTOMER
        assert event.account == "main"
    finally:
        await svc.stop()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def dedup_store(request: pytest.FixtureRequest) -> RedisIdempotencyStore | None:
    """The dedup backend: the service's default (memory) or the real Redis."""
    if request.param == "memory":
        return None
    store: RedisIdempotencyStore = request.getfixturevalue("redis_store")
    return store


async def test_duplicates_of_one_provider_message_yield_one_event(
    vhost: Vhost,
    vhost_connection: aio_pika.abc.AbstractConnection,
    http: aiohttp.ClientSession,
    dedup_store: RedisIdempotencyStore | None,
) -> None:
    svc = h.service(h.settings(vhost.url), store=dedup_store)
    await svc.start()
    try:
        queue = await _bind(vhost_connection, "message.received.#")
        form = h.inbound_form()
        # Twilio's retry arrives while the first is in flight, and again later.
        concurrent = await asyncio.gather(
            *(h.post_signed(http, h.inbound_url(svc), form) for _ in range(5))
        )
        later = await h.post_signed(http, h.inbound_url(svc), form)
        events = await _events(queue)
    finally:
        await svc.stop()
    # A concurrent copy may be told to retry (503) but none is lost and none is doubled.
    assert {status for status, _ in concurrent} <= {200, 503}
    assert 200 in {status for status, _ in concurrent}
    assert later[0] == 200
    assert len(events) == 1
    assert events[0].message.provider_message_id == form["MessageSid"]


async def test_unroutable_event_answers_503_not_2xx(
    vhost: Vhost, http: aiohttp.ClientSession
) -> None:
    # A fresh vhost: nothing is bound to message.received.* so the broker returns it.
    svc = h.service(h.settings(vhost.url))
    await svc.start()
    try:
        form = h.inbound_form()
        status, _ = await h.post_signed(http, h.inbound_url(svc), form)
        assert status == 503
        # Once a consumer binds, the provider's retry is accepted: nothing was lost.
        connection = await aio_pika.connect(vhost.url)
        try:
            queue = await _bind(connection, "message.received.#")
            assert (await h.post_signed(http, h.inbound_url(svc), form))[0] == 200
            (event,) = await _events(queue)
            assert event.message.provider_message_id == form["MessageSid"]
        finally:
            await connection.close()
    finally:
        await svc.stop()


def _command(to: str = "+14155550123") -> SendMessageCommand:
    return SendMessageCommand(
        message_id=str(uuid.uuid4()),
        channel="sms",
        provider="twilio",
        account="main",
        message=Message(
            recipients=[Participant(channel="sms", address=to)], text=Text(body="hello")
        ),
    )


async def _publish_command(svc: Service, command: SendMessageCommand) -> None:
    routing_key, message = encode_command(command)
    await svc.bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=5)


async def test_garbage_command_lands_in_the_dead_letter_queue(
    vhost: Vhost, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    svc = h.service(h.settings(vhost.url))
    await svc.start()
    try:
        channel = await vhost_connection.channel()
        commands = await channel.get_exchange(COMMANDS_EXCHANGE)
        await commands.publish(
            aio_pika.Message(
                b"\xff\xfe not protobuf",
                message_id="bad-1",
                type="gateway.api.v1.SendMessageCommand",
                content_type="application/protobuf",
            ),
            routing_key="send.sms.twilio",
        )
        dead_queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        dead = await _poll(dead_queue)
        assert dead.message_id == "bad-1"
        assert dead.headers["x-first-death-reason"] == "rejected"
        assert dead.headers["x-first-death-queue"] == "connector.sms.twilio.send"
    finally:
        await svc.stop()


@pytest.mark.redis
async def test_command_redelivered_after_a_crash_mid_send_is_not_sent_twice(
    vhost: Vhost,
    vhost_connection: aio_pika.abc.AbstractConnection,
    redis_url: str,
    redis_store: RedisIdempotencyStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker A dies after the provider accepted the send but before the ack;
    worker B gets the redelivery and must not call the provider again."""
    # A frozen process renews nothing: its send lease runs out (shortened here).
    monkeypatch.setattr(outbound, "SEND_LEASE_SECONDS", 0.5)
    frozen = asyncio.Event()
    release = asyncio.Event()

    class FrozenAfterSend:
        """Worker A's view of the shared store: nothing gets through once it froze."""

        def __getattr__(self, name: str) -> object:
            method = getattr(redis_store, name)
            if name == "close":  # the test's own clean-up, not the frozen worker
                return method

            async def call(*args: object, **kwargs: object) -> object:
                if frozen.is_set():
                    await release.wait()
                    raise ConnectionResetError("simulated crash")
                return await method(*args, **kwargs)

            return call

    async with FakeTwilio(auth_token=h.TOKEN, callback_statuses=()) as fake:
        runtime = h.settings(vhost.url, api_base_url=fake.url)
        worker_a = h.service(runtime, store=FrozenAfterSend())  # type: ignore[arg-type]
        await worker_a.start()
        sent = asyncio.Event()
        connector = worker_a.hosted[0].connector
        real_send = connector.send

        async def send_then_die(command: SendMessageCommand) -> object:
            await real_send(command)  # the provider accepted it ...
            sent.set()
            frozen.set()
            await release.wait()  # ... and the process froze before recording or acking
            raise ConnectionResetError("simulated crash")

        connector.send = send_then_die  # type: ignore[method-assign]
        statuses = await _bind(vhost_connection, "message.status.#")
        command = _command()
        await _publish_command(worker_a, command)
        await asyncio.wait_for(sent.wait(), 10)
        assert len(fake.calls) == 1
        # The crash: A's connections drop with the command unacked; the broker requeues it.
        await worker_a.bus.close()

        ledger_b = RedisIdempotencyStore(redis_url, prefix=redis_store._prefix)
        worker_b = h.service(runtime, store=ledger_b)
        await worker_b.start()
        try:
            events = []
            for _ in range(50):
                events = await _events(statuses, settle=0.1)
                if events:
                    break
        finally:
            release.set()
            await worker_b.stop()
            await worker_a.stop()
    assert len(fake.calls) == 1  # no second provider call
    (event,) = events
    assert event.status.message_id == command.message_id
    assert event.status.state == DeliveryState.DELIVERY_STATE_FAILED
    assert event.status.reason_code == "ambiguous_send"
    assert not event.status.permanent


async def test_command_is_sent_once_and_its_status_published(
    vhost: Vhost, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    async with FakeTwilio(auth_token=h.TOKEN, callback_statuses=()) as fake:
        svc = h.service(h.settings(vhost.url, api_base_url=fake.url))
        await svc.start()
        try:
            statuses = await _bind(vhost_connection, "message.status.#")
            command = _command()
            await _publish_command(svc, command)
            message = await _poll(statuses)
        finally:
            await svc.stop()
    assert len(fake.calls) == 1
    assert fake.calls[0].form["To"] == "+14155550123"
    assert fake.calls[0].form["Body"] == "hello"
    event = Event()
    event.ParseFromString(message.body)
    assert event.status.state == DeliveryState.DELIVERY_STATE_QUEUED
    assert event.status.provider_message_id.startswith("SM")


async def test_poison_command_is_dead_lettered_by_the_delivery_limit(
    vhost: Vhost, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    """The send ledger is unreachable: every delivery fails transiently and is
    requeued, until the quorum queue's delivery limit dead-letters the command."""
    ledger_down = RedisIdempotencyStore(f"redis://127.0.0.1:{free_port()}/0")
    svc = h.service(h.settings(vhost.url, delivery_limit=1), store=ledger_down)
    await svc.start()
    try:
        command = _command()
        await _publish_command(svc, command)
        channel = await vhost_connection.channel()
        dead_queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        dead = await _poll(dead_queue, timeout=10)
    finally:
        await svc.stop()
    assert dead.message_id == f"{command.message_id}:1"
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    assert dead.headers["x-first-death-queue"] == "connector.sms.twilio.send"


async def test_graceful_stop_finishes_the_send_in_flight_and_requeues_the_rest(
    vhost: Vhost, vhost_connection: aio_pika.abc.AbstractConnection
) -> None:
    async with FakeTwilio(auth_token=h.TOKEN, callback_statuses=()) as fake:
        runtime = h.settings(vhost.url, api_base_url=fake.url)
        runtime = runtime.model_copy(
            update={"broker": runtime.broker.model_copy(update={"prefetch": 1})}
        )
        svc = h.service(runtime)
        await svc.start()
        statuses = await _bind(vhost_connection, "message.status.#")
        fake.hang_next(1.0)  # the first send takes a while (within the provider timeout)
        commands = [_command() for _ in range(3)]
        for command in commands:
            await _publish_command(svc, command)
        for _ in range(100):
            if fake.calls:
                break
            await asyncio.sleep(0.05)
        assert len(fake.calls) == 1
        async with asyncio.timeout(15):
            await svc.stop()  # SIGTERM: the send in flight completes, nothing else starts
        assert len(fake.calls) == 1
    (event,) = await _events(statuses)
    assert event.status.message_id == commands[0].message_id
    assert event.status.state == DeliveryState.DELIVERY_STATE_QUEUED
    channel = await vhost_connection.channel()
    queue = await channel.declare_queue("connector.sms.twilio.send", passive=True)
    assert queue.declaration_result.message_count == 2  # requeued, not lost
