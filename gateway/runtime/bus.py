"""The message bus protocol shared by the RabbitMQ and in-memory buses.

Handlers decide acknowledgement by how they end: returning acks; raising
:class:`~gateway.contract.errors.PermanentError` or
:class:`~gateway.contract.errors.BadRequestError` rejects the message to the
dead-letter exchange; any other exception requeues it, and the queue's
delivery limit bounds how often.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from gateway.contract.errors import TransientError
from gateway.runtime.topology import Topology

HeaderValue = str | int | float | bool | bytes | None


@dataclass(frozen=True, kw_only=True)
class OutgoingMessage:
    """One message to publish (always persistent)."""

    body: bytes
    message_id: str
    type: str
    content_type: str = "application/protobuf"
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    timestamp: datetime | None = None
    correlation_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """One message handed to a consumer."""

    body: bytes
    message_id: str | None
    type: str | None
    content_type: str | None
    headers: Mapping[str, Any]
    exchange: str
    routing_key: str
    redelivered: bool
    #: Previous failed deliveries (quorum queues' ``x-delivery-count``).
    delivery_count: int = 0


DeliveryHandler = Callable[[Delivery], Awaitable[None]]


class PublishError(TransientError):
    """A publish was not confirmed by the broker; the caller must not ack upstream."""

    code = "publish_failed"


class UnroutableError(PublishError):
    """The broker returned the message: no queue is bound for its routing key."""

    code = "unroutable"


class PublishTimeoutError(PublishError):
    """No confirm within the publish timeout (alarm, stuck connection)."""

    code = "publish_timeout"


class BrokerUnavailableError(PublishError):
    """No usable connection to the broker right now."""

    code = "broker_unavailable"


class Subscription(Protocol):
    """A running consumer."""

    async def cancel(self) -> None:
        """Stop receiving and wait for handlers in flight; unacked messages are requeued."""


class Bus(Protocol):
    """Publish with confirms, consume with manual acks, declare topology."""

    async def connect(self) -> None:
        """Open connections (raises BrokerUnavailableError when it cannot)."""

    async def close(self) -> None:
        """Close connections (after subscriptions were cancelled)."""

    def is_ready(self) -> bool:
        """True when a publish can be attempted now."""

    async def declare(self, topology: Topology) -> None:
        """Declare exchanges, queues and bindings; idempotent."""

    async def publish(
        self, exchange: str, routing_key: str, message: OutgoingMessage, *, timeout: float
    ) -> None:
        """Publish persistently, mandatory, and wait for the broker's confirm.

        Raises a :class:`PublishError` subclass unless the broker confirmed.
        """

    async def consume(self, queue: str, handler: DeliveryHandler, *, prefetch: int) -> Subscription:
        """Start consuming ``queue`` with manual acknowledgement."""

    async def declare_temporary_queue(self, exchange: str, patterns: Sequence[str]) -> str:
        """A server-named queue bound to ``patterns`` that disappears with this
        connection (for ``tail`` and the demo); returns its name."""
