"""Call commands in the ledger: what SendCallCommand recorded and how each ended.

A call command has no timeline of its own: it is PENDING until the voice
connector's ``call.command`` outcome event arrives, then ACCEPTED, FAILED or
EXPIRED for good. The first outcome wins; a duplicate or late outcome (a
redelivered command re-publishes the outcome it recorded) changes nothing.
An outcome for a command the ledger does not know (sent by the CLI or another
service straight onto the bus, or purged) is stored as a row of its own, so
GetCallCommand can still answer for it.

The functions here run inside a transaction of :class:`~gateway.ledger.store.Ledger`,
which exposes them as ``accept_call_command``, ``record_call_outcome`` and friends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.api.v1.call_pb2 import CallCommandOutcome
from gateway.api.v1.gateway_service_pb2 import CallCommandState
from gateway.ledger import schema
from gateway.ledger.models import IdempotencyConflictError, LedgerError
from gateway.ledger.rows import db_time, insert_ignore, opt_out_time, out_time

C = CallCommandState

#: The ledger state each connector outcome ends a command in.
OUTCOME_STATES: dict[int, int] = {
    CallCommandOutcome.CALL_COMMAND_OUTCOME_ACCEPTED: C.CALL_COMMAND_STATE_ACCEPTED,
    CallCommandOutcome.CALL_COMMAND_OUTCOME_FAILED: C.CALL_COMMAND_STATE_FAILED,
    CallCommandOutcome.CALL_COMMAND_OUTCOME_EXPIRED: C.CALL_COMMAND_STATE_EXPIRED,
}


class CallCommandNotFoundError(LedgerError, LookupError):
    """No call command has this id."""


@dataclass(frozen=True, kw_only=True)
class NewCallCommand:
    """A call command SendCallCommand validated, before it is published."""

    idempotency_key: str
    command_id: str
    channel: str
    provider: str
    account: str
    #: The action's field name in CallCommand ("place", "hang_up", ...).
    action: str
    #: The serialized CallCommand as it will be published.
    command: bytes
    #: Hash of the request without its key: the same key with another request conflicts.
    fingerprint: str
    correlation_id: str = ""
    conversation_id: str = ""
    trace_id: str = ""
    expires_at: datetime | None = None
    created_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class CallOutcome:
    """The outcome of one call command, from a ``call.command`` event."""

    command_id: str
    #: A ``CallCommandOutcome`` value other than UNSPECIFIED.
    outcome: int
    action: str
    channel: str
    provider: str
    account: str = ""
    call_id: str = ""
    provider_status: str = ""
    reason_code: str = ""
    reason: str = ""
    permanent: bool = False
    correlation_id: str = ""
    conversation_id: str = ""
    event_id: str = ""
    occurred_at: datetime | None = None

    def __post_init__(self) -> None:
        if not self.command_id:
            raise ValueError("a call command outcome needs the command id")
        if self.outcome not in OUTCOME_STATES:
            raise ValueError(f"not a call command outcome: {self.outcome}")


@dataclass(frozen=True, kw_only=True)
class CallCommandRecord:
    """A call command as the ledger knows it."""

    command_id: str
    #: "" for a command known only from its outcome.
    idempotency_key: str
    #: A ``CallCommandState`` value.
    state: int
    channel: str
    provider: str
    account: str
    action: str
    #: The serialized CallCommand (b"" for a command known only from its outcome).
    command: bytes
    dispatched: bool
    call_id: str
    provider_status: str
    reason_code: str
    reason: str
    permanent: bool
    correlation_id: str
    conversation_id: str
    trace_id: str
    outcome_event_id: str
    completed_at: datetime | None
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    fingerprint: str = ""

    @property
    def pending(self) -> bool:
        """True until the outcome arrived."""
        return self.state == C.CALL_COMMAND_STATE_PENDING


@dataclass(frozen=True, kw_only=True)
class CallOutcomeApplied:
    """What recording an outcome did."""

    record: CallCommandRecord
    #: False for a duplicate or late outcome of a command that already had one.
    changed: bool
    #: True when the command was unknown and the outcome made its row.
    created: bool


def _record(row: Row[Any]) -> CallCommandRecord:
    return CallCommandRecord(
        command_id=str(row.command_id),
        idempotency_key=row.idempotency_key or "",
        state=int(row.state),
        channel=row.channel,
        provider=row.provider,
        account=row.account,
        action=row.action,
        command=bytes(row.command or b""),
        dispatched=bool(row.dispatched),
        call_id=row.call_id,
        provider_status=row.provider_status,
        reason_code=row.reason_code,
        reason=row.reason,
        permanent=bool(row.permanent),
        correlation_id=row.correlation_id,
        conversation_id=row.conversation_id,
        trace_id=row.trace_id,
        outcome_event_id=row.outcome_event_id,
        completed_at=opt_out_time(row.completed_at),
        expires_at=opt_out_time(row.expires_at),
        created_at=out_time(row.created_at),
        updated_at=out_time(row.updated_at),
        fingerprint=row.fingerprint,
    )


async def load_call_command(conn: AsyncConnection, command_id: str) -> CallCommandRecord | None:
    """The command, or None."""
    row = (
        await conn.execute(
            select(schema.call_commands).where(schema.call_commands.c.command_id == command_id)
        )
    ).first()
    return _record(row) if row is not None else None


async def accept_call_command(
    conn: AsyncConnection, new: NewCallCommand, now: datetime
) -> tuple[CallCommandRecord, bool]:
    """Insert ``new`` as PENDING unless its key (or id) exists: ``(record, created)``.

    Raises :class:`IdempotencyConflictError` when the key was used for another
    request, or the command id is taken by another key or by an outcome of a
    command the gateway did not send.
    """
    at = db_time(new.created_at or now)
    values: dict[str, Any] = {
        "command_id": new.command_id,
        "idempotency_key": new.idempotency_key,
        "fingerprint": new.fingerprint,
        "state": C.CALL_COMMAND_STATE_PENDING,
        "channel": new.channel,
        "provider": new.provider,
        "account": new.account,
        "action": new.action,
        "command": new.command,
        "dispatched": False,
        "call_id": "",
        "provider_status": "",
        "reason_code": "",
        "reason": "",
        "permanent": False,
        "correlation_id": new.correlation_id,
        "conversation_id": new.conversation_id,
        "trace_id": new.trace_id,
        "outcome_event_id": "",
        "completed_at": None,
        "expires_at": db_time(new.expires_at) if new.expires_at else None,
        "created_at": at,
        "updated_at": at,
    }
    c = schema.call_commands.c
    # One statement for both unique constraints (key and id): whichever
    # conflicts, nothing is inserted and the reads below say which.
    if await insert_ignore(conn, schema.call_commands, values):
        record = await load_call_command(conn, new.command_id)
        assert record is not None  # inserted in this transaction
        return record, True
    row = (
        await conn.execute(
            select(schema.call_commands).where(c.idempotency_key == new.idempotency_key)
        )
    ).first()
    if row is None:
        raise IdempotencyConflictError(f"command id {new.command_id!r} is already taken")
    if new.fingerprint and row.fingerprint != new.fingerprint:
        raise IdempotencyConflictError(
            f"idempotency key {new.idempotency_key!r} was used for a different call command"
        )
    return _record(row), False


async def mark_call_dispatched(conn: AsyncConnection, command_id: str, now: datetime) -> None:
    """Note that the broker confirmed the command."""
    await conn.execute(
        update(schema.call_commands)
        .where(schema.call_commands.c.command_id == command_id)
        .values(dispatched=True, updated_at=db_time(now))
    )


async def record_call_outcome(
    conn: AsyncConnection, outcome: CallOutcome, now: datetime
) -> CallOutcomeApplied:
    """Apply an outcome: end a PENDING command, or store a command not known yet."""
    c = schema.call_commands.c
    at = db_time(now)
    completed = db_time(outcome.occurred_at) if outcome.occurred_at else at
    state = OUTCOME_STATES[outcome.outcome]
    result = {
        "state": state,
        "call_id": outcome.call_id,
        "provider_status": outcome.provider_status,
        "reason_code": outcome.reason_code,
        "reason": outcome.reason,
        "permanent": outcome.permanent,
        "outcome_event_id": outcome.event_id,
        "completed_at": completed,
        "updated_at": at,
    }
    # Only a PENDING command takes an outcome: the first one wins, so a
    # duplicate or late one is a no-op whatever order they arrive in.
    changed = (
        await conn.execute(
            update(schema.call_commands)
            .where(c.command_id == outcome.command_id, c.state == C.CALL_COMMAND_STATE_PENDING)
            .values(
                **result,
                # The account that acted (a command may leave it to the connector's default).
                **({"account": outcome.account} if outcome.account else {}),
            )
        )
    ).rowcount == 1
    created = False
    if not changed:
        created = await insert_ignore(
            conn,
            schema.call_commands,
            {
                **result,
                "command_id": outcome.command_id,
                "idempotency_key": None,
                "fingerprint": "",
                "channel": outcome.channel,
                "provider": outcome.provider,
                "account": outcome.account,
                "action": outcome.action,
                "command": b"",
                # It was on the bus, or there would be no outcome.
                "dispatched": True,
                "correlation_id": outcome.correlation_id,
                "conversation_id": outcome.conversation_id,
                "trace_id": "",
                "expires_at": None,
                "created_at": completed,
            },
        )
    record = await load_call_command(conn, outcome.command_id)
    assert record is not None  # updated, inserted, or there before
    return CallOutcomeApplied(record=record, changed=changed or created, created=created)


async def purge_call_commands(conn: AsyncConnection, before: datetime, limit: int) -> int:
    """Delete at most ``limit`` call commands last updated before ``before``; how many."""
    c = schema.call_commands.c
    ids = [
        str(r.command_id)
        for r in await conn.execute(
            select(c.command_id)
            .where(c.updated_at < db_time(before))
            .order_by(c.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ]
    if ids:
        await conn.execute(delete(schema.call_commands).where(c.command_id.in_(ids)))
    return len(ids)
