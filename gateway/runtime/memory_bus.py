"""An in-memory bus with the same contract as the RabbitMQ bus.

It runs the real handlers in unit tests and lets ``demo`` run on a machine with
no broker. It models the behaviour handlers rely on: topic routing, unroutable
publishes failing, manual acks, requeue with a delivery count, the delivery
limit and dead-lettering. It keeps nothing across restarts, so it is never
used when a broker URL is configured (the service logs loudly when it is).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gateway.contract.errors import BadRequestError, PermanentError
from gateway.runtime.bus import (
    BrokerUnavailableError,
    Delivery,
    DeliveryHandler,
    OutgoingMessage,
    UnroutableError,
)
from gateway.runtime.topology import DEAD_EXCHANGE, Binding, Queue, Topology, topic_matches


@dataclass(frozen=True, kw_only=True)
class _Entry:
    message: OutgoingMessage
    exchange: str
    routing_key: str
    delivery_count: int = 0

    def to_delivery(self) -> Delivery:
        msg = self.message
        return Delivery(
            body=msg.body,
            message_id=msg.message_id,
            type=msg.type,
            content_type=msg.content_type,
            headers=dict(msg.headers),
            exchange=self.exchange,
            routing_key=self.routing_key,
            redelivered=self.delivery_count > 0,
            delivery_count=self.delivery_count,
        )


class _MemoryQueue:
    def __init__(self, spec: Queue) -> None:
        self.spec = spec
        self.items: asyncio.Queue[_Entry] = asyncio.Queue()


class MemorySubscription:
    """A consumer task on one in-memory queue."""

    def __init__(
        self, bus: InMemoryBus, queue: _MemoryQueue, handler: DeliveryHandler, prefetch: int
    ) -> None:
        self._bus, self._queue, self._handler = bus, queue, handler
        self._slots = asyncio.Semaphore(prefetch)
        self._inflight: set[asyncio.Task[None]] = set()
        self._task = asyncio.create_task(self._loop(), name=f"consume {queue.spec.name}")

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            entry = await self._queue.items.get()
            task = asyncio.create_task(self._deliver(entry))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _deliver(self, entry: _Entry) -> None:
        delivery = entry.to_delivery()
        try:
            await self._handler(delivery)
        except (PermanentError, BadRequestError):
            self._bus.dead_letter(entry, reason="rejected")
        except Exception:  # noqa: BLE001 - any other failure means "requeue", as on RabbitMQ
            self._bus.requeue(self._queue, entry)
        finally:
            self._slots.release()

    async def cancel(self) -> None:
        """Stop taking messages and let handlers in flight finish."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)


class InMemoryBus:
    """The :class:`~gateway.runtime.bus.Bus` protocol, in process memory."""

    def __init__(self) -> None:
        self._exchanges: set[str] = set()
        self._queues: dict[str, _MemoryQueue] = {}
        self._connected = False
        #: Set to False to simulate a broker outage.
        self.available = True
        self.published: list[tuple[str, str, OutgoingMessage]] = []

    async def connect(self) -> None:
        self._connected = True

    async def close(self) -> None:
        self._connected = False

    def is_ready(self) -> bool:
        return self._connected and self.available

    async def declare(self, topology: Topology) -> None:
        self._exchanges.update(e.name for e in topology.exchanges)
        for spec in topology.queues:
            if spec.name not in self._queues:
                self._queues[spec.name] = _MemoryQueue(spec)

    async def publish(
        self, exchange: str, routing_key: str, message: OutgoingMessage, *, timeout: float
    ) -> None:
        if not self.is_ready():
            raise BrokerUnavailableError("in-memory broker is unavailable")
        if exchange not in self._exchanges:
            raise UnroutableError(f"exchange {exchange!r} is not declared")
        targets = self._route(exchange, routing_key)
        if not targets:
            raise UnroutableError(f"no queue bound for {exchange}/{routing_key}")
        self.published.append((exchange, routing_key, message))
        for queue in targets:
            queue.items.put_nowait(
                _Entry(message=message, exchange=exchange, routing_key=routing_key)
            )

    def _route(self, exchange: str, routing_key: str) -> list[_MemoryQueue]:
        return [
            q
            for q in self._queues.values()
            if any(
                b.exchange == exchange and topic_matches(b.routing_key, routing_key)
                for b in q.spec.bindings
            )
        ]

    async def declare_temporary_queue(self, exchange: str, patterns: Sequence[str]) -> str:
        name = f"amq.gen-{uuid.uuid4().hex}"
        bindings = tuple(Binding(exchange=exchange, routing_key=p) for p in patterns)
        spec = Queue(
            name=name, bindings=bindings, quorum=False, delivery_limit=None, dead_letter=False
        )
        self._queues[name] = _MemoryQueue(spec)
        return name

    async def consume(
        self, queue: str, handler: DeliveryHandler, *, prefetch: int
    ) -> MemorySubscription:
        if queue not in self._queues:
            raise PermanentError(f"queue {queue!r} is not declared")
        return MemorySubscription(self, self._queues[queue], handler, max(1, prefetch))

    def requeue(self, queue: _MemoryQueue, entry: _Entry) -> None:
        """Put a failed delivery back, or dead-letter it past the delivery limit."""
        count = entry.delivery_count + 1
        limit = queue.spec.delivery_limit
        # As on RabbitMQ quorum queues: a message is dead-lettered once its
        # failed deliveries exceed the limit (the first delivery plus `limit`
        # redeliveries), checked against RabbitMQ 3.10 in tests/integration.
        if limit is not None and count > limit:
            self.dead_letter(entry, reason="delivery_limit")
        else:
            queue.items.put_nowait(replace(entry, delivery_count=count))

    def dead_letter(self, entry: _Entry, *, reason: str) -> None:
        """Route a message to the dead-letter exchange (dropped if nothing is bound)."""
        headers = {**entry.message.headers, "x-first-death-reason": reason}
        message = replace(entry.message, headers=headers)
        for queue in self._route(DEAD_EXCHANGE, entry.routing_key):
            queue.items.put_nowait(
                _Entry(message=message, exchange=DEAD_EXCHANGE, routing_key=entry.routing_key)
            )

    def queue_depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` (for tests)."""
        return self._queues[queue].items.qsize()

    async def get(self, queue: str, timeout: float = 1.0) -> Delivery:
        """Take one message from ``queue`` without a consumer (for tests)."""
        entry = await asyncio.wait_for(self._queues[queue].items.get(), timeout)
        return entry.to_delivery()
