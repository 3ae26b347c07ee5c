"""Call commands through the real RabbitMQ: a CallCommand published on
channels.commands reaches the voice connector through its declared quorum
queue, and its call.command outcome event comes back on channels.events."""

from __future__ import annotations

import aio_pika
import pytest

from gateway.api.v1.call_pb2 import CallCommandOutcome
from gateway.runtime.codec import encode_call_command
from gateway.runtime.config import BrokerSettings
from gateway.runtime.service import Service
from gateway.runtime.topology import COMMANDS_EXCHANGE, DEAD_LETTER_QUEUE, EVENTS_EXCHANGE
from tests.integration.conftest import Vhost
from tests.runtime import call_helpers as c
from tests.runtime import service_helpers as h

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def voice_service(vhost: Vhost, monkeypatch: pytest.MonkeyPatch) -> tuple[Service, c.FakeVoice]:
    """A service hosting the CallControl double on the test's vhost (not started)."""
    connector = c.FakeVoice([c.accepted("CA-rmq", "queued")])
    c.install(monkeypatch, [c.spec(connector)])
    return Service(c.runtime(vhost.url), [c.NAME]), connector


async def test_call_command_round_trip_through_the_quorum_queue(
    vhost: Vhost,
    vhost_connection: aio_pika.abc.AbstractConnection,
    voice_service: tuple[Service, c.FakeVoice],
) -> None:
    svc, connector = voice_service
    await svc.start()
    try:
        arguments = vhost.queue_arguments()["connector.voice.fake.call"]
        assert arguments["x-queue-type"] == "quorum"
        assert arguments["x-delivery-limit"] == BrokerSettings().delivery_limit
        assert arguments["x-dead-letter-exchange"] == "channels.dead"

        channel = await vhost_connection.channel()
        outcomes = await channel.declare_queue(exclusive=True)
        await outcomes.bind(EVENTS_EXCHANGE, routing_key="call.command.voice.fake")
        # A downstream service's publish: plain aio-pika, confirmed and mandatory.
        routing_key, out = encode_call_command(c.place("cmd-rmq"))
        assert routing_key == "call.voice.fake"
        commands = await channel.get_exchange(COMMANDS_EXCHANGE)
        await commands.publish(
            aio_pika.Message(
                out.body,
                message_id=out.message_id,
                type=out.type,
                content_type=out.content_type,
                headers=dict(out.headers),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key,
            mandatory=True,
        )
        async with outcomes.iterator(timeout=10) as stream:
            message = await anext(stream)
            await message.ack()
    finally:
        await svc.stop()
    assert message.routing_key == "call.command.voice.fake"
    event = h.consumed_event(message)
    assert message.message_id == event.id
    assert event.causation_id == "cmd-rmq"
    assert event.call_command.outcome == CallCommandOutcome.CALL_COMMAND_OUTCOME_ACCEPTED
    assert event.call_command.call_id == "CA-rmq"
    assert event.call_command.action == "place"
    assert [command.command_id for _, command in connector.calls] == ["cmd-rmq"]


async def test_malformed_call_command_is_dead_lettered(
    vhost: Vhost,
    vhost_connection: aio_pika.abc.AbstractConnection,
    voice_service: tuple[Service, c.FakeVoice],
) -> None:
    svc, connector = voice_service
    await svc.start()
    try:
        channel = await vhost_connection.channel()
        commands = await channel.get_exchange(COMMANDS_EXCHANGE)
        await commands.publish(
            aio_pika.Message(
                b"\xff\xfe not protobuf",
                message_id="bad-call",
                type="gateway.api.v1.CallCommand",
                content_type="application/protobuf",
            ),
            routing_key="call.voice.fake",
            mandatory=True,
        )
        dead_letters = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        async with dead_letters.iterator(timeout=10) as stream:
            dead = await anext(stream)
            await dead.ack()
    finally:
        await svc.stop()
    assert dead.message_id == "bad-call"
    assert dead.headers["x-first-death-reason"] == "rejected"
    assert dead.headers["x-first-death-queue"] == "connector.voice.fake.call"
    assert connector.calls == []
