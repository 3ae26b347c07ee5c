"""The RabbitMQ bus on aio-pika.

Publishing and consuming use separate connections, so a flood of deliveries
(or a blocked publisher under a memory alarm) cannot starve the other side.
Every publish is persistent and ``mandatory`` on a confirm channel with
``on_return_raises``: an unroutable or nacked message is an error, and a
publish without a confirm within the timeout is an error too (aio-pika's
default timeout is None, which can wait forever).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from gateway.contract.errors import BadRequestError, PermanentError
from gateway.runtime.bus import (
    BrokerUnavailableError,
    Delivery,
    DeliveryHandler,
    OutgoingMessage,
    PublishError,
    PublishTimeoutError,
    UnroutableError,
)
from gateway.runtime.telemetry import get_logger
from gateway.runtime.topology import Topology

log = get_logger("gateway.bus")

_CONNECTION_ERRORS = (
    ConnectionError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    RuntimeError,  # aiormq raises it when writing to a closed transport
)


def _delivery_count(value: object) -> int:
    return value if isinstance(value, int) else 0


class AmqpSubscription:
    """A consumer on one queue; cancelling waits for handlers in flight."""

    def __init__(
        self, channel: AbstractRobustChannel, queue: str, handler: DeliveryHandler
    ) -> None:
        self._channel, self._queue_name, self._handler = channel, queue, handler
        self._inflight: set[asyncio.Task[None]] = set()
        self._tag: str | None = None
        self._queue: AbstractQueue | None = None

    async def start(self, prefetch: int) -> None:
        await self._channel.set_qos(prefetch_count=prefetch)
        queue = await self._channel.get_queue(self._queue_name, ensure=True)
        self._tag = await queue.consume(self._on_message, no_ack=False)
        self._queue = queue

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            await self._handle(message)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        delivery = Delivery(
            body=message.body,
            message_id=message.message_id,
            type=message.type,
            content_type=message.content_type,
            headers=headers,
            exchange=message.exchange or "",
            routing_key=message.routing_key or "",
            redelivered=bool(message.redelivered),
            delivery_count=_delivery_count(headers.get("x-delivery-count")),
        )
        try:
            await self._handler(delivery)
        except (PermanentError, BadRequestError) as exc:
            log.warning(
                "message rejected to dead letters",
                queue=self._queue_name,
                message_id=delivery.message_id,
                error=str(exc),
            )
            await self._settle(message.reject(requeue=False))
        except asyncio.CancelledError:
            await self._settle(message.nack(requeue=True))
            raise
        except Exception as exc:  # noqa: BLE001 - requeue; the delivery limit bounds the loop
            log.warning(
                "message requeued after failure",
                queue=self._queue_name,
                message_id=delivery.message_id,
                error=repr(exc),
                delivery_count=delivery.delivery_count,
            )
            await self._settle(message.nack(requeue=True))
        else:
            await self._settle(message.ack())

    async def _settle(self, op: Any) -> None:
        # Delivery tags belong to one channel: after a reconnect the ack can
        # no longer be sent. The broker redelivers and the handlers dedupe.
        try:
            await op
        except _CONNECTION_ERRORS as exc:
            log.warning("could not settle delivery; broker will redeliver", error=repr(exc))

    async def cancel(self) -> None:
        """Stop consuming, let handlers finish; unacked messages are requeued on close."""
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await self._queue.cancel(self._tag)
        if self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)


class AmqpBus:
    """:class:`~gateway.runtime.bus.Bus` on RabbitMQ."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self._url = url
        self._connect_timeout = connect_timeout
        self._pub_conn: AbstractRobustConnection | None = None
        self._sub_conn: AbstractRobustConnection | None = None
        self._pub_channel: AbstractRobustChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        # aio-pika attributes returns by message_id: two concurrent publishes
        # with one id on a channel could be confused, so they are serialized.
        self._inflight_ids: dict[str, asyncio.Event] = {}

    async def connect(self) -> None:
        try:
            self._pub_conn = await aio_pika.connect_robust(
                self._url,
                timeout=self._connect_timeout,
                client_properties={"connection_name": "publish"},
            )
            self._sub_conn = await aio_pika.connect_robust(
                self._url,
                timeout=self._connect_timeout,
                client_properties={"connection_name": "consume"},
            )
            self._pub_channel = await self._pub_conn.channel(
                publisher_confirms=True, on_return_raises=True
            )
        except (TimeoutError, *_CONNECTION_ERRORS, OSError) as exc:
            await self.close()
            raise BrokerUnavailableError(f"cannot connect to RabbitMQ: {exc!r}") from exc

    async def close(self) -> None:
        for conn in (self._pub_conn, self._sub_conn):
            if conn is not None:
                with contextlib.suppress(*_CONNECTION_ERRORS):
                    await conn.close()
        self._pub_conn = self._sub_conn = self._pub_channel = None
        self._exchanges.clear()

    def is_ready(self) -> bool:
        return (
            self._pub_conn is not None
            and not self._pub_conn.is_closed
            and self._pub_channel is not None
            and not self._pub_channel.is_closed
        )

    async def declare(self, topology: Topology) -> None:
        if self._pub_conn is None:
            raise BrokerUnavailableError("not connected")
        # A separate channel: a failed declaration closes its channel.
        async with self._pub_conn.channel() as channel:
            for exchange in topology.exchanges:
                await channel.declare_exchange(
                    exchange.name, aio_pika.ExchangeType(exchange.type), durable=True
                )
            for queue in topology.queues:
                declared = await channel.declare_queue(
                    queue.name, durable=True, arguments=queue.arguments()
                )
                for binding in queue.bindings:
                    await declared.bind(binding.exchange, routing_key=binding.routing_key)

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            if self._pub_channel is None:
                raise BrokerUnavailableError("not connected")
            exchange = await self._pub_channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(
        self, exchange: str, routing_key: str, message: OutgoingMessage, *, timeout: float
    ) -> None:
        if not self.is_ready():
            raise BrokerUnavailableError("no open publish channel to RabbitMQ")
        while (busy := self._inflight_ids.get(message.message_id)) is not None:
            await busy.wait()
        done = self._inflight_ids[message.message_id] = asyncio.Event()
        amqp_message = aio_pika.Message(
            message.body,
            headers=dict(message.headers),
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            type=message.type,
            timestamp=message.timestamp,
            correlation_id=message.correlation_id,
        )
        try:
            async with asyncio.timeout(timeout):
                target = await self._exchange(exchange)
                await target.publish(amqp_message, routing_key, mandatory=True, timeout=timeout)
        except aio_pika.exceptions.PublishError as exc:
            raise UnroutableError(f"unroutable: {exchange}/{routing_key}") from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishError(f"broker nacked publish to {exchange}/{routing_key}") from exc
        except TimeoutError as exc:
            raise PublishTimeoutError(f"no confirm within {timeout}s") from exc
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailableError(f"publish failed: {exc!r}") from exc
        finally:
            del self._inflight_ids[message.message_id]
            done.set()

    async def declare_temporary_queue(self, exchange: str, patterns: Sequence[str]) -> str:
        if self._sub_conn is None:
            raise BrokerUnavailableError("not connected")
        # Declared on the consuming connection: an exclusive queue belongs to it.
        channel = await self._sub_conn.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for pattern in patterns:
            await queue.bind(exchange, routing_key=pattern)
        return queue.name

    async def consume(
        self, queue: str, handler: DeliveryHandler, *, prefetch: int
    ) -> AmqpSubscription:
        if self._sub_conn is None:
            raise BrokerUnavailableError("not connected")
        channel = await self._sub_conn.channel()
        subscription = AmqpSubscription(channel, queue, handler)
        await subscription.start(prefetch)
        return subscription
