"""The fallback engine: runs the ledger's persisted fallback timers.

Timers live in the ledger (``ledger_timers``), never only in memory, so a
gateway restart (or another replica on the same database) picks them up. The
engine:

- fires due timers (:meth:`Ledger.fire_timer` decides in one locked
  transaction: done, switch to the next step, exhausted, or TTL expired);
- publishes the next step's ``SendMessageCommand`` and marks it dispatched;
  a publish that fails is retried by the outbox replay (attempts whose command
  was never confirmed), and connectors send a ``message_id:attempt`` at most
  once, so a replay never sends twice;
- emits the gateway's own status events (SWITCHING_CHANNEL, the final
  exhausted/expired status, late deliveries) through an optional ``emit``
  callback, e.g. :meth:`gateway.runtime.publisher.EventPublisher.publish`.

A rejection is noticed as soon as the status is applied: the ledger makes the
timer due now and the :class:`~gateway.ledger.ingest.StatusIngestor` calls
:meth:`FallbackEngine.wake`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.exc import SQLAlchemyError

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.delivery_pb2 import DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract.ids import NAMESPACE
from gateway.ledger.models import EntryKind, MessageRecord, StatusEntry
from gateway.ledger.store import Ledger, TimerAction, TimerOutcome
from gateway.runtime.bus import Bus, PublishError
from gateway.runtime.codec import encode_command
from gateway.runtime.telemetry import get_logger
from gateway.runtime.topology import COMMANDS_EXCHANGE

log = get_logger("gateway.ledger.fallback")

CommandPublisher = Callable[[SendMessageCommand], Awaitable[None]]
EventEmitter = Callable[[Event], Awaitable[None]]

#: ``Event.attributes`` key marking events the ledger emits itself (the
#: status ingestor skips them: they are already in the ledger).
ORIGIN_ATTRIBUTE = "gateway.origin"
ORIGIN_LEDGER = "ledger"
#: ``Event.attributes`` key with the timeline entry kind of a ledger notice.
KIND_ATTRIBUTE = "gateway.entry_kind"
#: ``Event.attributes`` key set to "true" on a late-delivery notice.
LATE_DELIVERY_ATTRIBUTE = "gateway.late_delivery"


def bus_command_publisher(bus: Bus, *, timeout: float = 5.0) -> CommandPublisher:
    """Publish commands on ``channels.commands`` (routing key ``send.<channel>.<provider>``)
    with confirms; raises :class:`~gateway.runtime.bus.PublishError` if unconfirmed."""

    async def publish(command: SendMessageCommand) -> None:
        routing_key, message = encode_command(command)
        await bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=timeout)

    return publish


def notice_event(record: MessageRecord, entry: StatusEntry) -> Event:
    """The ``message.status`` event of a timeline entry the ledger produced.

    Its id is derived from the entry's event id, so re-emitting it after a
    crash dedupes downstream. Late deliveries carry
    ``attributes["gateway.late_delivery"] = "true"`` and reason code
    ``late_delivery``.
    """
    address = next((a.address for a in record.attempts if a.attempt == entry.attempt), "")
    status = DeliveryStatus(
        state=entry.state,  # type: ignore[arg-type]
        provider_status=entry.provider_status,
        reason_code=entry.reason_code,
        reason=entry.reason,
        permanent=entry.permanent,
        attempt=entry.attempt,
        provider_message_id=entry.provider_message_id,
        message_id=record.message_id,
        recipient=address,
    )
    occurred = Timestamp()
    occurred.FromDatetime(entry.occurred_at or entry.recorded_at)
    recorded = Timestamp()
    recorded.FromDatetime(entry.recorded_at)
    event = Event(
        id=str(uuid.uuid5(NAMESPACE, f"ledger-notice\x1f{entry.kind}\x1f{entry.event_id}")),
        type="message.status",
        channel=entry.channel,
        provider=entry.provider,
        occurred_at=occurred,
        received_at=recorded,
        correlation_id=record.correlation_id,
        causation_id=record.message_id,
        conversation_id=record.conversation_id,
        status=status,
    )
    event.attributes.update(record.metadata)
    event.attributes[ORIGIN_ATTRIBUTE] = ORIGIN_LEDGER
    event.attributes[KIND_ATTRIBUTE] = entry.kind.value
    if entry.kind is EntryKind.LATE_DELIVERY:
        event.attributes[LATE_DELIVERY_ATTRIBUTE] = "true"
    return event


async def emit_notices(
    emit: EventEmitter | None, record: MessageRecord | None, entries: Iterable[StatusEntry]
) -> None:
    """Emit the entries the gateway decided (transitions and late deliveries)."""
    if emit is None or record is None:
        return
    for entry in entries:
        if entry.kind is not EntryKind.ATTEMPT:
            await emit(notice_event(record, entry))


class FallbackEngine:
    """Fires fallback timers from the ledger and publishes the next step's command.

    Several engines (replicas) may run on one database: firing a timer is
    decided under the message's row lock, so a step is started once.

    Each pass also replays the command of every message whose current attempt
    was never confirmed (:meth:`Ledger.mark_dispatched`) and is older than
    ``dispatch_grace``: an outbox for the server's first sends as much as for
    fallback steps. Keep ``dispatch_grace`` above the publish timeout, so a
    publish still waiting for its confirm is not replayed.
    """

    def __init__(
        self,
        ledger: Ledger,
        publish: CommandPublisher,
        *,
        emit: EventEmitter | None = None,
        poll_interval: float = 1.0,
        batch_size: int = 100,
        dispatch_grace: timedelta = timedelta(seconds=10),
    ) -> None:
        if poll_interval <= 0 or batch_size <= 0:
            raise ValueError("poll_interval and batch_size must be positive")
        self._ledger, self._publish, self._emit = ledger, publish, emit
        self._poll, self._batch, self._grace = poll_interval, batch_size, dispatch_grace
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Look at due timers now (a status made one due)."""
        self._wake.set()

    async def run_once(self, now: datetime | None = None) -> list[TimerOutcome]:
        """Fire every due timer and replay unconfirmed commands; returns what was done."""
        at = now or self._ledger.now()
        outcomes: list[TimerOutcome] = []
        await self._replay_undispatched(at)
        while True:
            timers = await self._ledger.due_timers(at, limit=self._batch)
            fired = 0
            for timer in timers:
                outcome = await self._ledger.fire_timer(timer.message_id, at)
                if outcome.action == TimerAction.NOTHING:
                    continue
                fired += 1
                outcomes.append(outcome)
                await self._after(outcome)
            if fired == 0 or len(timers) < self._batch:
                return outcomes

    async def _after(self, outcome: TimerOutcome) -> None:
        record = outcome.record
        log.info(
            "fallback timer fired",
            action=outcome.action,
            message_id=record.message_id if record else None,
            attempt=record.attempt if record else None,
        )
        await emit_notices(self._emit, record, outcome.entries)
        for released in outcome.released:
            await emit_notices(self._emit, released.record, released.entries)
        if outcome.command is not None and record is not None:
            await self._dispatch(outcome.command)

    async def _dispatch(self, command: SendMessageCommand) -> None:
        try:
            await self._publish(command)
        except PublishError as exc:
            # The attempt stays undispatched; the replay publishes it later.
            log.warning(
                "fallback command not confirmed; will replay",
                message_id=command.message_id,
                attempt=command.attempt,
                error=str(exc),
            )
            return
        await self._ledger.mark_dispatched(command.message_id, command.attempt)

    async def _replay_undispatched(self, at: datetime) -> None:
        for message_id, attempt in await self._ledger.undispatched(
            at - self._grace, limit=self._batch
        ):
            command = await self._ledger.command_for(message_id, attempt)
            await self._dispatch(command)

    async def start(self) -> None:
        """Run the engine in a background task until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="fallback engine")

    async def stop(self) -> None:
        """Stop the background task (timers stay in the ledger)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.run_once()
            except (SQLAlchemyError, OSError, PublishError) as exc:
                # Database or broker hiccup: timers are persisted, try again.
                log.warning("fallback engine pass failed", error=str(exc))
            except Exception:  # the loop must outlive one bad pass
                log.exception("fallback engine pass failed; retrying")
            delay = self._poll
            due = await self._next_due()
            if due is not None:
                delay = max(0.0, min(delay, (due - self._ledger.now()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def _next_due(self) -> datetime | None:
        try:
            return await self._ledger.next_timer_due()
        except (SQLAlchemyError, OSError):
            return None
