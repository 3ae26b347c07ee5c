"""Confirmed publishing of events, with inbound dedup.

``publish_inbound`` is the heart of rule 1 and rule 3 of the architecture: a
provider gets its 2xx only when every event of its request is confirmed by the
broker (or was confirmed before: a duplicate), and a failed request leaves no
claim behind, so the provider's retry re-emits exactly what is missing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.trace import SpanKind

from gateway.api.v1.envelope_pb2 import Event
from gateway.contract.errors import TransientError
from gateway.runtime.bus import Bus
from gateway.runtime.codec import encode_event, event_routing_key
from gateway.runtime.idempotency import ClaimState, IdempotencyStore
from gateway.runtime.telemetry import DUPLICATES, EVENTS_PUBLISHED, PUBLISH_SECONDS, tracer
from gateway.runtime.topology import EVENTS_EXCHANGE

#: How long a claim may stay pending: a publish never takes longer than this.
_PENDING_TTL = 30.0
_POLL = 0.02


class ConcurrentDeliveryError(TransientError):
    """Another request is publishing the same event right now."""

    code = "concurrent_delivery"


@dataclass(frozen=True, slots=True)
class InboundOutcome:
    """What a webhook's events came to."""

    published: int
    duplicates: int


class EventPublisher:
    """Publishes one connector's events on ``channels.events`` with confirms."""

    def __init__(
        self,
        bus: Bus,
        store: IdempotencyStore,
        *,
        connector: str,
        publish_timeout: float,
        pending_wait: float,
    ) -> None:
        self._bus, self._store, self._connector = bus, store, connector
        self._timeout, self._pending_wait = publish_timeout, pending_wait

    async def publish(self, event: Event) -> None:
        """Publish one event and wait for the broker's confirm (no dedup)."""
        routing_key = event_routing_key(event)
        # A producer span per message (OTel messaging conventions); its context
        # is what the message's traceparent carries to consumers.
        with tracer().start_as_current_span(
            f"publish {EVENTS_EXCHANGE}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "send",
                "messaging.destination.name": EVENTS_EXCHANGE,
                "messaging.rabbitmq.destination.routing_key": routing_key,
                "messaging.message.id": event.id,
            },
        ):
            message = encode_event(event)
            started = time.perf_counter()
            await self._bus.publish(EVENTS_EXCHANGE, routing_key, message, timeout=self._timeout)
            PUBLISH_SECONDS.observe(time.perf_counter() - started)
        EVENTS_PUBLISHED.labels(self._connector, event.type).inc()

    async def _claim(self, key: str, ttl: float) -> ClaimState:
        deadline = time.monotonic() + self._pending_wait
        while True:
            claim = await self._store.claim(key, ttl=_PENDING_TTL)
            if claim.state is not ClaimState.PENDING or time.monotonic() >= deadline:
                return claim.state
            await asyncio.sleep(_POLL)

    async def publish_inbound(self, events: Sequence[Event], *, dedup_ttl: float) -> InboundOutcome:
        """Publish every event not seen before; raise unless all are confirmed.

        Raises :class:`TransientError` (a publish failed, or a concurrent copy
        of the same request is still in flight); the caller answers non-2xx.
        """
        unique = list({e.id: e for e in events}.values())
        if not unique:
            return InboundOutcome(published=0, duplicates=0)
        if len(unique) == 1:
            states = [await self._claim(unique[0].id, dedup_ttl)]
        else:
            states = list(await asyncio.gather(*(self._claim(e.id, dedup_ttl) for e in unique)))
        fresh = [e for e, s in zip(unique, states, strict=True) if s is ClaimState.NEW]
        duplicates = sum(s is ClaimState.DONE for s in states)
        in_flight = sum(s is ClaimState.PENDING for s in states)
        if duplicates:
            DUPLICATES.labels(self._connector).inc(duplicates)
        results: list[BaseException | None] = list(
            await asyncio.gather(*(self.publish(e) for e in fresh), return_exceptions=True)
        )
        failures: list[BaseException] = []
        for event, result in zip(fresh, results, strict=True):
            if result is None:
                await self._store.complete(event.id, "1", ttl=dedup_ttl)
            else:
                await self._store.release(event.id)
                failures.append(result)
        if failures:
            first = failures[0]
            if isinstance(first, TransientError):
                raise first
            raise TransientError(f"publish failed: {first!r}") from first
        if in_flight:
            raise ConcurrentDeliveryError(
                f"{in_flight} event(s) are being published by another request"
            )
        return InboundOutcome(published=len(fresh), duplicates=duplicates)
