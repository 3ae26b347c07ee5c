"""Confirmed publishing of events, with inbound dedup.

``publish_inbound`` is the heart of rule 1 and rule 3 of the architecture: a
provider gets its 2xx only when every event of its request is confirmed by the
broker (or was confirmed before: a duplicate), and a failed request leaves no
claim behind, so the provider's retry re-emits exactly what is missing.

With a :class:`~gateway.runtime.spool.Spool` (connectors whose spec sets
``spool_on_outage``), an event the broker did not confirm is written to the
durable spool instead, and counts as accepted: its dedup claim is completed,
so the provider's retry is a duplicate, and the spool's drainer republishes
it once the broker is back. Only broker failures spool; a dedup-store failure,
an unroutable event or a full spool still raise (and the webhook gets 503).
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
from gateway.runtime.bus import Bus, OutgoingMessage, UnroutableError
from gateway.runtime.codec import encode_event, event_routing_key
from gateway.runtime.idempotency import ClaimState, IdempotencyStore
from gateway.runtime.spool import Spool, SpoolError
from gateway.runtime.telemetry import (
    DUPLICATES,
    EVENTS_PUBLISHED,
    PUBLISH_SECONDS,
    SPOOL_REFUSED,
    SPOOLED,
    get_logger,
    tracer,
)
from gateway.runtime.topology import EVENTS_EXCHANGE

#: How long a claim may stay pending: a publish never takes longer than this.
_PENDING_TTL = 30.0
_POLL = 0.02

log = get_logger("gateway.publisher")


class ConcurrentDeliveryError(TransientError):
    """Another request is publishing the same event right now."""

    code = "concurrent_delivery"


@dataclass(frozen=True, slots=True)
class InboundOutcome:
    """What a webhook's events came to."""

    published: int
    duplicates: int
    #: Events written to the durable spool (accepted, republished later).
    spooled: int = 0


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
        spool: Spool | None = None,
    ) -> None:
        self._bus, self._store, self._connector = bus, store, connector
        self._timeout, self._pending_wait = publish_timeout, pending_wait
        self._spool = spool
        # Labelled metric children, looked up once rather than per event.
        self._published: dict[str, Counter] = {}
        self._duplicates = DUPLICATES.labels(connector)
        self._spooled = SPOOLED.labels(connector)

    @property
    def spool(self) -> Spool | None:
        """The spool unconfirmed events fall back to (None: they raise)."""
        return self._spool

    async def publish(self, event: Event) -> None:
        """Publish one event and wait for the broker's confirm (no dedup, no spool)."""
        await self._publish(event, spool=None)

    async def _publish(self, event: Event, spool: Spool | None) -> bool:
        """Publish with confirm, or spool it when the broker failed; True when spooled."""
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
        ) as span:
            message = encode_event(event)
            started = time.perf_counter()
            try:
                await self._bus.publish(
                    EVENTS_EXCHANGE, routing_key, message, timeout=self._timeout
                )
            except UnroutableError:
                # Not an outage: a replay would be refused the same way.
                raise
            except TransientError as exc:
                if spool is None:
                    raise
                await self._to_spool(spool, routing_key, message, exc)
                span.set_attribute("gateway.spooled", True)
                return True
            PUBLISH_SECONDS.observe(time.perf_counter() - started)
        counter = self._published.get(event.type)
        if counter is None:
            counter = self._published[event.type] = EVENTS_PUBLISHED.labels(
                self._connector, event.type
            )
        counter.inc()
        return False

    async def _to_spool(
        self, spool: Spool, routing_key: str, message: OutgoingMessage, cause: TransientError
    ) -> None:
        # The message exactly as attempted (headers, traceparent, ids), so the
        # replay is the same publish.
        try:
            await spool.put(self._connector, EVENTS_EXCHANGE, routing_key, message)
        except SpoolError as exc:
            SPOOL_REFUSED.labels(self._connector, exc.code).inc()
            log.error(
                "event not spooled: broker and spool both refused it",
                connector=self._connector,
                message_id=message.message_id,
                broker_error=str(cause),
                spool_error=str(exc),
            )
            raise type(exc)(f"{cause}; and not spooled: {exc}") from cause
        self._spooled.inc()
        log.warning(
            "event spooled: broker did not confirm it",
            connector=self._connector,
            message_id=message.message_id,
            routing_key=routing_key,
            error=str(cause),
            code=cause.code,
        )

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

    async def _publish_claimed(self, event: Event, dedup_ttl: float) -> bool:
        """Publish (or spool) an event we hold the claim of; complete the claim, or
        release it. True when the event was spooled."""
        try:
            spooled = await self._publish(event, self._spool)
        except BaseException:
            # Cancelled or failed: no claim may stay behind, the retry must re-emit.
            await self._store.release(event.id)
            raise
        # A spooled event is accepted: the provider's retry must be a duplicate.
        await self._store.complete(event.id, "1", ttl=dedup_ttl)
        return spooled

    async def publish_inbound(self, events: Sequence[Event], *, dedup_ttl: float) -> InboundOutcome:
        """Publish every event not seen before; raise unless all are confirmed or spooled.

        Raises :class:`TransientError` (a publish failed and was not spooled,
        or a concurrent copy of the same request is still in flight); the
        caller answers non-2xx.
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
                spooled = await self._publish_claimed(event, dedup_ttl)
            except TransientError:
                raise
            except Exception as exc:
                raise TransientError(f"publish failed: {exc!r}") from exc
            if spooled:
                return InboundOutcome(published=0, duplicates=0, spooled=1)
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
        results: list[BaseException | bool] = list(
            await asyncio.gather(
                *(self._publish_claimed(e, dedup_ttl) for e in fresh), return_exceptions=True
            )
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            first = failures[0]
            if isinstance(first, TransientError):
                raise first
            raise TransientError(f"publish failed: {first!r}") from first
        if in_flight:
            raise ConcurrentDeliveryError(
                f"{in_flight} event(s) are being published by another request"
            )
        spooled_count = sum(r is True for r in results)
        return InboundOutcome(
            published=len(fresh) - spooled_count, duplicates=duplicates, spooled=spooled_count
        )
