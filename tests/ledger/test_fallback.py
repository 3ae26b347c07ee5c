"""Fallback: reject -> next channel, timeout -> next channel, exhausted, TTL, late
delivery, and timers surviving a restart. In-memory bus, fake clock, both backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Text
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.ledger import (
    REASON_FALLBACK_EXHAUSTED,
    REASON_FALLBACK_TTL,
    REASON_LATE_DELIVERY,
    REASON_REJECTED,
    REASON_TIMEOUT,
    EntryKind,
    FallbackEngine,
    FallbackPolicy,
    FallbackStep,
    Ledger,
    MessageRecord,
    NewMessage,
    StatusIngestor,
    StatusUpdate,
    TimerAction,
    bus_command_publisher,
)
from gateway.ledger.fallback import LATE_DELIVERY_ATTRIBUTE
from gateway.runtime.bus import Delivery
from gateway.runtime.codec import EVENT_TYPE_NAME, decode_command, encode_event, event_routing_key
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.topology import (
    EVENTS_EXCHANGE,
    base_topology,
    command_queue,
    command_queue_name,
)
from tests.ledger.conftest import Backend, FakeClock

S = DeliveryState
CONNECTORS = (("sms", "twilio"), ("whatsapp", "meta"), ("email", "sendgrid"))
STEPS = (
    FallbackStep(
        channel="sms", provider="twilio", address="+15550001111", wait=timedelta(seconds=60)
    ),
    FallbackStep(
        channel="whatsapp",
        provider="meta",
        address="15550001111",
        success_state=S.DELIVERY_STATE_READ,
        wait=timedelta(seconds=120),
    ),
    FallbackStep(
        channel="email",
        provider="sendgrid",
        address="a@example.com",
        success_state=S.DELIVERY_STATE_SENT,
        wait=timedelta(seconds=300),
    ),
)


@pytest.fixture
async def bus() -> AsyncIterator[InMemoryBus]:
    memory = InMemoryBus()
    await memory.connect()
    topology = base_topology()
    for channel, provider in CONNECTORS:
        topology = topology.merge(
            type(topology)(queues=(command_queue(channel, provider, delivery_limit=5),))
        )
    await memory.declare(topology)
    yield memory
    await memory.close()


class Emitted:
    """Collects the events the ledger emits."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.arrived = asyncio.Event()

    async def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.arrived.set()


@pytest.fixture
def emitted() -> Emitted:
    return Emitted()


@pytest.fixture
def engine(ledger: Ledger, bus: InMemoryBus, emitted: Emitted) -> FallbackEngine:
    return FallbackEngine(ledger, bus_command_publisher(bus), emit=emitted)


def first_command(message_id: str) -> SendMessageCommand:
    return SendMessageCommand(
        message_id=message_id,
        channel="sms",
        provider="twilio",
        account="main",
        attempt=1,
        correlation_id="corr-1",
        message=Message(
            sender=Participant(channel="sms", address="+15559990000"),
            recipients=[Participant(channel="sms", address="+15550001111")],
            text=Text(body="Your code is 123456"),
        ),
    )


async def accept(
    ledger: Ledger, key: str = "k1", steps: tuple[FallbackStep, ...] = STEPS, ttl: float = 3600
) -> MessageRecord:
    message_id = f"msg-{key}"
    record, created = await ledger.accept(
        NewMessage(
            idempotency_key=key,
            message_id=message_id,
            channel="sms",
            provider="twilio",
            address="+15550001111",
            correlation_id="corr-1",
            command=first_command(message_id).SerializeToString(),
            fallback=FallbackPolicy(steps=steps, ttl=timedelta(seconds=ttl)),
        )
    )
    assert created
    assert record.fallback_active
    return record


async def commands(bus: InMemoryBus, channel: str, provider: str) -> list[SendMessageCommand]:
    queue = command_queue_name(channel, provider)
    return [
        decode_command(await bus.get(queue, timeout=0.5)) for _ in range(bus.queue_depth(queue))
    ]


