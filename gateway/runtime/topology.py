"""RabbitMQ topology (architecture.md section 4) as data.

Both bus implementations declare exactly this, and ``deploy/rabbitmq`` ships
the same as broker definitions, so a broker can be provisioned before any
service starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

EVENTS_EXCHANGE = "channels.events"
COMMANDS_EXCHANGE = "channels.commands"
DEAD_EXCHANGE = "channels.dead"
DEAD_LETTER_QUEUE = "channels.dead-letters"

#: Default cap on deliveries of one command before it is dead-lettered.
DEFAULT_DELIVERY_LIMIT = 5


@dataclass(frozen=True, kw_only=True)
class Exchange:
    """A durable exchange."""

    name: str
    type: str = "topic"


@dataclass(frozen=True, kw_only=True)
class Binding:
    """A queue binding to an exchange with a routing pattern."""

    exchange: str
    routing_key: str


@dataclass(frozen=True, kw_only=True)
class Queue:
    """A durable queue.

    Quorum queues get an explicit delivery limit (RabbitMQ 3.x has none by
    default, so a poison message would loop forever) and at-least-once
    dead-lettering (the default is at-most-once: a dead letter could be lost).
    """

    name: str
    bindings: Sequence[Binding] = ()
    quorum: bool = True
    delivery_limit: int | None = DEFAULT_DELIVERY_LIMIT
    dead_letter: bool = True

    def arguments(self) -> dict[str, str | int]:
        """AMQP ``x-`` arguments of the declaration."""
        args: dict[str, str | int] = {}
        if self.quorum:
            args["x-queue-type"] = "quorum"
            if self.delivery_limit is not None:
                args["x-delivery-limit"] = self.delivery_limit
        if self.dead_letter:
            args["x-dead-letter-exchange"] = DEAD_EXCHANGE
            if self.quorum:
                # at-least-once dead-lettering needs reject-publish overflow.
                args["x-dead-letter-strategy"] = "at-least-once"
                args["x-overflow"] = "reject-publish"
        return args


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Exchanges and queues to declare (idempotently)."""

    exchanges: Sequence[Exchange] = field(default_factory=tuple)
    queues: Sequence[Queue] = field(default_factory=tuple)

    def merge(self, other: Topology) -> Topology:
        """This topology plus ``other``'s exchanges and queues, without repeats."""
        exchanges = {e.name: e for e in (*self.exchanges, *other.exchanges)}
        queues = {q.name: q for q in (*self.queues, *other.queues)}
        return Topology(exchanges=tuple(exchanges.values()), queues=tuple(queues.values()))


def base_topology() -> Topology:
    """The exchanges every service needs, and the dead-letter queue."""
    return Topology(
        exchanges=(
            Exchange(name=EVENTS_EXCHANGE),
            Exchange(name=COMMANDS_EXCHANGE),
            Exchange(name=DEAD_EXCHANGE),
        ),
        queues=(
            Queue(
                name=DEAD_LETTER_QUEUE,
                bindings=(Binding(exchange=DEAD_EXCHANGE, routing_key="#"),),
                delivery_limit=None,
                dead_letter=False,
            ),
        ),
    )


def command_routing_key(channel: str, provider: str) -> str:
    """Routing key of a send command for one connector."""
    return f"send.{channel}.{provider}"


def command_queue_name(channel: str, provider: str) -> str:
    """Name of a connector's command queue."""
    return f"connector.{channel}.{provider}.send"


def _connector_command_queue(name: str, routing_key: str, delivery_limit: int) -> Queue:
    """A connector's quorum, dead-lettered queue of the commands routed ``routing_key``."""
    return Queue(
        name=name,
        bindings=(Binding(exchange=COMMANDS_EXCHANGE, routing_key=routing_key),),
        delivery_limit=delivery_limit,
    )


def command_queue(channel: str, provider: str, delivery_limit: int) -> Queue:
    """The quorum, dead-lettered command queue of one connector."""
    return _connector_command_queue(
        command_queue_name(channel, provider),
        command_routing_key(channel, provider),
        delivery_limit,
    )


def call_command_routing_key(channel: str, provider: str) -> str:
    """Routing key of a ``CallCommand`` for one (voice) connector."""
    return f"call.{channel}.{provider}"


def call_command_queue_name(channel: str, provider: str) -> str:
    """Name of a voice connector's call-command queue."""
    return f"connector.{channel}.{provider}.call"


def call_command_queue(channel: str, provider: str, delivery_limit: int) -> Queue:
    """The quorum, dead-lettered call-command queue of one voice connector."""
    return _connector_command_queue(
        call_command_queue_name(channel, provider),
        call_command_routing_key(channel, provider),
        delivery_limit,
    )


def subscription_queue(name: str, patterns: Iterable[str], delivery_limit: int) -> Queue:
    """A downstream consumer's queue on ``channels.events``."""
    return Queue(
        name=name,
        bindings=tuple(Binding(exchange=EVENTS_EXCHANGE, routing_key=p) for p in patterns),
        delivery_limit=delivery_limit,
    )


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching (``*`` one word, ``#`` zero or more words)."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])
