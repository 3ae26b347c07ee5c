"""Ledger storage behaviour, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.ledger import (
    EntryKind,
    IdempotencyConflictError,
    InvalidPageTokenError,
    Ledger,
    ListFilter,
    MessageNotFoundError,
    NewMessage,
    StatusUpdate,
)
from tests.ledger.conftest import FakeClock

S = DeliveryState


def new(key: str, **kwargs: object) -> NewMessage:
    fields: dict[str, object] = {
        "idempotency_key": key,
        "channel": "sms",
        "provider": "twilio",
        "address": "+15550001111",
    }
    fields.update(kwargs)
    return NewMessage(**fields)  # type: ignore[arg-type]


async def test_accept_records_accepted_with_first_entry(ledger: Ledger) -> None:
    record, created = await ledger.accept(new("k1", conversation_id="c1", metadata={"a": "b"}))
    assert created
    assert record.state == S.DELIVERY_STATE_ACCEPTED
    assert record.metadata == {"a": "b"}
    assert [(e.kind, e.state, e.attempt) for e in record.timeline] == [
        (EntryKind.TRANSITION, S.DELIVERY_STATE_ACCEPTED, 1)
    ]
    assert not record.dispatched
    await ledger.mark_dispatched(record.message_id, 1)
    assert (await ledger.get(record.message_id)).dispatched


async def test_same_key_returns_the_existing_message(ledger: Ledger) -> None:
    first, created = await ledger.accept(new("k1", fingerprint="f1"))
    again, created_again = await ledger.accept(new("k1", fingerprint="f1"))
    assert created
    assert not created_again
    assert again.message_id == first.message_id
    with pytest.raises(IdempotencyConflictError):
        await ledger.accept(new("k1", fingerprint="other request"))
    with pytest.raises(IdempotencyConflictError):
        await ledger.accept(new("k2", message_id=first.message_id))


async def test_status_is_monotonic_and_final_states_stick(ledger: Ledger) -> None:
    record, _ = await ledger.accept(new("k1"))
    mid = record.message_id
    sent = StatusUpdate(state=S.DELIVERY_STATE_SENT, message_id=mid, provider_message_id="SM1")
    delivered = StatusUpdate(state=S.DELIVERY_STATE_DELIVERED, message_id=mid, event_id="d")
    assert (await ledger.apply_status(delivered)).state == S.DELIVERY_STATE_DELIVERED  # type: ignore[union-attr]
    # A late SENT never overwrites DELIVERED, but still links the provider id.
    after = await ledger.apply_status(sent)
    assert after is not None
    assert after.state == S.DELIVERY_STATE_DELIVERED
    assert after.provider_message_id == "SM1"
    read = StatusUpdate(state=S.DELIVERY_STATE_READ, provider_message_id="SM1", event_id="r")
    assert (await ledger.apply_status(read)).state == S.DELIVERY_STATE_READ  # type: ignore[union-attr]
    failed = StatusUpdate(state=S.DELIVERY_STATE_FAILED, message_id=mid, event_id="f")
    assert (await ledger.apply_status(failed)).state == S.DELIVERY_STATE_READ  # type: ignore[union-attr]
    timeline = (await ledger.get(mid)).timeline
    assert [e.state for e in timeline] == [
        S.DELIVERY_STATE_ACCEPTED,
        S.DELIVERY_STATE_DELIVERED,
        S.DELIVERY_STATE_READ,
    ]
    assert [e.seq for e in timeline] == sorted(e.seq for e in timeline)


async def test_duplicate_event_changes_nothing(ledger: Ledger) -> None:
    record, _ = await ledger.accept(new("k1"))
    update = StatusUpdate(state=S.DELIVERY_STATE_SENT, message_id=record.message_id, event_id="e")
    first = await ledger.record_status(update)
    second = await ledger.record_status(update)
    assert len(first.entries) == 1
    assert not first.duplicate
    assert second.duplicate
    assert second.entries == ()
    # Without an event id, the derived id dedupes identical callbacks too.
    bare = StatusUpdate(state=S.DELIVERY_STATE_DELIVERED, message_id=record.message_id)
    await ledger.record_status(bare)
    assert (await ledger.record_status(bare)).duplicate
    assert len((await ledger.get(record.message_id)).timeline) == 3


async def test_status_before_the_message_is_kept_and_applied(ledger: Ledger) -> None:
    early = StatusUpdate(
        state=S.DELIVERY_STATE_DELIVERED, message_id="m-early", provider_message_id="SM9"
    )
    applied = await ledger.record_status(early)
    assert applied.pending
    assert applied.record is None
    assert await ledger.pending_count() == 1
    # Redelivered while pending: still one pending status.
    await ledger.record_status(early)
    assert await ledger.pending_count() == 1
    record, _ = await ledger.accept(new("k1", message_id="m-early"))
    assert record.state == S.DELIVERY_STATE_DELIVERED
    assert record.provider_message_id == "SM9"
    assert await ledger.pending_count() == 0


async def test_callback_with_only_provider_id_waits_for_the_link(ledger: Ledger) -> None:
    record, _ = await ledger.accept(new("k1"))
    callback = StatusUpdate(state=S.DELIVERY_STATE_DELIVERED, provider_message_id="SM7")
    assert (await ledger.record_status(callback)).pending
    # The connector's SENT (message id + provider id) links them; the callback follows.
    sent = StatusUpdate(
        state=S.DELIVERY_STATE_SENT, message_id=record.message_id, provider_message_id="SM7"
    )
    await ledger.record_status(sent)
    final = await ledger.get(record.message_id)
    assert final.state == S.DELIVERY_STATE_DELIVERED
    assert (await ledger.find_by_provider_message_id("SM7")) is not None
    assert await ledger.pending_count() == 0


async def test_get_unknown_raises(ledger: Ledger) -> None:
    with pytest.raises(MessageNotFoundError):
        await ledger.get("nope")
    assert await ledger.find("nope") is None


async def test_list_pages_newest_first_with_filters(ledger: Ledger, clock: FakeClock) -> None:
    ids = []
    for i in range(7):
        clock.advance(seconds=1)
        conversation = "conv-a" if i % 2 == 0 else "conv-b"
        record, _ = await ledger.accept(new(f"k{i}", conversation_id=conversation))
        ids.append(record.message_id)
    seen: list[str] = []
    token = ""
    flt = ListFilter(conversation_id="conv-a")
    while True:
        page = await ledger.list(flt, page_size=2, page_token=token)
        assert len(page.messages) <= 2
        seen += [m.message_id for m in page.messages]
        token = page.next_page_token
        if not token:
            break
    assert seen == [ids[6], ids[4], ids[2], ids[0]]
    with pytest.raises(InvalidPageTokenError):
        await ledger.list(
            ListFilter(conversation_id="conv-b"),
            page_size=2,
            page_token=((await ledger.list(flt, page_size=2)).next_page_token),
        )
    with pytest.raises(InvalidPageTokenError):
        await ledger.list(flt, page_token="not-a-token")
    window = await ledger.list(
        ListFilter(since=clock.now - timedelta(seconds=2), until=clock.now), page_size=10
    )
    # since is inclusive, until exclusive.
    assert [m.message_id for m in window.messages] == [ids[5], ids[4]]
    assert len((await ledger.list(page_size=100_000)).messages) == 7


async def test_purge_removes_settled_messages_only(ledger: Ledger, clock: FakeClock) -> None:
    done, _ = await ledger.accept(new("k-done"))
    await ledger.apply_status(StatusUpdate(state=S.DELIVERY_STATE_READ, message_id=done.message_id))
    open_, _ = await ledger.accept(new("k-open"))
    await ledger.apply_status(
        StatusUpdate(state=S.DELIVERY_STATE_SENT, message_id=open_.message_id)
    )
    await ledger.record_status(StatusUpdate(state=S.DELIVERY_STATE_SENT, message_id="never-sent"))
    clock.advance(days=31)
    assert await ledger.purge(clock.now - timedelta(days=30)) == 1
    assert await ledger.purge(clock.now - timedelta(days=30)) == 0
    assert await ledger.find(done.message_id) is None
    assert (await ledger.get(open_.message_id)).state == S.DELIVERY_STATE_SENT
    assert await ledger.purge_pending(clock.now - timedelta(days=30)) == 1
    assert await ledger.pending_count() == 0
    # The key is free again.
    _, created = await ledger.accept(new("k-done"))
    assert created


async def test_explicit_retry_is_the_way_out_of_a_failure(ledger: Ledger) -> None:
    from gateway.api.v1.command_pb2 import SendMessageCommand
    from gateway.ledger import REASON_RETRY, NotRetryableError

    command = SendMessageCommand(message_id="m-retry", channel="sms", provider="twilio", attempt=1)
    await ledger.accept(new("k1", message_id="m-retry", command=command.SerializeToString()))
    await ledger.apply_status(
        StatusUpdate(state=S.DELIVERY_STATE_SENT, message_id="m-retry", provider_message_id="SM1")
    )
    with pytest.raises(NotRetryableError):
        await ledger.retry("m-retry")  # in flight: not failed
    await ledger.apply_status(
        StatusUpdate(state=S.DELIVERY_STATE_UNDELIVERED, provider_message_id="SM1")
    )
    retried, again = await ledger.retry("m-retry")
    assert again.attempt == 2
    assert again.channel == "sms"
    assert (retried.state, retried.attempt, retried.dispatched) == (
        S.DELIVERY_STATE_ACCEPTED,
        2,
        False,
    )
    assert retried.timeline[-1].reason_code == REASON_RETRY
    # Twilio's callbacks say attempt 1 whatever the attempt; the new SID still finds attempt 2.
    await ledger.apply_status(
        StatusUpdate(
            state=S.DELIVERY_STATE_SENT, message_id="m-retry", attempt=2, provider_message_id="SM2"
        )
    )
    done = await ledger.apply_status(
        StatusUpdate(
            state=S.DELIVERY_STATE_DELIVERED,
            provider_message_id="SM2",
            channel="sms",
            provider="twilio",
            attempt=1,
        )
    )
    assert done is not None
    assert done.state == S.DELIVERY_STATE_DELIVERED
    assert [a.state for a in done.attempts] == [
        S.DELIVERY_STATE_UNDELIVERED,
        S.DELIVERY_STATE_DELIVERED,
    ]
    with pytest.raises(NotRetryableError):
        await ledger.retry("m-retry")
    with pytest.raises(MessageNotFoundError):
        await ledger.retry("nope")
