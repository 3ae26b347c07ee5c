"""StreamEvents: normalized events over gRPC, resumable from a cursor.

One :class:`EventHub` per gateway consumes every event on ``channels.events``
through one temporary queue, keeps the latest ones in a bounded replay
buffer and fans each out to the streams whose binding patterns match (AMQP
topic semantics, :func:`~gateway.runtime.topology.topic_matches`).

Why one queue for all streams rather than a queue per stream: a stream that
resumes from a cursor must continue exactly where the buffer ends. With one
source, subscribing and taking the buffer's snapshot happen in the same step
of the event loop, so nothing falls between replay and live delivery and
nothing comes twice. It also costs the broker one queue and one channel per
gateway instead of per client.

The cursor of an event is its id; a stream started with a cursor replays the
buffered events after it that match its patterns, then goes live. A cursor
no longer in the buffer is OUT_OF_RANGE: events after it are gone and the
client must know. Each replica buffers every event, so a cursor works on any
replica whose buffer still holds it.

A client that reads slower than events arrive fills its bounded inbox; the
hub then ends that stream with RESOURCE_EXHAUSTED (resume from the last
cursor) rather than hold back the shared queue for everyone.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from gateway.api.v1.envelope_pb2 import Event
from gateway.runtime.bus import Bus, Delivery, Subscription
from gateway.runtime.codec import decode_event
from gateway.runtime.telemetry import get_logger
from gateway.runtime.topology import EVENTS_EXCHANGE, topic_matches
from gateway.server.content import Violation
from gateway.server.errors import RpcError, invalid

log = get_logger("gateway.server.events")

_WORD = re.compile(r"^(\*|#|[A-Za-z0-9_\-]+)$")
MAX_BINDINGS = 16
#: Events a stream may have waiting before it is ended as too slow.
INBOX_SIZE = 1024


@dataclass(frozen=True, slots=True)
class StreamedEvent:
    """One event as a stream delivers it."""

    event: Event
    routing_key: str

    @property
    def cursor(self) -> str:
        """What the client passes back to resume after this event."""
        return self.event.id


def check_bindings(bindings: Sequence[str]) -> list[str]:
    """The patterns to match (``#`` when none); INVALID_ARGUMENT for a malformed one."""
    patterns = list(bindings) or ["#"]
    violations = []
    if len(patterns) > MAX_BINDINGS:
        violations.append(Violation("bindings", f"at most {MAX_BINDINGS} patterns"))
    for i, pattern in enumerate(patterns):
        if not pattern or not all(_WORD.match(w) for w in pattern.split(".")):
            violations.append(
                Violation(
                    f"bindings[{i}]",
                    f"{pattern!r} is not a binding pattern: dot-separated words of letters, "
                    "digits, '_' or '-', or '*' (one word) / '#' (any words)",
                )
            )
    if violations:
        raise invalid(violations)
    return patterns


@dataclass(eq=False)
class _Subscriber:
    patterns: list[str]
    #: Events for the reader; None ends the stream.
    inbox: asyncio.Queue[StreamedEvent | None] = field(default_factory=asyncio.Queue)
    overflowed: bool = False

    def offer(self, item: StreamedEvent) -> None:
        if self.overflowed or not any(topic_matches(p, item.routing_key) for p in self.patterns):
            return
        if self.inbox.qsize() >= INBOX_SIZE:
            # Everything queued is still delivered; the reader then resumes
            # from its last cursor and finds the rest in the replay buffer.
            self.overflowed = True
            self.inbox.put_nowait(None)
            return
        self.inbox.put_nowait(item)

    def end(self) -> None:
        if not self.overflowed:
            self.overflowed = True
            self.inbox.put_nowait(None)


class EventHub:
    """Every event on ``channels.events``: a replay buffer and the live streams."""

    def __init__(self, bus: Bus, buffer_size: int) -> None:
        self._bus, self._size = bus, buffer_size
        self._buffer: deque[StreamedEvent] = deque(maxlen=max(buffer_size, 1))
        self._subscribers: set[_Subscriber] = set()
        self._subscription: Subscription | None = None

    @property
    def resumable(self) -> bool:
        """False when resuming is switched off (a buffer size of 0)."""
        return self._size > 0

    async def start(self) -> None:
        """Bind a temporary queue to every event and start consuming it."""
        queue = await self._bus.declare_temporary_queue(EVENTS_EXCHANGE, ["#"])
        self._subscription = await self._bus.consume(queue, self._on_delivery, prefetch=256)

    async def stop(self) -> None:
        """Stop consuming and end every stream."""
        if self._subscription is not None:
            await self._subscription.cancel()
            self._subscription = None
        for subscriber in self._subscribers:
            subscriber.end()

    async def _on_delivery(self, delivery: Delivery) -> None:
        item = StreamedEvent(decode_event(delivery), delivery.routing_key)
        if self.resumable:
            self._buffer.append(item)
        for subscriber in self._subscribers:
            subscriber.offer(item)

    def _after(self, cursor: str, patterns: Sequence[str]) -> list[StreamedEvent]:
        for index in range(len(self._buffer) - 1, -1, -1):
            if self._buffer[index].event.id == cursor:
                return [
                    item
                    for item in list(self._buffer)[index + 1 :]
                    if any(topic_matches(p, item.routing_key) for p in patterns)
                ]
        raise RpcError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"cursor {cursor!r} is not in this gateway's replay window"
            + ("" if self.resumable else " (resuming is switched off)")
            + ": events after it may be lost; subscribe again without a cursor",
            reason="CURSOR_EXPIRED",
        )

    async def stream(self, bindings: Sequence[str], cursor: str) -> AsyncIterator[StreamedEvent]:
        """Yield events matching ``bindings``: first those after ``cursor``, then live ones."""
        if self._subscription is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the event stream is not running")
        patterns = check_bindings(bindings)
        # No await between the snapshot and subscribing: replay and live meet exactly.
        replay = self._after(cursor, patterns) if cursor else []
        subscriber = _Subscriber(patterns)
        self._subscribers.add(subscriber)
        try:
            for item in replay:
                yield item
            while True:
                next_item = await subscriber.inbox.get()
                if next_item is None:
                    raise RpcError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED
                        if self._subscription is not None
                        else grpc.StatusCode.UNAVAILABLE,
                        "the stream fell too far behind (or the gateway is stopping): "
                        "resume with the cursor of the last event received",
                        reason="STREAM_OVERFLOW",
                    )
                yield next_item
        finally:
            self._subscribers.discard(subscriber)
