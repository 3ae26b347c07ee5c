"""StatusIngestor on the real RabbitMQ (a throw-away vhost): statuses applied and acked
after commit, duplicates idempotent, malformed events dead-lettered, failures requeued."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import aio_pika
import pytest
from sqlalchemy.exc import OperationalError

from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event
from gateway.ledger import Applied, Ledger, NewMessage, StatusIngestor, StatusUpdate
from gateway.runtime.amqp_bus import AmqpBus
from gateway.runtime.bus import OutgoingMessage
from gateway.runtime.codec import EVENT_TYPE_NAME, encode_event, event_routing_key
from gateway.runtime.topology import DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, base_topology
from tests.integration.conftest import Vhost, vhost, vhost_connection  # noqa: F401

pytestmark = pytest.mark.rabbitmq
S = DeliveryState


@pytest.fixture
async def bus(vhost: Vhost) -> AsyncIterator[AmqpBus]:  # noqa: F811
    amqp = AmqpBus(vhost.url, connect_timeout=5)
    await amqp.connect()
    await amqp.declare(base_topology())
    try:
        yield amqp
    finally:
        await amqp.close()


def status_event(event_id: str, message_id: str, state: int) -> Event:
    return Event(
        id=event_id,
        type="message.status",
        channel="sms",
        provider="twilio",
        causation_id=message_id,
        status=DeliveryStatus(
            state=state,  # type: ignore[arg-type]
            message_id=message_id,
            provider_message_id="SM" + message_id,
            attempt=1,
        ),
    )


async def publish(bus: AmqpBus, event: Event) -> None:
    await bus.publish(EVENTS_EXCHANGE, event_routing_key(event), encode_event(event), timeout=5)


async def wait_for_state(ledger: Ledger, message_id: str, state: int) -> None:
    async with asyncio.timeout(10):
        while (await ledger.get(message_id)).state != state:  # noqa: ASYNC110 - polls the DB
            await asyncio.sleep(0.02)


async def queue_depth(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def test_statuses_are_applied_and_acked_after_commit(
    ledger: Ledger,
    bus: AmqpBus,
    vhost_connection: aio_pika.abc.AbstractConnection,  # noqa: F811
) -> None:
    record, _ = await ledger.accept(
        NewMessage(
            idempotency_key="k1",
            message_id="m1",
            channel="sms",
            provider="twilio",
            address="+15550001111",
        )
    )
    ingestor = StatusIngestor(bus, ledger, prefetch=16)
    await ingestor.start()
    try:
        delivered = status_event("ev-delivered", record.message_id, S.DELIVERY_STATE_DELIVERED)
        sent = status_event("ev-sent", record.message_id, S.DELIVERY_STATE_SENT)
        for event in (delivered, sent, delivered, sent):  # out of order, twice
            await publish(bus, event)
        # Malformed: not a protobuf event, and an event without a status.
        await bus.publish(
            EVENTS_EXCHANGE,
            "message.status.sms.twilio",
            OutgoingMessage(
                body=b"\xff\xff not protobuf", message_id="bad-1", type=EVENT_TYPE_NAME
            ),
            timeout=5,
        )
        await publish(bus, Event(id="bad-2", type="message.status", channel="sms", provider="x"))
        await wait_for_state(ledger, record.message_id, S.DELIVERY_STATE_DELIVERED)
        async with asyncio.timeout(10):
            while await queue_depth(vhost_connection, DEAD_LETTER_QUEUE) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await ingestor.stop()
    assert await queue_depth(vhost_connection, ingestor.queue) == 0
    final = await ledger.get(record.message_id)
    assert [e.event_id for e in final.timeline][1:] == ["ev-delivered"]
    assert final.provider_message_id == "SMm1"


class FlakyLedger(Ledger):
    """A ledger whose first writes fail like a database outage."""

    failures = 2

    async def record_statuses(self, updates: Sequence[StatusUpdate]) -> list[Applied]:
        if self.failures > 0:
            self.failures -= 1
            raise OperationalError("INSERT ...", {}, ConnectionError("database went away"))
        return await super().record_statuses(updates)


async def test_a_database_failure_requeues_the_status(
    ledger: Ledger,
    bus: AmqpBus,
    vhost_connection: aio_pika.abc.AbstractConnection,  # noqa: F811
) -> None:
    await ledger.accept(
        NewMessage(
            idempotency_key="k1",
            message_id="m1",
            channel="sms",
            provider="twilio",
            address="+15550001111",
        )
    )
    flaky = FlakyLedger(ledger.engine)
    ingestor = StatusIngestor(bus, flaky, prefetch=4)
    await ingestor.start()
    try:
        await publish(bus, status_event("ev-sent", "m1", S.DELIVERY_STATE_SENT))
        await wait_for_state(ledger, "m1", S.DELIVERY_STATE_SENT)
    finally:
        await ingestor.stop()
    assert flaky.failures == 0
    assert await queue_depth(vhost_connection, ingestor.queue) == 0
    assert await queue_depth(vhost_connection, DEAD_LETTER_QUEUE) == 0
