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
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq import spec
from aiormq.abc import ChannelFrame
from pamqp.common import FieldTable
from pamqp.header import ContentHeader

from gateway.contract.errors import BadRequestError, ConfigError, PermanentError
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


#: How long cancelling a consumer may take before shutdown goes on without it.
_CANCEL_TIMEOUT = 5.0


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
        # With the connection down (broker outage, or closed first) a robust
        # channel's cancel would wait for a reconnect forever: skip it then, and
        # bound it otherwise. The broker requeues unacked messages either way.
        if self._queue is not None and self._tag is not None and not self._channel.is_closed:
            with contextlib.suppress(*_CONNECTION_ERRORS, TimeoutError):
                async with asyncio.timeout(_CANCEL_TIMEOUT):
                    await self._queue.cancel(self._tag)
        if self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        # The channel was opened for this subscription alone; leaving it open
        # leaks one broker channel per cancelled subscription.
        if not self._channel.is_closed:
            with contextlib.suppress(*_CONNECTION_ERRORS, TimeoutError):
                async with asyncio.timeout(_CANCEL_TIMEOUT):
                    await self._channel.close()


@dataclass(slots=True)
class _Queued:
    exchange: str
    routing_key: str
    body: bytes
    properties: spec.Basic.Properties
    confirmation: asyncio.Future[Any]


class _PublishBatcher:
    """Writes the publishes of one event-loop turn to the socket as one batch.

    aiormq's ``basic_publish`` queues every message as its own write (a
    syscall each) behind a lock, a queue hand-off and a drain future; under
    load those cost as much as the rest of a webhook. Here every publish of a
    turn gets its delivery tag and confirm future registered on the aiormq
    channel exactly as ``basic_publish`` does (so acks, nacks, returns and a
    closing channel resolve them the same way), and their frames go out in a
    single write. Tags are assigned in the order the frames reach the write
    queue: directly when nothing is ahead, else through one ordered backlog.
    """

    def __init__(self) -> None:
        self._turn: dict[aiormq.Channel, list[_Queued]] = {}
        self._backlog: deque[tuple[aiormq.Channel, list[_Queued]]] = deque()
        self._backlog_task: asyncio.Task[None] | None = None

    async def publish(
        self,
        channel: aiormq.Channel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
    ) -> None:
        """Queue one mandatory publish for this turn and wait for its confirm."""
        if len(routing_key) > 255:
            raise ValueError("Routing key too long (max 255 bytes)")
        confirmation = channel.create_future()
        queued = self._turn.get(channel)
        if queued is None:
            queued = self._turn[channel] = []
            asyncio.get_running_loop().call_soon(self._flush, channel)
        queued.append(_Queued(exchange, routing_key, body, properties, confirmation))
        await confirmation

    def _flush(self, channel: aiormq.Channel) -> None:
        queued = [q for q in self._turn.pop(channel, ()) if not q.confirmation.done()]
        if not queued:
            return
        if channel.is_closed:
            error = aiormq.exceptions.ChannelInvalidStateError("publish channel is closed")
            for q in queued:
                q.confirmation.set_exception(error)
            return
        # aiormq's own basic_publish numbers its message and queues it without
        # yielding unless the write queue is full; so only then, or behind our
        # own backlog, could tags get out of order with the frames.
        if self._backlog or channel.write_queue.full():
            self._backlog.append((channel, queued))
            if self._backlog_task is None or self._backlog_task.done():
                self._backlog_task = asyncio.create_task(self._drain_backlog())
            return
        channel.write_queue.put_nowait(self._register(channel, queued))

    async def _drain_backlog(self) -> None:
        while self._backlog:
            channel, queued = self._backlog.popleft()
            queued = [q for q in queued if not q.confirmation.done()]
            if not queued:
                continue
            try:
                async with channel.lock:
                    if channel.is_closed:
                        raise aiormq.exceptions.ChannelInvalidStateError("channel is closed")
                    await channel.write_queue.put(self._register(channel, queued))
            except Exception as exc:  # noqa: BLE001 - handed to each publisher waiting
                for q in queued:
                    if not q.confirmation.done():
                        q.confirmation.set_exception(exc)

    @staticmethod
    def _register(channel: aiormq.Channel, queued: list[_Queued]) -> ChannelFrame:
        frames: list[Any] = []
        for q in queued:
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            message_id = q.properties.message_id or ""
            channel.confirmations[tag] = q.confirmation
            # aiormq finds a returned message's confirm by its message id.
            channel.message_id_delivery_tag[message_id] = tag
            q.confirmation.add_done_callback(partial(_forget_id, channel, message_id, tag))
            frames.append(
                spec.Basic.Publish(exchange=q.exchange, routing_key=q.routing_key, mandatory=True)
            )
            frames.append(ContentHeader(properties=q.properties, body_size=len(q.body)))
            frames.extend(channel._split_body(q.body))
        return ChannelFrame.marshall(channel_number=channel.number, frames=frames)


def _forget_id(channel: aiormq.Channel, message_id: str, tag: int, _: object) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]


def _string_table(headers: dict[str, Any]) -> bytes | None:
    """The AMQP field table of ``headers`` when every value is a str, else None.

    The same bytes as pamqp's encoder (keys sorted, short-string keys,
    ``S`` long-string values), without its per-value type dispatch: every
    published message carries the CloudEvents headers, and encoding them was
    the largest single cost of building a publish frame.
    """
    parts: list[bytes] = []
    for key, value in sorted(headers.items()):
        if not isinstance(value, str):
            return None
        name, data = key.encode(), value.encode()
        if len(name) > 128:
            return None  # pamqp truncates such keys (and warns): let it
        parts += (len(name).to_bytes(1, "big"), name, b"S", len(data).to_bytes(4, "big"), data)
    table = b"".join(parts)
    return len(table).to_bytes(4, "big") + table


class _Properties(spec.Basic.Properties):
    """``Basic.Properties`` with a fast path for all-string header tables.

    No ``__slots__`` here on purpose: pamqp's marshal iterates
    ``self.__slots__``, which must stay the base class's.
    """

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "headers" and isinstance(value, dict) and value:
            table = _string_table(value)
            if table is not None:
                return table
        return super().encode_property(name, value)


class AmqpBus:
    """:class:`~gateway.runtime.bus.Bus` on RabbitMQ."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self._url = url
        self._connect_timeout = connect_timeout
        self._pub_conn: AbstractRobustConnection | None = None
        self._sub_conn: AbstractRobustConnection | None = None
        self._pub_channel: AbstractRobustChannel | None = None
        # aio-pika attributes returns by message_id: two concurrent publishes
        # with one id on a channel could be confused, so they are serialized
        # (id -> waiters for their turn, None while nobody waits).
        self._inflight_ids: dict[str, deque[asyncio.Future[None]] | None] = {}
        self._batcher = _PublishBatcher()

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
        try:
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
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            # E.g. broker.delivery_limit changed after the queue was created: the
            # broker keeps the old arguments and refuses the new declaration.
            raise ConfigError(
                f"RabbitMQ refused the topology: {exc.args[0] if exc.args else exc}. An existing "
                "exchange or queue has other settings; delete it (or migrate it with a policy) "
                "or keep the configuration it was created with"
            ) from exc

    async def publish(
        self, exchange: str, routing_key: str, message: OutgoingMessage, *, timeout: float
    ) -> None:
        channel = self._pub_channel
        if channel is None or channel.is_closed or not self.is_ready():
            raise BrokerUnavailableError("no open publish channel to RabbitMQ")
        message_id = message.message_id
        if message_id in self._inflight_ids:
            await self._wait_turn(message_id)
        else:
            self._inflight_ids[message_id] = None
        # Straight to the aiormq channel under aio-pika's robust one, without an
        # aio-pika Message and Exchange per publish: this is the hot path of
        # every webhook. Same frames, same confirm and return handling (the
        # channel was opened with on_return_raises); see _PublishBatcher.
        properties = _Properties(
            content_type=message.content_type,
            delivery_mode=2,  # persistent
            headers=cast(FieldTable, dict(message.headers)),
            message_id=message_id,
            message_type=message.type,
            timestamp=message.timestamp,
            correlation_id=message.correlation_id,
        )
        try:
            async with asyncio.timeout(timeout):
                underlay = await channel.get_underlay_channel()
                await self._batcher.publish(
                    cast(aiormq.Channel, underlay), exchange, routing_key, message.body, properties
                )
        except aiormq.exceptions.PublishError as exc:
            raise UnroutableError(f"unroutable: {exchange}/{routing_key}") from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishError(f"broker nacked publish to {exchange}/{routing_key}") from exc
        except TimeoutError as exc:
            raise PublishTimeoutError(f"no confirm within {timeout}s") from exc
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailableError(f"publish failed: {exc!r}") from exc
        finally:
            self._next_turn(message_id)

    async def _wait_turn(self, message_id: str) -> None:
        # Only a publish that finds its id in flight pays for a waiter.
        waiters = self._inflight_ids[message_id]
        if waiters is None:
            waiters = self._inflight_ids[message_id] = deque()
        turn = asyncio.get_running_loop().create_future()
        waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._next_turn(message_id)  # it was our turn: pass it on
            elif turn in waiters:
                waiters.remove(turn)
            raise

    def _next_turn(self, message_id: str) -> None:
        waiters = self._inflight_ids.get(message_id)
        while waiters:
            turn = waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the id stays in flight, now theirs
                return
        del self._inflight_ids[message_id]

    async def declare_temporary_queue(self, exchange: str, patterns: Sequence[str]) -> str:
        if self._sub_conn is None:
            raise BrokerUnavailableError("not connected")
        # Declared on the consuming connection: an exclusive queue belongs to it.
        channel = await self._sub_conn.channel()
        try:
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for pattern in patterns:
                await queue.bind(exchange, routing_key=pattern)
        finally:
            # The queue belongs to the connection, not this channel: close it
            # rather than leak one channel per temporary queue.
            await channel.close()
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
