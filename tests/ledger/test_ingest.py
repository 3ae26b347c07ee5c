"""Status events -> ledger updates, and the group commit's failure handling."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.api.v1.delivery_pb2 import DeliveryState, DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract.errors import BadRequestError
from gateway.ledger import Applied, Ledger, NewMessage, StatusUpdate, status_update_from_event
from gateway.ledger.ingest import GroupCommit

S = DeliveryState
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_event_maps_to_update() -> None:
    occurred = Timestamp()
    occurred.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    event = Event(
        id="ev-1",
        type="message.status",
        channel="sms",
        provider="twilio",
        causation_id="msg-1",
        occurred_at=occurred,
        traceparent=TRACEPARENT,
        status=DeliveryStatus(
            state=S.DELIVERY_STATE_UNDELIVERED,
            provider_status="undelivered",
            reason_code="30003",
            reason="Unreachable destination handset",
            permanent=True,
            provider_message_id="SM1",
            attempt=1,
        ),
    )
    update = status_update_from_event(event)
    # The gateway id comes from causation_id when the status does not repeat it.
    assert update.message_id == "msg-1"
    assert update.event_id == "ev-1"
    assert update.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert update.occurred_at is not None
    assert update.occurred_at.replace(tzinfo=UTC) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert (update.state, update.provider_status, update.reason_code, update.permanent) == (
        S.DELIVERY_STATE_UNDELIVERED,
        "undelivered",
        "30003",
        True,
    )
    assert (update.channel, update.provider, update.attempt) == ("sms", "twilio", 1)


@pytest.mark.parametrize(
    "event",
    [
        Event(id="no-payload", type="message.status"),
        Event(id="no-state", type="message.status", status=DeliveryStatus(message_id="m")),
        Event(
            id="no-ids",
            type="message.status",
            status=DeliveryStatus(state=S.DELIVERY_STATE_SENT),
        ),
    ],
    ids=lambda e: e.id,
)
def test_unusable_events_are_bad_requests(event: Event) -> None:
    with pytest.raises(BadRequestError):
        status_update_from_event(event)


class PoisonLedger(Ledger):
    """Fails any write that contains the poison status."""

    async def record_statuses(self, updates: Sequence[StatusUpdate]) -> list[Applied]:
        if any(u.reason_code == "poison" for u in updates):
            raise RuntimeError("cannot store this status")
        return await super().record_statuses(updates)


async def test_one_bad_status_does_not_fail_its_batch(ledger: Ledger) -> None:
    for i in range(5):
        await ledger.accept(
            NewMessage(
                idempotency_key=f"k{i}",
                message_id=f"m{i}",
                channel="sms",
                provider="twilio",
                address="+15550001111",
            )
        )
    group = GroupCommit(PoisonLedger(ledger.engine), max_batch=10)
    updates = [StatusUpdate(state=S.DELIVERY_STATE_SENT, message_id=f"m{i}") for i in range(5)]
    updates[2] = StatusUpdate(state=S.DELIVERY_STATE_SENT, message_id="m2", reason_code="poison")
    results = await asyncio.gather(*(group.submit(u) for u in updates), return_exceptions=True)
    assert isinstance(results[2], RuntimeError)
    for i in (0, 1, 3, 4):
        assert isinstance(results[i], Applied)
        assert (await ledger.get(f"m{i}")).state == S.DELIVERY_STATE_SENT
    assert (await ledger.get("m2")).state == S.DELIVERY_STATE_ACCEPTED
