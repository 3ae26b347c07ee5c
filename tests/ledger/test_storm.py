"""Out-of-order and duplicate status storm: 1,000 messages, callbacks shuffled and
duplicated, 10% of the messages' statuses arriving before the send is recorded.

Statuses go the production way (``message.status.*`` events on the bus, the
StatusIngestor's group commit) while sends are accepted concurrently; every
message must end in the state the contract's ordering says.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable

from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract.status import fold
from gateway.ledger import EntryKind, Ledger, NewMessage, StatusIngestor
from gateway.runtime.codec import encode_event, event_routing_key
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.topology import EVENTS_EXCHANGE, base_topology

S = DeliveryState
MESSAGES = 1000
EARLY_SHARE = 0.10
DUPLICATE_SHARE = 0.25
WORKERS = 8

#: Status sequences whose final state does not depend on arrival order.
SCENARIOS: tuple[tuple[int, ...], ...] = (
    (S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_DELIVERED),
    (S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_READ),
    (S.DELIVERY_STATE_QUEUED, S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_UNDELIVERED),
    (S.DELIVERY_STATE_QUEUED, S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_FAILED),
    (S.DELIVERY_STATE_SENT,),
)


def status_events(index: int, rng: random.Random) -> tuple[str, list[Event], int]:
    """A message's status events (as connectors publish them) and its expected final state."""
    message_id = f"storm-{index:04d}"
    provider_id = f"SM{index:032x}"
    states = SCENARIOS[index % len(SCENARIOS)]
    events = []
    for state in states:
        # The connector's own SENT/QUEUED carry both ids; some provider
        # callbacks carry only the provider's id.
        only_provider_id = state not in (S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_QUEUED) and (
            rng.random() < 0.3
        )
        gateway_id = "" if only_provider_id else message_id
        events.append(
            Event(
                id=f"{message_id}:{state}",
                type="message.status",
                channel="sms",
                provider="twilio",
                causation_id=gateway_id,
                status=DeliveryStatus(
                    state=state,  # type: ignore[arg-type]
                    message_id=gateway_id,
                    provider_message_id=provider_id,
                    attempt=1,
                ),
            )
        )
    return message_id, events, fold(states, start=S.DELIVERY_STATE_ACCEPTED)


async def run_all(jobs: Iterable[Callable[[], Awaitable[object]]], workers: int) -> None:
    queue: asyncio.Queue[Callable[[], Awaitable[object]]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            job = queue.get_nowait()
            await job()

    await asyncio.gather(*(worker() for _ in range(workers)))


async def publish_all(bus: InMemoryBus, events: Iterable[Event]) -> None:
    for event in events:
        await bus.publish(EVENTS_EXCHANGE, event_routing_key(event), encode_event(event), timeout=1)


async def drained(bus: InMemoryBus, ingestor: StatusIngestor) -> None:
    """Wait until the ingestor took every status, then stop it (in-flight ones finish)."""
    while bus.queue_depth(ingestor.queue) > 0:  # noqa: ASYNC110 - no "drained" event to wait on
        await asyncio.sleep(0.01)
    await ingestor.stop()
    assert bus.queue_depth(ingestor.queue) == 0  # nothing was requeued by a failure


async def test_status_storm_ends_in_the_right_state(ledger: Ledger) -> None:
    rng = random.Random(20261123)
    messages = [status_events(i, rng) for i in range(MESSAGES)]
    early = set(rng.sample(range(MESSAGES), int(MESSAGES * EARLY_SHARE)))
    bus = InMemoryBus()
    await bus.connect()
    await bus.declare(base_topology())
    ingestor = StatusIngestor(bus, ledger, prefetch=256)

    def accept(index: int) -> Callable[[], Awaitable[object]]:
        message_id = messages[index][0]
        return lambda: ledger.accept(
            NewMessage(
                idempotency_key=f"key-{message_id}",
                message_id=message_id,
                channel="sms",
                provider="twilio",
                address="+15550001111",
            )
        )

    storm = [e for _, events, _ in messages for e in events]
    storm += rng.sample(storm, int(len(storm) * DUPLICATE_SHARE))
    rng.shuffle(storm)

    async with asyncio.timeout(120):
        await run_all((accept(i) for i in range(MESSAGES) if i not in early), WORKERS)
        await ingestor.start()
        await publish_all(bus, storm)
        await drained(bus, ingestor)
        # 10% of the sends are recorded only now, racing a wave of redeliveries.
        await ingestor.start()
        await asyncio.gather(
            publish_all(bus, rng.sample(storm, 500)),
            run_all([accept(i) for i in early], WORKERS),
        )
        await drained(bus, ingestor)

    assert await ledger.pending_count() == 0
    final_states: dict[str, int] = {}
    token = ""
    while True:
        page = await ledger.list(page_size=300, page_token=token)
        final_states.update((r.message_id, r.state) for r in page.messages)
        token = page.next_page_token
        if not token:
            break
    expected_states = {message_id: expected for message_id, _, expected in messages}
    wrong = {
        mid: (DeliveryState.Name(final_states[mid]), DeliveryState.Name(want))  # type: ignore[arg-type]
        for mid, want in expected_states.items()
        if final_states.get(mid) != want
    }
    assert wrong == {}
    assert len(final_states) == MESSAGES
    for message_id, events, expected in rng.sample(messages, 100):
        record = await ledger.get(message_id)
        # Every status event recorded at most once, and the last transition is the state.
        event_ids = [e.event_id for e in record.timeline]
        assert len(event_ids) == len(set(event_ids)), message_id
        transitions = [e for e in record.timeline if e.kind is EntryKind.TRANSITION]
        assert transitions[-1].state == record.state == expected
        assert record.provider_message_id == events[0].status.provider_message_id
    await bus.close()
