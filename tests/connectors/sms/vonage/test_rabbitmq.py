"""Vonage webhooks and sends end to end on the real RabbitMQ.

A signed SMS API inbound SMS and a signed Messages API inbound go in over real
HTTP and are on a durable queue bound to ``message.received.#`` by the time
the 2xx comes back, as persistent protobuf messages with CloudEvents headers;
a provider retry adds nothing. A send command travels through the broker to
the fake Messages API, whose signed status webhooks come back as events.
"""

from __future__ import annotations

import json
import time
import uuid
from urllib.parse import urlencode

import aio_pika
import pytest

from connectors.sms.vonage import webhooks
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Text, TextFormat
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Direction, Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.contract import new_id
from gateway.runtime.codec import encode_command
from gateway.runtime.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from gateway.testing.fake_vonage import signed_webhook_headers
from tests.connectors.sms.vonage.conftest import API_KEY, CUSTOMER, Harness

pytestmark = pytest.mark.rabbitmq


async def test_signed_webhooks_are_on_the_broker_before_2xx(
    rabbit_harness: Harness, amqp_connection: aio_pika.abc.AbstractConnection, unique: str
) -> None:
    h = rabbit_harness
    channel = await amqp_connection.channel()
    queue = await channel.declare_queue(f"test.vonage.{unique}", durable=True)
    await queue.bind(EVENTS_EXCHANGE, routing_key="message.received.sms.vonage")
    try:
        params = {
            "msisdn": "447700900123",
            "to": "447700900000",
            "messageId": uuid.uuid4().hex[:16].upper(),
            "text": "Hi from the legacy SMS API",
            "type": "text",
            "api-key": API_KEY,
            "message-timestamp": "2026-03-01 12:00:00",
            "timestamp": str(int(time.time())),
        }
        params["sig"] = webhooks.compute_signature(
            params, h.secrets["VONAGE_SIGNATURE_SECRET"], "md5hash"
        )
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        body = json.dumps(
            {
                "channel": "sms",
                "message_type": "text",
                "message_uuid": str(uuid.uuid4()),
                "to": "447700900000",
                "from": "447700900123",
                "timestamp": "2026-03-01T12:00:01.000Z",
                "text": "Hi from the Messages API",
            }
        ).encode()
        headers = signed_webhook_headers(
            body, h.secrets["VONAGE_SIGNATURE_SECRET"], api_key=API_KEY
        )
        legacy = (h.url("main", "inbound"), urlencode(params).encode(), form)
        modern = (h.url("main", "messages/inbound"), body, headers)
        received = []
        for url, data, hdrs in (legacy, modern):
            status, _ = await h.post(url, data=data, headers=hdrs)
            assert 200 <= status < 300
            # Confirmed before the answer: the message is already on the queue.
            message = await queue.get(fail=False, no_ack=True)
            assert message is not None
            received.append(message)
        for url, data, hdrs in (legacy, modern):  # Vonage retrying both
            status, _ = await h.post(url, data=data, headers=hdrs)
            assert 200 <= status < 300
        assert await queue.get(fail=False, no_ack=True) is None

        texts = []
        for message in received:
            event = Event()
            event.ParseFromString(message.body)
            texts.append(event.message.text.body)
            assert message.routing_key == "message.received.sms.vonage"
            assert message.message_id == event.id
            assert message.content_type == "application/protobuf"
            assert message.type == "gateway.api.v1.Event"
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert message.headers["cloudEvents_id"] == event.id
            assert event.message.sender.address == "+447700900123"
        assert texts == ["Hi from the legacy SMS API", "Hi from the Messages API"]
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await channel.close()


async def test_send_and_status_webhooks_through_rabbitmq(rabbit_harness: Harness) -> None:
    h = rabbit_harness
    command = SendMessageCommand(
        message_id=new_id(),
        channel="sms",
        provider="vonage",
        account="main",
        message=Message(
            direction=Direction.DIRECTION_OUTBOUND,
            recipients=[Participant(channel="sms", address=CUSTOMER)],
            text=Text(body="Your order ships today.", format=TextFormat.TEXT_FORMAT_PLAIN),
        ),
    )
    routing_key, outgoing = encode_command(command)
    await h.bus.publish(COMMANDS_EXCHANGE, routing_key, outgoing, timeout=5)
    states = set()
    while len(states) < 3:
        event, key = await h.next_event(timeout=10)
        # The shared broker may carry other runs' events; look at ours only.
        if event.type == "message.status" and event.status.message_id == command.message_id:
            assert key == "message.status.sms.vonage"
            states.add(event.status.state)
    assert states == {
        DeliveryState.DELIVERY_STATE_ACCEPTED,
        DeliveryState.DELIVERY_STATE_SENT,
        DeliveryState.DELIVERY_STATE_DELIVERED,
    }
    ours = [c for c in h.fake.calls if c.body.get("client_ref") == command.message_id]
    assert len(ours) == 1