def status(message_id: str, state: int, attempt: int, **kwargs: object) -> StatusUpdate:
    step = STEPS[attempt - 1]
    return StatusUpdate(
        state=state,
        message_id=message_id,
        attempt=attempt,
        channel=step.channel,
        provider=step.provider,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_rejection_switches_to_the_next_channel(
    ledger: Ledger, engine: FallbackEngine, bus: InMemoryBus, emitted: Emitted
) -> None:
    record = await accept(ledger)
    applied = await ledger.record_status(
        status(record.message_id, S.DELIVERY_STATE_FAILED, 1, reason_code="30003")
    )
    assert applied.fallback_due
    # The message does not end: the rejection is an attempt entry.
    assert applied.record is not None
    assert applied.record.state == S.DELIVERY_STATE_ACCEPTED
    [outcome] = await engine.run_once()
    assert outcome.action == TimerAction.SWITCHED

    [command] = await commands(bus, "whatsapp", "meta")
    assert command.message_id == record.message_id
    assert command.attempt == 2
    assert [(p.channel, p.address) for p in command.message.recipients] == [
        ("whatsapp", "15550001111")
    ]
    assert command.account == ""
    assert not command.message.HasField("sender")
    assert command.message.text.body == "Your code is 123456"
    assert command.correlation_id == "corr-1"

    after = await ledger.get(record.message_id)
    assert (after.state, after.attempt, after.channel) == (S.DELIVERY_STATE_ACCEPTED, 2, "whatsapp")
    assert after.dispatched
    assert [(e.kind, e.state, e.attempt, e.reason_code) for e in after.timeline] == [
        (EntryKind.TRANSITION, S.DELIVERY_STATE_ACCEPTED, 1, ""),
        (EntryKind.ATTEMPT, S.DELIVERY_STATE_FAILED, 1, "30003"),
        (EntryKind.TRANSITION, S.DELIVERY_STATE_SWITCHING_CHANNEL, 1, REASON_REJECTED),
        (EntryKind.TRANSITION, S.DELIVERY_STATE_ACCEPTED, 2, ""),
    ]
    assert [e.status.state for e in emitted.events] == [
        S.DELIVERY_STATE_SWITCHING_CHANNEL,
        S.DELIVERY_STATE_ACCEPTED,
    ]
    # Nothing more to do until the new step's wait runs out.
    assert await engine.run_once() == []


async def test_timeout_switches_and_success_stops_the_fallback(
    ledger: Ledger, engine: FallbackEngine, bus: InMemoryBus, clock: FakeClock
) -> None:
    record = await accept(ledger)
    await ledger.record_status(
        status(record.message_id, S.DELIVERY_STATE_SENT, 1, provider_message_id="SM1")
    )
    clock.advance(seconds=59)
    assert await engine.run_once() == []
    clock.advance(seconds=2)
    [outcome] = await engine.run_once()
    assert outcome.action == TimerAction.SWITCHED
    assert outcome.entries[0].reason_code == REASON_TIMEOUT
    assert len(await commands(bus, "whatsapp", "meta")) == 1

    # Step 2 succeeds on READ only: DELIVERED keeps the timer, READ ends it.
    await ledger.record_status(status(record.message_id, S.DELIVERY_STATE_DELIVERED, 2))
    assert (await ledger.get(record.message_id)).fallback_active
    done = await ledger.apply_status(status(record.message_id, S.DELIVERY_STATE_READ, 2))
    assert done is not None
    assert done.state == S.DELIVERY_STATE_READ
    assert not done.fallback_active
    clock.advance(hours=2)
    assert await engine.run_once() == []
    assert await commands(bus, "email", "sendgrid") == []


async def test_all_channels_exhausted_ends_failed(
    ledger: Ledger, engine: FallbackEngine, bus: InMemoryBus, clock: FakeClock, emitted: Emitted
) -> None:
    record = await accept(ledger)
    await ledger.record_status(status(record.message_id, S.DELIVERY_STATE_UNDELIVERED, 1))
    await engine.run_once()
    clock.advance(seconds=121)  # whatsapp never answers
    await engine.run_once()
    await ledger.record_status(status(record.message_id, S.DELIVERY_STATE_FAILED, 3))
    [outcome] = await engine.run_once()
    assert outcome.action == TimerAction.EXHAUSTED

    final = await ledger.get(record.message_id)
    assert final.state == S.DELIVERY_STATE_FAILED
    assert final.reason_code == REASON_FALLBACK_EXHAUSTED
    assert not final.fallback_active
    assert [a.channel for a in final.attempts] == ["sms", "whatsapp", "email"]
    assert [e.state for e in final.timeline if e.kind is EntryKind.TRANSITION] == [
        S.DELIVERY_STATE_ACCEPTED,
        S.DELIVERY_STATE_SWITCHING_CHANNEL,
        S.DELIVERY_STATE_ACCEPTED,
        S.DELIVERY_STATE_SWITCHING_CHANNEL,
        S.DELIVERY_STATE_ACCEPTED,
        S.DELIVERY_STATE_FAILED,
    ]
    assert emitted.events[-1].status.reason_code == REASON_FALLBACK_EXHAUSTED
    # Final means final: a late DELIVERED of the last attempt does not reopen it.
    late = await ledger.apply_status(status(record.message_id, S.DELIVERY_STATE_SENT, 3))
    assert late is not None
    assert late.state == S.DELIVERY_STATE_FAILED


async def test_ttl_ends_the_fallback_expired(
    ledger: Ledger, engine: FallbackEngine, clock: FakeClock
) -> None:
    record = await accept(ledger, ttl=90)
    clock.advance(seconds=61)
    [switched] = await engine.run_once()
    assert switched.action == TimerAction.SWITCHED
    clock.advance(seconds=30)  # step 2 waits 120 s, but the TTL (90 s) comes first
    [expired] = await engine.run_once()
    assert expired.action == TimerAction.EXPIRED
    final = await ledger.get(record.message_id)
    assert final.state == S.DELIVERY_STATE_EXPIRED
    assert final.reason_code == REASON_FALLBACK_TTL


async def test_late_delivery_of_the_first_channel_is_marked(
    ledger: Ledger, engine: FallbackEngine, clock: FakeClock, emitted: Emitted
) -> None:
    record = await accept(ledger)
    await ledger.record_status(
        status(record.message_id, S.DELIVERY_STATE_SENT, 1, provider_message_id="SM1")
    )
    clock.advance(seconds=61)
    await engine.run_once()
    emitted.events.clear()
    # Twilio's callback only carries its SID (and says attempt 1 whatever happened).
    late = await ledger.record_status(
        StatusUpdate(
            state=S.DELIVERY_STATE_DELIVERED,
            provider_message_id="SM1",
            channel="sms",
            provider="twilio",
            attempt=1,
        )
    )
    [entry] = late.entries
    assert entry.kind is EntryKind.LATE_DELIVERY
    assert entry.attempt == 1
    assert entry.reason_code == REASON_LATE_DELIVERY
    assert late.record is not None
    assert late.record.late_delivery
    assert late.record.state == S.DELIVERY_STATE_DELIVERED
    # The recipient has it: no third channel.
    assert not late.record.fallback_active
    clock.advance(hours=1)
    assert await engine.run_once() == []
    # The second channel's statuses still land in the timeline.
    await ledger.record_status(status(record.message_id, S.DELIVERY_STATE_READ, 2))
    assert (await ledger.get(record.message_id)).state == S.DELIVERY_STATE_READ


async def test_ingestor_applies_bus_statuses_and_emits_late_delivery(
    ledger: Ledger, engine: FallbackEngine, bus: InMemoryBus, clock: FakeClock, emitted: Emitted
) -> None:
    record = await accept(ledger)
    ingestor = StatusIngestor(bus, ledger, engine=engine, emit=emitted)
    await ingestor.start()
    try:
        clock.advance(seconds=61)
        await engine.run_once()
        emitted.events.clear()
        emitted.arrived.clear()
        event = Event(id="ev-late", type="message.status", channel="sms", provider="twilio")
        event.status.state = S.DELIVERY_STATE_DELIVERED
        event.status.message_id = record.message_id
        event.status.attempt = 1
        await bus.publish(EVENTS_EXCHANGE, event_routing_key(event), encode_event(event), timeout=1)
        async with asyncio.timeout(5):
            await emitted.arrived.wait()
    finally:
        await ingestor.stop()
    [notice] = emitted.events
    assert notice.attributes[LATE_DELIVERY_ATTRIBUTE] == "true"
    assert notice.status.state == S.DELIVERY_STATE_DELIVERED
    assert notice.status.message_id == record.message_id
    assert notice.status.attempt == 1
    assert notice.status.recipient == "+15550001111"
    assert notice.correlation_id == "corr-1"
    before = await ledger.get(record.message_id)
    assert before.late_delivery
    # The ledger's own notice coming back through the bus is skipped, and acked.
    await ingestor.handle(
        Delivery(
            body=notice.SerializeToString(),
            message_id=notice.id,
            type=EVENT_TYPE_NAME,
            content_type="application/protobuf",
            headers={},
            exchange=EVENTS_EXCHANGE,
            routing_key=event_routing_key(notice),
            redelivered=False,
        )
    )
    assert (await ledger.get(record.message_id)).timeline == before.timeline


async def test_status_of_a_step_not_started_yet_waits_for_it(
    ledger: Ledger, engine: FallbackEngine, clock: FakeClock
) -> None:
    record = await accept(ledger)
    early = await ledger.record_status(status(record.message_id, S.DELIVERY_STATE_READ, 2))
    assert early.pending
    clock.advance(seconds=61)
    await engine.run_once()
    after = await ledger.get(record.message_id)
    assert after.state == S.DELIVERY_STATE_READ
    assert not after.fallback_active


async def test_timers_survive_a_restart(
    backend: Backend, clock: FakeClock, bus: InMemoryBus
) -> None:
    first = backend.open(clock)
    await first.migrate()
    record = await accept(first)
    await first.record_status(status(record.message_id, S.DELIVERY_STATE_SENT, 1))
    await first.close()

    clock.advance(seconds=61)
    second = backend.open(clock)
    try:
        engine = FallbackEngine(second, bus_command_publisher(bus))
        [outcome] = await engine.run_once()
        assert outcome.action == TimerAction.SWITCHED
        assert len(await commands(bus, "whatsapp", "meta")) == 1
        assert (await second.get(record.message_id)).attempt == 2
    finally:
        await second.close()


async def test_unconfirmed_command_is_replayed(
    ledger: Ledger, bus: InMemoryBus, clock: FakeClock
) -> None:
    engine = FallbackEngine(ledger, bus_command_publisher(bus), dispatch_grace=timedelta(seconds=5))
    record = await accept(ledger)
    await ledger.mark_dispatched(record.message_id, 1)
    await ledger.record_status(status(record.message_id, S.DELIVERY_STATE_FAILED, 1))
    bus.available = False  # broker down while switching
    [outcome] = await engine.run_once()
    assert outcome.action == TimerAction.SWITCHED
    assert not (await ledger.get(record.message_id)).dispatched
    bus.available = True
    clock.advance(seconds=6)
    await engine.run_once()
    [command] = await commands(bus, "whatsapp", "meta")
    assert command.attempt == 2
    assert (await ledger.get(record.message_id)).dispatched


async def test_engine_loop_reacts_to_a_rejection(
    ledger: Ledger, bus: InMemoryBus, emitted: Emitted
) -> None:
    engine = FallbackEngine(ledger, bus_command_publisher(bus), emit=emitted, poll_interval=30)
    record = await accept(ledger)
    await engine.start()
    try:
        await ledger.record_status(status(record.message_id, S.DELIVERY_STATE_FAILED, 1))
        engine.wake()
        command = decode_command(await bus.get(command_queue_name("whatsapp", "meta"), timeout=5))
    finally:
        await engine.stop()
    assert (await ledger.get(record.message_id)).attempt == 2
    assert command.attempt == 2


async def test_a_late_delivery_released_from_pending_is_still_announced(
    ledger: Ledger, engine: FallbackEngine, bus: InMemoryBus, clock: FakeClock, emitted: Emitted
) -> None:
    record = await accept(ledger)
    clock.advance(seconds=61)
    await engine.run_once()  # switched to whatsapp without any status from sms
    ingestor = StatusIngestor(bus, ledger, engine=engine, emit=emitted)
    emitted.events.clear()

    def sms_event(event_id: str, state: int, message_id: str) -> Event:
        event = Event(id=event_id, type="message.status", channel="sms", provider="twilio")
        event.status.state = state  # type: ignore[assignment]
        event.status.message_id = message_id
        event.status.provider_message_id = "SM-late"
        event.status.attempt = 1
        return event

    # The carrier's receipt only carries the SID, and comes before the SENT that links it.
    receipt = await ingestor.apply(sms_event("ev-dlr", S.DELIVERY_STATE_DELIVERED, ""))
    assert receipt.pending
    sent = sms_event("ev-sent", S.DELIVERY_STATE_SENT, record.message_id)
    await ingestor.handle(
        Delivery(
            body=sent.SerializeToString(),
            message_id=sent.id,
            type=EVENT_TYPE_NAME,
            content_type="application/protobuf",
            headers={},
            exchange=EVENTS_EXCHANGE,
            routing_key=event_routing_key(sent),
            redelivered=False,
        )
    )
    late = [e for e in emitted.events if e.attributes.get(LATE_DELIVERY_ATTRIBUTE) == "true"]
    assert [e.status.attempt for e in late] == [1]
    assert (await ledger.get(record.message_id)).late_delivery
