"""StreamEvents: normalized events over gRPC, resumable from a cursor.

Each stream gets its own temporary queue on ``channels.events`` bound with the
caller's patterns, so the broker does the filtering and a slow client holds
back only its own queue (the handler blocks on a bounded inbox, which keeps
the prefetch window full and the broker stops delivering).

Resuming: the gateway taps every event into a bounded replay buffer. The
cursor of an event is its id; a stream started with a cursor first binds its
queue (so nothing published from then on is missed), then replays the
buffered events after the cursor that match its patterns, then goes live,
skipping live copies of events it already replayed. A cursor no longer in the
buffer is OUT_OF_RANGE: the events after it are gone and the client must know.
Each gateway replica taps every event, so a cursor works on any replica whose
buffer still holds it.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

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
    """The patterns to bind (``#`` when none); INVALID_ARGUMENT for a malformed one."""
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


class EventTap:
    """A bounded buffer of the latest events on ``channels.events`` (for resuming)."""

    def __init__(self, bus: Bus, size: int) -> None:
        self._bus, self._size = bus, size
        self._buffer: deque[StreamedEvent] = deque(maxlen=max(size, 1))
        self._subscription: Subscription | None = None

    @property
    def enabled(self) -> bool:
        """False when resuming is switched off (a buffer size of 0)."""
        return self._size > 0

    async def start(self) -> None:
        """Bind a temporary queue to every event and start buffering."""
        if not self.enabled:
            return
        queue = await self._bus.declare_temporary_queue(EVENTS_EXCHANGE, ["#"])
        self._subscription = await self._bus.consume(queue, self._on_delivery, prefetch=256)

    async def stop(self) -> None:
        """Stop buffering."""
        if self._subscription is not None:
            await self._subscription.cancel()
            self._subscription = None

    async def _on_delivery(self, delivery: Delivery) -> None:
        self._buffer.append(StreamedEvent(decode_event(delivery), delivery.routing_key))

    def after(self, cursor: str, patterns: Sequence[str]) -> list[StreamedEvent]:
        """Buffered events after ``cursor`` matching ``patterns``; OUT_OF_RANGE if it is gone."""
        snapshot = list(self._buffer)
        for index in range(len(snapshot) - 1, -1, -1):
            if snapshot[index].event.id == cursor:
                return [
                    item
                    for item in snapshot[index + 1 :]
                    if any(topic_matches(p, item.routing_key) for p in patterns)
                ]
        raise RpcError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"cursor {cursor!r} is not in this gateway's replay window"
            + ("" if self.enabled else " (resuming is switched off)")
            + ": events after it may be lost; subscribe again without a cursor",
            reason="CURSOR_EXPIRED",
        )


async def stream_events(
    bus: Bus, tap: EventTap, bindings: Sequence[str], cursor: str, *, inbox_size: int = 64
) -> AsyncIterator[StreamedEvent]:
    """Yield events matching ``bindings``: first those after ``cursor``, then live ones."""
    patterns = check_bindings(bindings)
    inbox: asyncio.Queue[StreamedEvent] = asyncio.Queue(maxsize=inbox_size)

    async def on_delivery(delivery: Delivery) -> None:
        await inbox.put(StreamedEvent(decode_event(delivery), delivery.routing_key))

    queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, patterns)
    subscription = await bus.consume(queue, on_delivery, prefetch=inbox_size)
    try:
        replayed: set[str] = set()
        if cursor:
            for item in tap.after(cursor, patterns):
                replayed.add(item.event.id)
                yield item
        while True:
            item = await inbox.get()
            if item.event.id in replayed:
                continue
            yield item
    finally:
        # Cancel first, then drain: a handler blocked on the full inbox must
        # finish for the cancel to complete.
        cancel = asyncio.ensure_future(subscription.cancel())
        while not cancel.done():
            while not inbox.empty():
                inbox.get_nowait()
            await asyncio.sleep(0.01)
        await cancel
