"""The gateway's retention pass on both ledger backends: what it deletes, in batches."""

from __future__ import annotations

import pytest

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.ledger import Ledger, NewMessage, StatusUpdate
from gateway.server.retention import RetentionTask
from gateway.server.settings import RetentionSettings
from tests.ledger.conftest import FakeClock

S = DeliveryState


def new(key: str) -> NewMessage:
    return NewMessage(idempotency_key=key, channel="sms", provider="twilio", address="+15550001111")


async def settle(ledger: Ledger, key: str, state: int = S.DELIVERY_STATE_DELIVERED) -> str:
    record, _ = await ledger.accept(new(key))
    await ledger.apply_status(StatusUpdate(state=state, message_id=record.message_id))
    return record.message_id


async def test_pass_deletes_settled_messages_and_stale_pending_only(
    ledger: Ledger, clock: FakeClock
) -> None:
    old_delivered = await settle(ledger, "old-delivered")
    old_failed = await settle(ledger, "old-failed", S.DELIVERY_STATE_FAILED)
    in_flight, _ = await ledger.accept(new("old-in-flight"))
    await ledger.apply_status(
        StatusUpdate(state=S.DELIVERY_STATE_SENT, message_id=in_flight.message_id)
    )
    await ledger.record_status(StatusUpdate(state=S.DELIVERY_STATE_SENT, message_id="unknown-1"))
    clock.advance(days=8)
    recent = await settle(ledger, "recent-delivered")
    await ledger.record_status(StatusUpdate(state=S.DELIVERY_STATE_SENT, message_id="unknown-2"))
    task = RetentionTask(ledger, RetentionSettings(messages_days=7, pending_hours=24))

    result = await task.run_once()

    assert (result.messages, result.pending, result.more) == (2, 1, False)
    assert await ledger.find(old_delivered) is None
    assert await ledger.find(old_failed) is None
    assert (await ledger.get(in_flight.message_id)).state == S.DELIVERY_STATE_SENT
    assert (await ledger.get(recent)).state == S.DELIVERY_STATE_DELIVERED
    assert await ledger.pending_count() == 1  # the recent one stays
    # Nothing left past retention: a second pass deletes nothing.
    again = await task.run_once()
    assert (again.messages, again.pending) == (0, 0)


async def test_pass_is_bounded_and_says_when_more_is_left(ledger: Ledger, clock: FakeClock) -> None:
    for i in range(5):
        await settle(ledger, f"k{i}")
    clock.advance(days=2)
    task = RetentionTask(
        ledger, RetentionSettings(messages_days=1, batch_size=2, max_batches=2, pending_hours=None)
    )
    first = await task.run_once()
    assert (first.messages, first.more) == (4, True)
    second = await task.run_once()
    assert (second.messages, second.more) == (1, False)
    assert not (await ledger.list(page_size=100)).messages


async def test_switched_off_keeps_everything(ledger: Ledger, clock: FakeClock) -> None:
    kept = await settle(ledger, "kept")
    await ledger.record_status(StatusUpdate(state=S.DELIVERY_STATE_SENT, message_id="unknown"))
    clock.advance(days=3650)
    task = RetentionTask(ledger, RetentionSettings(messages_days=None, pending_hours=None))
    result = await task.run_once()
    assert (result.messages, result.pending) == (0, 0)
    assert await ledger.find(kept) is not None
    assert await ledger.pending_count() == 1


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        RetentionSettings(messages_days=0)
    with pytest.raises(ValueError, match="greater than 0"):
        RetentionSettings(interval_seconds=-1)
