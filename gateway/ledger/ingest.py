"""The status ingestor: ``message.status.#`` and ``call.command.#`` from the bus
into the ledger.

Statuses are applied with group commit: the deliveries in flight (up to the
prefetch) are applied together in one ledger transaction, and each handler
returns (so the bus acks) only after that commit; a crash redelivers what was
not committed and the event id makes a redelivery a no-op. A malformed event
is rejected to the dead-letter exchange; a database error requeues it. When a
batch fails, its statuses are retried one by one, so one bad status cannot
hold back the others.

Call command outcomes (``call.command`` events of the voice connectors) come
through the same queue and are applied one per transaction: they are few, and
:meth:`Ledger.record_call_outcome` is idempotent on its own.
"""

from __future__ import annotations

import asyncio

from gateway.api.v1.envelope_pb2 import Event
from gateway.contract.errors import BadRequestError
from gateway.ledger.calls import CallOutcome
from gateway.ledger.fallback import (
    ORIGIN_ATTRIBUTE,
    ORIGIN_LEDGER,
    EventEmitter,
    FallbackEngine,
    emit_notices,
)
from gateway.ledger.models import Applied, StatusUpdate
from gateway.ledger.store import Ledger
from gateway.runtime.bus import Bus, Delivery, Subscription
from gateway.runtime.codec import decode_event
from gateway.runtime.telemetry import get_logger
from gateway.runtime.topology import DEFAULT_DELIVERY_LIMIT, Topology, subscription_queue

log = get_logger("gateway.ledger.ingest")

#: The gateway's status queue on ``channels.events`` (statuses and call command outcomes).
DEFAULT_QUEUE = "gateway.ledger.statuses"
STATUS_PATTERN = "message.status.#"
#: Outcomes of call commands (``call.command.<channel>.<provider>``).
CALL_COMMAND_PATTERN = "call.command.#"
#: Every binding of the ledger's queue.
LEDGER_PATTERNS = (STATUS_PATTERN, CALL_COMMAND_PATTERN)


def _trace_id(traceparent: str) -> str:
    """The trace id of a W3C traceparent (``00-<32 hex>-<16 hex>-<2 hex>``), else ""."""
    parts = traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32:
        return parts[1]
    return ""


def status_update_from_event(event: Event) -> StatusUpdate:
    """The ledger update of a ``message.status`` event.

    The message is identified by ``status.message_id`` (else the event's
    ``causation_id``, which connectors set to the gateway message id) or the
    provider message id. Raises :class:`BadRequestError` for an event that is
    not a usable status.
    """
    if event.WhichOneof("payload") != "status":
        raise BadRequestError(f"event {event.id} of type {event.type!r} carries no status")
    status = event.status
    try:
        return StatusUpdate(
            state=status.state,
            message_id=status.message_id or event.causation_id,
            provider_message_id=status.provider_message_id,
            provider_status=status.provider_status,
            reason_code=status.reason_code,
            reason=status.reason,
            permanent=status.permanent,
            channel=event.channel,
            provider=event.provider,
            attempt=status.attempt,
            trace_id=_trace_id(event.traceparent),
            occurred_at=event.occurred_at.ToDatetime() if event.HasField("occurred_at") else None,
            event_id=event.id,
        )
    except ValueError as exc:
        raise BadRequestError(f"unusable status event {event.id}: {exc}") from exc


def call_outcome_from_event(event: Event) -> CallOutcome:
    """The ledger outcome of a ``call.command`` event (its command is
    ``call_command.command_id``, else the event's ``causation_id``). Raises
    :class:`BadRequestError` for an event that is not a usable outcome."""
    if event.WhichOneof("payload") != "call_command":
        raise BadRequestError(f"event {event.id} of type {event.type!r} carries no call outcome")
    result = event.call_command
    try:
        return CallOutcome(
            command_id=result.command_id or event.causation_id,
            outcome=result.outcome,
            action=result.action,
            channel=event.channel,
            provider=event.provider,
            account=event.account,
            call_id=result.call_id,
            provider_status=result.provider_status,
            reason_code=result.reason_code,
            reason=result.reason,
            permanent=result.permanent,
            correlation_id=event.correlation_id,
            conversation_id=event.conversation_id,
            event_id=event.id,
            occurred_at=event.occurred_at.ToDatetime() if event.HasField("occurred_at") else None,
        )
    except ValueError as exc:
        raise BadRequestError(f"unusable call command outcome {event.id}: {exc}") from exc


