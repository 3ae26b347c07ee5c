"""Applying a batch of statuses inside one transaction (the ledger's hot path).

The messages concerned are locked in one statement (sorted, so concurrent
batches cannot deadlock on them), the statuses are folded into them in
memory with the contract's ordering, and everything is written back in a
fixed number of statements whatever the batch size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.contract.status import advance
from gateway.ledger import schema
from gateway.ledger.models import (
    REASON_LATE_DELIVERY,
    REJECTED_STATES,
    Applied,
    Attempt,
    EntryKind,
    FallbackPolicy,
    StatusUpdate,
    success_reached,
)
from gateway.ledger.rows import (
    build_record,
    db_time,
    entry_from_row,
    insert_many_ignore,
    load_attempts_of,
    update_to_json,
)

S = DeliveryState


@dataclass(frozen=True)
class StatusItem:
    """One status of a batch, with its event id; ``from_pending`` when drained."""

    update: StatusUpdate
    event_id: str
    from_pending: bool


@dataclass
class LockedMessage:
    """A locked message while a batch is applied to it (changes kept in memory)."""

    values: dict[str, Any]
    attempts: list[Attempt]
    timer: bool
    dirty: bool = False
    dirty_attempts: set[int] = field(default_factory=set)
    #: None, "due" (set ``timer_due``) or "delete".
    timer_op: str | None = None
    timer_due: datetime | None = None

    @property
    def message_id(self) -> str:
        return str(self.values["message_id"])

    def policy(self) -> FallbackPolicy | None:
        raw = self.values["fallback_json"]
        return FallbackPolicy.from_json(json.loads(raw)) if raw else None


@dataclass
class BatchOutcome:
    """What a batch did, and what it leaves to drain after the commit."""

    results: list[Applied]
    linked: set[str]
    unknown_message_ids: set[str]
    unknown_provider_ids: set[str]


async def apply_batch(
    conn: AsyncConnection, items: Sequence[StatusItem], now: datetime, *, final_view: bool = False
) -> BatchOutcome:
    """Apply statuses in one transaction with a fixed number of statements.

    ``final_view``: no other writer can commit before this transaction does
    (SQLite), so what it reads is final.

    Lock order: message rows (sorted, one statement), then pending and seen
    rows, as everywhere else in the ledger.
    """
    m, a, p = schema.messages.c, schema.attempts.c, schema.pending.c
    # Which message each status is about.
    pid_only = sorted({i.update.provider_message_id for i in items if not i.update.message_id})
    pid_map: dict[str, str] = {}
    if pid_only:
        for r in await conn.execute(
            select(a.provider_message_id, a.message_id)
            .where(a.provider_message_id.in_(pid_only))
            .order_by(a.created_at)
        ):
            pid_map[str(r.provider_message_id)] = str(r.message_id)
    mids = sorted(
        {i.update.message_id or pid_map.get(i.update.provider_message_id, "") for i in items} - {""}
    )
    msgs: dict[str, LockedMessage] = {}
    if mids:
        rows = (
            await conn.execute(
                select(schema.messages)
                .where(m.message_id.in_(mids))
                .order_by(m.message_id)
                .with_for_update()
            )
        ).all()
        for r in rows:
            msgs[str(r.message_id)] = LockedMessage(
                values=dict(r._mapping), attempts=[], timer=False
            )
    taken: set[str] = set()
    from_pending = sorted({i.event_id for i in items if i.from_pending})
    if from_pending:
        taken = {
            str(r.event_id)
            for r in await conn.execute(
                delete(schema.pending).where(p.event_id.in_(from_pending)).returning(p.event_id)
            )
        }
    if msgs:
        for att in await load_attempts_of(conn, sorted(msgs)):
            msgs[att[0]].attempts.append(att[1])
        with_policy = sorted(k for k, v in msgs.items() if v.values["fallback_json"])
        if with_policy:
            for r in await conn.execute(
                select(schema.timers.c.message_id).where(
                    schema.timers.c.message_id.in_(with_policy)
                )
            ):
                msgs[str(r.message_id)].timer = True
    candidate_ids = sorted({i.event_id for i in items})
    seen = {
        str(r.event_id)
        for r in await conn.execute(
            select(schema.seen_events.c.event_id).where(
                schema.seen_events.c.event_id.in_(candidate_ids)
            )
        )
    }
    linked_now: dict[str, str] = {}
    pending_rows: dict[str, dict[str, Any]] = {}
    seen_rows: list[dict[str, Any]] = []
    entry_rows: list[dict[str, Any]] = []
    # Per item: (kind of result, message, indexes into entry_rows, fallback due)
    plans: list[tuple[str, LockedMessage | None, list[int], bool]] = []
    linked: set[str] = set()
    unknown_mids: set[str] = set()
    unknown_pids: set[str] = set()
    for item in items:
        u = item.update
        if item.from_pending and item.event_id not in taken:
            plans.append(("duplicate", None, [], False))  # another drain applied it
            continue
        mid = (
            u.message_id
            or pid_map.get(u.provider_message_id)
            or linked_now.get(u.provider_message_id, "")
        )
        msg = msgs.get(mid)
        early_attempt = (
            msg is not None
            and msg.values["fallback_json"] is not None
            and u.attempt > len(msg.attempts)
        )
        if msg is None or early_attempt:
            pending_rows.setdefault(
                item.event_id,
                {
                    "event_id": item.event_id,
                    "message_id": u.message_id,
                    "provider_message_id": u.provider_message_id,
                    "payload": update_to_json(u),
                    "received_at": now,
                },
            )
            if msg is None:
                if u.message_id:
                    unknown_mids.add(u.message_id)
                else:
                    unknown_pids.add(u.provider_message_id)
            plans.append(("pending", msg, [], False))
            continue
        if item.event_id in seen:
            plans.append(("duplicate", msg, [], False))
            continue
        seen.add(item.event_id)
        seen_rows.append({"event_id": item.event_id, "message_id": mid, "recorded_at": now})
        entries, due, new_links = apply_one(msg, u, item.event_id, now)
        for pid in new_links:
            linked_now[pid] = mid
            linked.add(pid)
        start = len(entry_rows)
        entry_rows.extend(entries)
        plans.append(("applied", msg, list(range(start, len(entry_rows))), due))
    # Write everything back: a handful of statements whatever the batch size.
    if seen_rows:
        # Sorted: concurrent transactions take unique-index locks in one order.
        seen_rows.sort(key=lambda r: str(r["event_id"]))
        await insert_many_ignore(conn, schema.seen_events, seen_rows)
    if pending_rows:
        await insert_many_ignore(
            conn, schema.pending, [pending_rows[k] for k in sorted(pending_rows)]
        )
    seqs: list[int] = []
    if entry_rows:
        result = await conn.execute(
            schema.timeline.insert().returning(schema.timeline.c.seq, sort_by_parameter_order=True),
            entry_rows,
        )
        seqs = [int(r.seq) for r in result]
    attempt_rows = [
        {
            "b_mid": msg.message_id,
            "b_attempt": att.attempt,
            "state": att.state,
            "provider_message_id": att.provider_message_id,
        }
        for msg in msgs.values()
        for att in msg.attempts
        if att.attempt in msg.dirty_attempts
    ]
    if attempt_rows:
        await conn.execute(
            update(schema.attempts)
            .where(a.message_id == bindparam("b_mid"), a.attempt == bindparam("b_attempt"))
            .values(state=bindparam("state"), provider_message_id=bindparam("provider_message_id")),
            attempt_rows,
        )
    message_rows = [
        {
            "b_mid": msg.message_id,
            "state": msg.values["state"],
            "reason_code": msg.values["reason_code"],
            "reason": msg.values["reason"],
            "late_delivery": msg.values["late_delivery"],
            "updated_at": msg.values["updated_at"],
        }
        for msg in msgs.values()
        if msg.dirty
    ]
    if message_rows:
        await conn.execute(
            update(schema.messages)
            .where(m.message_id == bindparam("b_mid"))
            .values(
                state=bindparam("state"),
                reason_code=bindparam("reason_code"),
                reason=bindparam("reason"),
                late_delivery=bindparam("late_delivery"),
                updated_at=bindparam("updated_at"),
            ),
            message_rows,
        )
    timer_deletes = sorted(k for k, v in msgs.items() if v.timer_op == "delete")
    if timer_deletes:
        await conn.execute(
            delete(schema.timers).where(schema.timers.c.message_id.in_(timer_deletes))
        )
    timer_dues = [
        {"b_mid": k, "due_at": v.timer_due} for k, v in msgs.items() if v.timer_op == "due"
    ]
    if timer_dues:
        await conn.execute(
            update(schema.timers)
            .where(schema.timers.c.message_id == bindparam("b_mid"))
            .values(due_at=bindparam("due_at")),
            timer_dues,
        )
    records = {k: build_record(v.values, v.attempts, active=v.timer) for k, v in msgs.items()}
    results: list[Applied] = []
    for kind, msg, indexes, due in plans:
        record = records[msg.message_id] if msg is not None else None
        if kind == "applied":
            made = tuple(entry_from_row(entry_rows[i], seqs[i]) for i in indexes)
            results.append(Applied(record=record, entries=made, fallback_due=due))
        else:
            results.append(
                Applied(record=record, duplicate=kind == "duplicate", pending=kind == "pending")
            )
    if linked and final_view:
        # Nobody else writes before our commit: only provider ids with pending
        # statuses need a drain.
        result = await conn.execute(
            select(p.provider_message_id).where(p.provider_message_id.in_(sorted(linked)))
        )
        linked = {str(r.provider_message_id) for r in result}
    return BatchOutcome(
        results=results,
        linked=linked,
        unknown_message_ids=unknown_mids,
        unknown_provider_ids=unknown_pids,
    )


def apply_one(
    msg: LockedMessage, u: StatusUpdate, event_id: str, now: datetime
) -> tuple[list[dict[str, Any]], bool, list[str]]:
    """Apply one status to a locked message in memory: (timeline rows, fallback due now,
    provider ids newly linked to an attempt)."""
    current_number = int(msg.values["attempt"])
    target = match_attempt(msg.attempts, u, current_number)
    linked: list[str] = []
    changes: dict[str, Any] = {}
    if u.provider_message_id and not target.provider_message_id:
        changes["provider_message_id"] = u.provider_message_id
        linked.append(u.provider_message_id)
    attempt_advanced = advance(target.state, u.state)
    if attempt_advanced:
        changes["state"] = u.state
    if changes:
        msg.attempts[target.attempt - 1] = replace(target, **changes)
        msg.dirty_attempts.add(target.attempt)
    timer_active = msg.timer
    base: dict[str, Any] = {
        "message_id": msg.message_id,
        "attempt": target.attempt,
        "channel": u.channel or target.channel,
        "provider": u.provider or target.provider,
        "provider_status": u.provider_status,
        "reason_code": u.reason_code,
        "reason": u.reason,
        "permanent": u.permanent,
        "provider_message_id": u.provider_message_id or target.provider_message_id,
        "trace_id": u.trace_id,
        "event_id": event_id,
        "occurred_at": db_time(u.occurred_at) if u.occurred_at else None,
        "recorded_at": now,
    }
    rows: list[dict[str, Any]] = []
    due = False
    state = int(msg.values["state"])
    values: dict[str, Any] = {}
    if target.attempt == current_number:
        if timer_active and u.state in REJECTED_STATES:
            if attempt_advanced:
                # The fallback engine decides what comes next (switch or exhausted).
                rows.append(dict(base, kind=EntryKind.ATTEMPT.value, state=u.state))
                msg.timer_op, msg.timer_due = "due", now
                due = True
        elif advance(state, u.state):
            rows.append(dict(base, kind=EntryKind.TRANSITION.value, state=u.state))
            values.update(state=u.state, reason_code=u.reason_code, reason=u.reason)
            policy = msg.policy()
            if timer_active and policy is not None:
                step = policy.steps[target.attempt - 1]
                if success_reached(u.state, step.success_state):
                    msg.timer, msg.timer_op = False, "delete"
    elif attempt_advanced:
        late = u.state in (S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_READ) and not bool(
            msg.values["late_delivery"]
        )
        if late:
            reason = u.reason or (
                f"attempt {target.attempt} on {target.channel}/{target.provider} delivered "
                "after the switch; suppress the duplicate"
            )
            rows.append(
                dict(
                    base,
                    kind=EntryKind.LATE_DELIVERY.value,
                    state=u.state,
                    reason_code=REASON_LATE_DELIVERY,
                    reason=reason,
                )
            )
            values["late_delivery"] = True
            if timer_active:
                # The recipient has it: trying more channels would only add duplicates.
                msg.timer, msg.timer_op = False, "delete"
            if advance(state, u.state):
                values.update(state=u.state, reason_code=REASON_LATE_DELIVERY, reason=reason)
        else:
            rows.append(dict(base, kind=EntryKind.ATTEMPT.value, state=u.state))
    if rows or values:
        values["updated_at"] = now
        msg.values.update(values)
        msg.dirty = True
    return rows, due, linked


def match_attempt(attempts: Sequence[Attempt], update: StatusUpdate, current: int) -> Attempt:
    """The attempt a status is about: by provider id, then attempt number, then the
    latest attempt on the status's connector, else the current attempt. An attempt
    that already has another provider id never matches."""
    if update.provider_message_id:
        for att in attempts:
            if att.provider_message_id == update.provider_message_id:
                return att

    def fits(att: Attempt) -> bool:
        return (
            (not update.channel or att.channel == update.channel)
            and (not update.provider or att.provider == update.provider)
            and (not att.provider_message_id or not update.provider_message_id)
        )

    if 0 < update.attempt <= len(attempts) and fits(attempts[update.attempt - 1]):
        return attempts[update.attempt - 1]
    if update.channel or update.provider:
        for att in reversed(attempts):
            if fits(att):
                return att
    return attempts[current - 1]
