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
from prometheus_client import Counter

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
        # Labelled metric children, looked up once rather than per event.
        self._published: dict[str, Counter] = {}
        self._duplicates = DUPLICATES.labels(connector)

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
        counter = self._published.get(event.type)
        if counter is None:
            counter = self._published[event.type] = EVENTS_PUBLISHED.labels(
                self._connector, event.type
            )
        counter.inc()

    async def _claim(self, key: str) -> ClaimState:
        claim = await self._store.claim(key, ttl=_PENDING_TTL)
        if claim.state is not ClaimState.PENDING or not self._pending_wait:
            return claim.state
        # A concurrent copy of this request is publishing: wait a little for it.
        deadline = time.monotonic() + self._pending_wait
        while claim.state is ClaimState.PENDING and time.monotonic() < deadline:
            await asyncio.sleep(_POLL)
            claim = await self._store.claim(key, ttl=_PENDING_TTL)
        return claim.state

    async def _publish_claimed(self, event: Event, dedup_ttl: float) -> None:
        """Publish an event we hold the claim of; complete the claim, or release it."""
        try:
            await self.publish(event)
        except BaseException:
            # Cancelled or failed: no claim may stay behind, the retry must re-emit.
            await self._store.release(event.id)
            raise
        await self._store.complete(event.id, "1", ttl=dedup_ttl)

    async def publish_inbound(self, events: Sequence[Event], *, dedup_ttl: float) -> InboundOutcome:
        """Publish every event not seen before; raise unless all are confirmed.

        Raises :class:`TransientError` (a publish failed, or a concurrent copy
        of the same request is still in flight); the caller answers non-2xx.
        """
        if len(events) == 1:
            # The common case (one webhook, one event), without tasks or lists.
            event = events[0]
            state = await self._claim(event.id)
            if state is ClaimState.DONE:
                self._duplicates.inc()
                return InboundOutcome(published=0, duplicates=1)
            if state is ClaimState.PENDING:
                raise ConcurrentDeliveryError("1 event(s) are being published by another request")
            try:
                await self._publish_claimed(event, dedup_ttl)
            except TransientError:
                raise
            except Exception as exc:
                raise TransientError(f"publish failed: {exc!r}") from exc
            return InboundOutcome(published=1, duplicates=0)
        unique = list({e.id: e for e in events}.values())
        if not unique:
            return InboundOutcome(published=0, duplicates=0)
        states = list(await asyncio.gather(*(self._claim(e.id) for e in unique)))
        fresh = [e for e, s in zip(unique, states, strict=True) if s is ClaimState.NEW]
        duplicates = sum(s is ClaimState.DONE for s in states)
        in_flight = sum(s is ClaimState.PENDING for s in states)
        if duplicates:
            self._duplicates.inc(duplicates)
        results: list[BaseException | None] = list(
            await asyncio.gather(
                *(self._publish_claimed(e, dedup_ttl) for e in fresh), return_exceptions=True
            )
        )
        failures = [r for r in results if r is not None]
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