class GroupCommit:
    """Applies concurrently submitted statuses in shared ledger transactions."""

    def __init__(self, ledger: Ledger, *, max_batch: int = 256) -> None:
        if max_batch <= 0:
            raise ValueError("max_batch must be positive")
        self._ledger, self._max = ledger, max_batch
        self._waiting: list[tuple[StatusUpdate, asyncio.Future[Applied]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, update: StatusUpdate) -> Applied:
        """Apply ``update``; returns once the transaction that holds it committed."""
        future: asyncio.Future[Applied] = asyncio.get_running_loop().create_future()
        self._waiting.append((update, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="ledger group commit")
        return await future

    async def _flush(self) -> None:
        # Yield once so handlers started in the same loop iteration join the batch.
        await asyncio.sleep(0)
        while self._waiting:
            batch, self._waiting = self._waiting[: self._max], self._waiting[self._max :]
            try:
                results = await self._ledger.record_statuses([u for u, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to each waiting handler below
                if len(batch) == 1:
                    _settle(batch[0][1], exc)
                    continue
                log.warning("status batch failed; applying one by one", error=str(exc))
                for update, future in batch:
                    try:
                        _settle(future, await self._ledger.record_status(update))
                    except Exception as one:  # noqa: BLE001 - the handler re-raises it
                        _settle(future, one)
            else:
                for (_, future), applied in zip(batch, results, strict=True):
                    _settle(future, applied)


def _settle(future: asyncio.Future[Applied], outcome: Applied | BaseException) -> None:
    if future.done():  # the handler was cancelled
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class StatusIngestor:
    """Consumes ``message.status.#`` and ``call.command.#`` into the ledger.

    ``engine`` (optional) is woken when a status makes a fallback timer due;
    ``emit`` (optional) publishes late-delivery notices.
    """

    def __init__(
        self,
        bus: Bus,
        ledger: Ledger,
        *,
        engine: FallbackEngine | None = None,
        emit: EventEmitter | None = None,
        queue: str = DEFAULT_QUEUE,
        prefetch: int = 256,
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    ) -> None:
        self._bus, self._ledger, self._engine, self._emit = bus, ledger, engine, emit
        self._queue, self._prefetch, self._limit = queue, prefetch, delivery_limit
        self._subscription: Subscription | None = None
        self._group = GroupCommit(ledger, max_batch=max(1, prefetch))

    @property
    def queue(self) -> str:
        """Name of the status queue."""
        return self._queue

    def topology(self) -> Topology:
        """The ledger queue bound to :data:`LEDGER_PATTERNS` on ``channels.events``."""
        return Topology(queues=(subscription_queue(self._queue, LEDGER_PATTERNS, self._limit),))

    async def start(self) -> None:
        """Declare the queue and start consuming."""
        await self._bus.declare(self.topology())
        self._subscription = await self._bus.consume(
            self._queue, self.handle, prefetch=self._prefetch
        )

    async def stop(self) -> None:
        """Stop consuming; handlers in flight finish, unacked deliveries are requeued."""
        if self._subscription is not None:
            await self._subscription.cancel()
            self._subscription = None

    async def handle(self, delivery: Delivery) -> None:
        """Apply one status delivery (acked by the bus when this returns)."""
        event = decode_event(delivery)
        if event.attributes.get(ORIGIN_ATTRIBUTE) == ORIGIN_LEDGER:
            return  # our own notice: already in the ledger
        if event.WhichOneof("payload") == "call_command":
            outcome = await self._ledger.record_call_outcome(call_outcome_from_event(event))
            if outcome.created:
                log.info(
                    "outcome of a call command the gateway did not send",
                    command_id=outcome.record.command_id,
                )
            elif not outcome.changed:
                log.debug("duplicate or late call command outcome", event_id=event.id)
            return
        applied = await self.apply(event)
        for result in (applied, *applied.released):
            if result.fallback_due and self._engine is not None:
                self._engine.wake()
            await emit_notices(self._emit, result.record, result.entries)

    async def apply(self, event: Event) -> Applied:
        """Apply one status event to the ledger (without the bus), group-committed with
        the other events being applied at the same time."""
        update = status_update_from_event(event)
        applied = await self._group.submit(update)
        return applied
