"""Call commands in the ledger, on SQLite and on the real PostgreSQL: accept by
idempotency key (also from two replicas at once), the first outcome wins,
duplicate and late outcomes are no-ops, an unknown command's outcome is kept,
retention; and call.command events -> outcomes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.api.v1.call_pb2 import CallCommandOutcome, CallCommandResult
from gateway.api.v1.delivery_pb2 import DeliveryStatus
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.gateway_service_pb2 import CallCommandState
from gateway.contract.errors import BadRequestError
from gateway.ledger import (
    CallCommandNotFoundError,
    CallOutcome,
    IdempotencyConflictError,
    Ledger,
    NewCallCommand,
)
from gateway.ledger.ingest import call_outcome_from_event
from tests.ledger.conftest import Backend, FakeClock

C = CallCommandState
O = CallCommandOutcome  # noqa: E741 - the outcome enum, as C is the state enum


def new(key: str = "key-1", command_id: str = "cmd-1", fingerprint: str = "fp-1") -> NewCallCommand:
    return NewCallCommand(
        idempotency_key=key,
        command_id=command_id,
        channel="voice",
        provider="twilio",
        account="",
        action="place",
        command=b"\x0a\x05cmd-1",
        fingerprint=fingerprint,
        correlation_id="ticket-42",
        trace_id="ab" * 16,
    )


def outcome(
    command_id: str = "cmd-1", result: int = O.CALL_COMMAND_OUTCOME_ACCEPTED, **kw: object
) -> CallOutcome:
    values: dict[str, object] = {
        "action": "place",
        "channel": "voice",
        "provider": "twilio",
        "account": "main",
        "event_id": f"ev-{command_id}-{result}",
        **kw,
    }
    return CallOutcome(command_id=command_id, outcome=result, **values)  # type: ignore[arg-type]


async def test_accept_is_keyed_by_the_idempotency_key(ledger: Ledger) -> None:
    record, created = await ledger.accept_call_command(new())
    assert created
    assert (record.state, record.dispatched, record.idempotency_key) == (
        C.CALL_COMMAND_STATE_PENDING,
        False,
        "key-1",
    )
    # A retry (another replica picks another id for the same request): the first command.
    again, created = await ledger.accept_call_command(new(command_id="cmd-other"))
    assert not created
    assert again.command_id == "cmd-1"
    with pytest.raises(IdempotencyConflictError, match="different call command"):
        await ledger.accept_call_command(new(fingerprint="fp-2"))
    with pytest.raises(IdempotencyConflictError, match="already taken"):
        await ledger.accept_call_command(new(key="key-2"))
    await ledger.mark_call_dispatched("cmd-1")
    got = await ledger.get_call_command("cmd-1")
    assert got.dispatched
    assert got.command == b"\x0a\x05cmd-1"
    with pytest.raises(CallCommandNotFoundError):
        await ledger.get_call_command("nope")


async def test_concurrent_accepts_from_two_replicas_make_one_command(backend: Backend) -> None:
    first, second = backend.open(), backend.open()
    await first.migrate()
    try:
        results = await asyncio.gather(
            *(
                (first if i % 2 else second).accept_call_command(new(command_id=f"replica-{i}"))
                for i in range(8)
            )
        )
    finally:
        await first.close()
        await second.close()
    assert sum(created for _, created in results) == 1
    assert len({record.command_id for record, _ in results}) == 1


async def test_the_first_outcome_wins_and_duplicates_change_nothing(
    ledger: Ledger, clock: FakeClock
) -> None:
    await ledger.accept_call_command(new())
    occurred = clock.now + timedelta(seconds=1)
    clock.advance(seconds=2)
    applied = await ledger.record_call_outcome(
        outcome(call_id="CA1", provider_status="queued", occurred_at=occurred)
    )
    assert applied.changed
    assert not applied.created
    record = applied.record
    assert (record.state, record.call_id, record.provider_status, record.account) == (
        C.CALL_COMMAND_STATE_ACCEPTED,
        "CA1",
        "queued",
        "main",
    )
    assert record.completed_at == occurred
    assert record.updated_at == clock.now
    assert record.idempotency_key == "key-1"  # the command's own fields stay

    clock.advance(seconds=5)
    duplicate = await ledger.record_call_outcome(outcome(call_id="CA1", provider_status="queued"))
    late = await ledger.record_call_outcome(
        outcome(result=O.CALL_COMMAND_OUTCOME_FAILED, reason_code="ambiguous_send")
    )
    assert not duplicate.changed
    assert not late.changed
    assert await ledger.get_call_command("cmd-1") == record


async def test_outcome_of_an_unknown_command_is_kept(ledger: Ledger, clock: FakeClock) -> None:
    occurred = clock.now - timedelta(seconds=3)
    applied = await ledger.record_call_outcome(
        outcome(
            "cli-1",
            O.CALL_COMMAND_OUTCOME_FAILED,
            action="hang_up",
            call_id="CA9",
            reason_code="call_not_found",
            permanent=True,
            correlation_id="ops",
            occurred_at=occurred,
        )
    )
    assert applied.created
    assert applied.changed
    record = await ledger.get_call_command("cli-1")
    assert (record.state, record.action, record.reason_code, record.permanent) == (
        C.CALL_COMMAND_STATE_FAILED,
        "hang_up",
        "call_not_found",
        True,
    )
    assert (record.idempotency_key, record.command, record.dispatched) == ("", b"", True)
    assert record.created_at == occurred
    # Redelivered: stored once, unchanged.
    again = await ledger.record_call_outcome(outcome("cli-1", O.CALL_COMMAND_OUTCOME_FAILED))
    assert not again.changed
    assert not again.created
    # Several unknown commands: NULL idempotency keys do not collide.
    assert (await ledger.record_call_outcome(outcome("cli-2"))).created


async def test_concurrent_outcomes_from_two_replicas_apply_once(backend: Backend) -> None:
    first, second = backend.open(), backend.open()
    await first.migrate()
    try:
        await first.accept_call_command(new())
        results = await asyncio.gather(
            *(
                (first if i % 2 else second).record_call_outcome(
                    outcome(
                        result=O.CALL_COMMAND_OUTCOME_ACCEPTED
                        if i % 3
                        else O.CALL_COMMAND_OUTCOME_FAILED,
                        event_id=f"ev-{i}",
                    )
                )
                for i in range(8)
            ),
            # And outcomes of a command nobody recorded, at the same time.
            *(
                (first if i % 2 else second).record_call_outcome(outcome("unknown"))
                for i in range(4)
            ),
        )
        final = await first.get_call_command("cmd-1")
    finally:
        await first.close()
        await second.close()
    known, unknown = results[:8], results[8:]
    assert sum(r.changed for r in known) == 1
    (winner,) = [r for r in known if r.changed]
    assert final.outcome_event_id == winner.record.outcome_event_id
    assert sum(r.created for r in unknown) == 1


async def test_purge_deletes_old_commands_and_frees_their_keys(
    ledger: Ledger, clock: FakeClock
) -> None:
    await ledger.accept_call_command(new("old", "cmd-old"))
    await ledger.record_call_outcome(outcome("cmd-old"))
    clock.advance(days=31)
    await ledger.accept_call_command(new("fresh", "cmd-fresh"))
    assert await ledger.purge_call_commands(clock.now - timedelta(days=30)) == 1
    assert await ledger.find_call_command("cmd-old") is None
    assert await ledger.find_call_command("cmd-fresh") is not None
    _, created = await ledger.accept_call_command(new("old", "cmd-old-2"))
    assert created


def _event(**kw: object) -> Event:
    occurred = Timestamp()
    occurred.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    event = Event(
        id="ev-1",
        type="call.command",
        channel="voice",
        provider="twilio",
        account="main",
        causation_id="cmd-1",
        correlation_id="ticket-42",
        occurred_at=occurred,
        **kw,  # type: ignore[arg-type]
    )
    return event


def test_event_maps_to_outcome() -> None:
    event = _event(
        call_command=CallCommandResult(
            action="transfer",
            outcome=O.CALL_COMMAND_OUTCOME_FAILED,
            call_id="CA1",
            reason_code="call_not_in_progress",
            reason="the call ended",
            permanent=True,
            provider_status="completed",
        )
    )
    got = call_outcome_from_event(event)
    # The command id comes from causation_id when the result does not repeat it.
    assert (got.command_id, got.outcome, got.action, got.event_id) == (
        "cmd-1",
        O.CALL_COMMAND_OUTCOME_FAILED,
        "transfer",
        "ev-1",
    )
    assert (got.call_id, got.reason_code, got.permanent, got.provider_status) == (
        "CA1",
        "call_not_in_progress",
        True,
        "completed",
    )
    assert (got.channel, got.provider, got.account, got.correlation_id) == (
        "voice",
        "twilio",
        "main",
        "ticket-42",
    )
    assert got.occurred_at is not None
    assert got.occurred_at.replace(tzinfo=UTC) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    "event",
    [
        _event(status=DeliveryStatus()),
        _event(call_command=CallCommandResult(outcome=O.CALL_COMMAND_OUTCOME_UNSPECIFIED)),
        Event(
            id="ev-2",
            type="call.command",
            call_command=CallCommandResult(outcome=O.CALL_COMMAND_OUTCOME_ACCEPTED),
        ),
    ],
    ids=["not-an-outcome", "no-outcome", "no-command-id"],
)
def test_unusable_outcome_events_are_bad_requests(event: Event) -> None:
    with pytest.raises(BadRequestError):
        call_outcome_from_event(event)
