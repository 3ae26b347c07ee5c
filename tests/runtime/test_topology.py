"""The RabbitMQ topology as data."""

from __future__ import annotations

import pytest

from gateway.runtime.topology import (
    COMMANDS_EXCHANGE,
    DEAD_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    Binding,
    Queue,
    Topology,
    base_topology,
    command_queue,
    subscription_queue,
    topic_matches,
)


def test_command_queue_arguments() -> None:
    queue = command_queue("sms", "twilio", 7)
    assert queue.name == "connector.sms.twilio.send"
    assert queue.bindings == (Binding(exchange=COMMANDS_EXCHANGE, routing_key="send.sms.twilio"),)
    assert queue.arguments() == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 7,
        "x-dead-letter-exchange": DEAD_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def test_subscription_queue_arguments() -> None:
    queue = subscription_queue("crm.inbound", ["message.received.#", "message.status.sms.*"], 3)
    assert [b.routing_key for b in queue.bindings] == ["message.received.#", "message.status.sms.*"]
    assert all(b.exchange == EVENTS_EXCHANGE for b in queue.bindings)
    assert queue.arguments()["x-delivery-limit"] == 3
    assert queue.arguments()["x-dead-letter-strategy"] == "at-least-once"


def test_dead_letter_queue_is_quorum_without_limit_or_own_dead_lettering() -> None:
    topo = base_topology()
    assert {e.name for e in topo.exchanges} == {EVENTS_EXCHANGE, COMMANDS_EXCHANGE, DEAD_EXCHANGE}
    assert all(e.type == "topic" for e in topo.exchanges)
    (dlq,) = topo.queues
    assert dlq.name == DEAD_LETTER_QUEUE
    assert dlq.bindings == (Binding(exchange=DEAD_EXCHANGE, routing_key="#"),)
    assert dlq.arguments() == {"x-queue-type": "quorum"}


def test_classic_queue_gets_no_quorum_only_arguments() -> None:
    queue = Queue(name="q", quorum=False, delivery_limit=5)
    assert queue.arguments() == {"x-dead-letter-exchange": DEAD_EXCHANGE}


def test_merge_keeps_one_of_each() -> None:
    a = base_topology().merge(Topology(queues=(command_queue("sms", "twilio", 5),)))
    b = a.merge(Topology(queues=(command_queue("sms", "twilio", 5), command_queue("sms", "v", 5))))
    assert [q.name for q in b.queues] == [
        DEAD_LETTER_QUEUE,
        "connector.sms.twilio.send",
        "connector.sms.v.send",
    ]
    assert len(b.exchanges) == 3


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("message.received.#", "message.received.sms.twilio", True),
        ("message.received.#", "message.received", True),
        ("message.received.#", "message.receivedx.sms", False),
        ("message.received.#", "message.status.sms.twilio", False),
        ("message.*.sms.*", "message.status.sms.twilio", True),
        ("message.*.sms.*", "message.status.email.sendgrid", False),
        ("message.*", "message.status.sms", False),
        ("*.*.sms.twilio", "message.received.sms.twilio", True),
        ("#", "anything.at.all", True),
        ("#", "", True),
        ("#.twilio", "message.status.sms.twilio", True),
        ("#.twilio", "twilio", True),
        ("message.#.twilio", "message.twilio", True),
        ("message.#.twilio", "message.a.b.c.twilio", True),
        ("message.#.twilio", "message.a.b.vonage", False),
        ("send.sms.twilio", "send.sms.twilio", True),
        ("send.sms.twilio", "send.sms.twilio.extra", False),
        ("send.sms.*", "send.sms", False),
    ],
)
def test_topic_matches(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches
