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
from aiormq.abc import ChannelFrame
from pamqp import constants as pamqp_constants
from pamqp import encode as pamqp_encode
from pamqp.common import FieldTable

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
    message_id: str
    #: The publish's method, content header and body frames, encoded for its channel.
    frames: bytes
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

    async def publish(self, channel: aiormq.Channel, message_id: str, frames: bytes) -> None:
        """Queue one publish (its encoded frames) for this turn and wait for its confirm."""
        confirmation = channel.create_future()
        queued = self._turn.get(channel)
        if queued is None:
            queued = self._turn[channel] = []
            asyncio.get_running_loop().call_soon(self._flush, channel)
        queued.append(_Queued(message_id, frames, confirmation))
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
        for q in queued:
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            channel.confirmations[tag] = q.confirmation
            # aiormq finds a returned message's confirm by its message id.
            channel.message_id_delivery_tag[q.message_id] = tag
            q.confirmation.add_done_callback(partial(_forget_id, channel, q.message_id, tag))
        payload = queued[0].frames if len(queued) == 1 else b"".join(q.frames for q in queued)
        return ChannelFrame(payload=payload, should_close=False)


def _forget_id(channel: aiormq.Channel, message_id: str, tag: int, _: object) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]


#: Encoded header names (short string + the long-string tag), None for a name
#: pamqp must handle; bounded, as header names are few (CloudEvents, trace).
_HEADER_NAMES: dict[str, bytes | None] = {}


def _header_name(key: str) -> bytes | None:
    name = key.encode()
    # pamqp truncates names over 128 bytes (and warns): let it.
    encoded = None if len(name) > 128 else len(name).to_bytes(1, "big") + name + b"S"
    if len(_HEADER_NAMES) < 1024:
        _HEADER_NAMES[key] = encoded
    return encoded


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
        name = _HEADER_NAMES.get(key) or _header_name(key)
        if name is None:
            return None
        data = value.encode()
        parts += (name, len(data).to_bytes(4, "big"), data)
    table = b"".join(parts)
    return len(table).to_bytes(4, "big") + table


_FRAME_END = b"\xce"
_PUBLISH_METHOD = (0x003C0028).to_bytes(4, "big") + b"\x00\x00"  # Basic.Publish, ticket 0
_MANDATORY = b"\x01"
#: Basic.Properties flags (AMQP 0-9-1 section 4.2.6.1 / pamqp's table).
_CONTENT_TYPE, _HEADERS, _DELIVERY_MODE = 0x8000, 0x2000, 0x1000
_CORRELATION_ID, _MESSAGE_ID, _TIMESTAMP, _TYPE = 0x0400, 0x0080, 0x0040, 0x0020
_EXCHANGE_NAME = pamqp_constants.DOMAIN_REGEX["exchange-name"]


def _shortstr(value: str, what: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"{what} too long for AMQP: {len(data)} bytes (max 255)")
    return len(data).to_bytes(1, "big") + data


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return b"".join(
        (
            kind.to_bytes(1, "big"),
            channel.to_bytes(2, "big"),
            len(payload).to_bytes(4, "big"),
            payload,
            _FRAME_END,
        )
    )


def _publish_frames(
    channel: int, max_content: int, exchange: str, routing_key: str, message: OutgoingMessage
) -> bytes:
    """The wire bytes of one persistent, mandatory ``basic.publish`` of ``message``.

    Byte for byte what aiormq's ``basic_publish`` sends through pamqp (the
    tests compare them), written directly: pamqp's generic marshalling (a
    type lookup and dispatch per property and per header value, a frame
    object per part) was the largest single cost of publishing. Raises
    ValueError for what AMQP cannot carry (a name or id over 255 bytes, an
    exchange name pamqp would refuse), before anything is queued.
    """
    if len(exchange) > 127 or not _EXCHANGE_NAME.fullmatch(exchange):
        raise ValueError(f"invalid AMQP exchange name: {exchange!r}")
    method = b"".join(
        (
            _PUBLISH_METHOD,
            _shortstr(exchange, "exchange name"),
            _shortstr(routing_key, "routing key"),
            _MANDATORY,
        )
    )
    flags = _DELIVERY_MODE
    parts: list[bytes] = []
    # Properties in the specification's order; pamqp leaves out None and "".
    if message.content_type:
        flags |= _CONTENT_TYPE
        parts.append(_shortstr(message.content_type, "content type"))
    headers = cast(FieldTable, dict(message.headers))
    flags |= _HEADERS
    parts.append(_string_table(headers) or pamqp_encode.field_table(headers))
    parts.append(b"\x02")  # delivery mode 2: persistent
    if message.correlation_id:
        flags |= _CORRELATION_ID
        parts.append(_shortstr(message.correlation_id, "correlation id"))
    if message.message_id:
        flags |= _MESSAGE_ID
        parts.append(_shortstr(message.message_id, "message id"))
    if message.timestamp is not None:
        flags |= _TIMESTAMP
        parts.append(pamqp_encode.timestamp(message.timestamp))
    if message.type:
        flags |= _TYPE
        parts.append(_shortstr(message.type, "message type"))
    body = message.body
    header = b"".join(
        (
            b"\x00\x3c\x00\x00",  # class Basic, weight 0
            len(body).to_bytes(8, "big"),
            flags.to_bytes(2, "big"),
            *parts,
        )
    )
    frames = [_frame(1, channel, method), _frame(2, channel, header)]
    # aiormq's split: one body frame below the limit, else max_content-sized pieces.
    for offset in range(0, len(body), max_content):
        frames.append(_frame(3, channel, body[offset : offset + max_content]))
    return b"".join(frames)


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
        try:
            async with asyncio.timeout(timeout):
                underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                frames = _publish_frames(
                    underlay.number, underlay.max_content_size, exchange, routing_key, message
                )
                await self._batcher.publish(underlay, message_id, frames)
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
