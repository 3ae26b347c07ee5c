"""Several ledgers (engines, processes) on one database: one message per idempotency
key, no lost status, one fallback switch."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.ledger import (
    FallbackEngine,
    FallbackPolicy,
    FallbackStep,
    Ledger,
    NewMessage,
    StatusUpdate,
    TimerAction,
    store,
)
from tests.ledger.conftest import Backend, FakeClock, asyncpg_url

S = DeliveryState


def new(key: str, message_id: str) -> NewMessage:
    return NewMessage(
        idempotency_key=key,
        message_id=message_id,
        channel="sms",
        provider="twilio",
        address="+15550001111",
        fingerprint="same request",
    )


async def test_concurrent_accepts_of_one_key_make_one_message(
    backend: Backend, clock: FakeClock
) -> None:
    first, second = backend.open(clock), backend.open(clock)
    try:
        await asyncio.gather(first.migrate(), second.migrate())
        # Each replica picks its own message id for the same request.
        attempts = [
            (first if i % 2 else second).accept(new("the-key", f"replica-msg-{i}"))
            for i in range(20)
        ]
        results = await asyncio.gather(*attempts)
        created = [record for record, was_created in results if was_created]
        assert len(created) == 1
        assert {record.message_id for record, _ in results} == {created[0].message_id}
        page = await first.list(page_size=100)
        assert [r.idempotency_key for r in page.messages] == ["the-key"]
    finally:
        await first.close()
        await second.close()


async def test_concurrent_statuses_from_two_ledgers_lose_nothing(
    backend: Backend, clock: FakeClock
) -> None:
    first, second = backend.open(clock), backend.open(clock)
    try:
        await first.migrate()
        records = [(await first.accept(new(f"k{i}", f"m{i}")))[0] for i in range(30)]
        updates = [
            StatusUpdate(state=state, message_id=r.message_id, event_id=f"{r.message_id}:{state}")
            for r in records
            for state in (S.DELIVERY_STATE_SENT, S.DELIVERY_STATE_DELIVERED, S.DELIVERY_STATE_READ)
        ]
        await asyncio.gather(
            *(
                (first if i % 2 else second).record_status(u)
                for i, u in enumerate(updates + updates)
            )
        )
        for record in records:
            final = await second.get(record.message_id)
            assert final.state == S.DELIVERY_STATE_READ
            # ACCEPTED plus at most one entry per distinct event.
            event_ids = [e.event_id for e in final.timeline]
            assert len(event_ids) == len(set(event_ids))
    finally:
        await first.close()
        await second.close()


async def test_two_engines_switch_a_message_once(backend: Backend, clock: FakeClock) -> None:
    first, second = backend.open(clock), backend.open(clock)
    published: list[tuple[str, int]] = []

    async def publish(command: SendMessageCommand) -> None:
        published.append((command.message_id, command.attempt))

    try:
        await first.migrate()
        for i in range(10):
            mid = f"fb-{i}"
            await first.accept(
                NewMessage(
                    idempotency_key=mid,
                    message_id=mid,
                    channel="sms",
                    provider="twilio",
                    address="+15550001111",
                    command=SendMessageCommand(
                        message_id=mid, channel="sms", provider="twilio"
                    ).SerializeToString(),
                    fallback=FallbackPolicy(
                        steps=[
                            FallbackStep(
                                channel="sms",
                                provider="twilio",
                                address="+15550001111",
                                wait=timedelta(seconds=30),
                            ),
                            FallbackStep(
                                channel="email", provider="sendgrid", address="a@b.example"
                            ),
                        ]
                    ),
                )
            )
            await first.mark_dispatched(mid, 1)  # else the engines replay the first send
        clock.advance(seconds=31)
        engines = [FallbackEngine(first, publish), FallbackEngine(second, publish)]
        outcomes = await asyncio.gather(*(e.run_once() for e in engines))
        switched = [o for batch in outcomes for o in batch if o.action == TimerAction.SWITCHED]
        assert len(switched) == 10
        assert sorted(published) == sorted((f"fb-{i}", 2) for i in range(10))
    finally:
        await first.close()
        await second.close()


_ACCEPT_SCRIPT = """
import asyncio, json, sys
from gateway.ledger import NewMessage, open_ledger

async def main(url, schema, worker):
    ledger = open_ledger(url, schema_name=schema or None)
    out = {}
    try:
        for i in range(40):
            record, created = await ledger.accept(NewMessage(
                idempotency_key=f"proc-key-{i}", message_id=f"proc-{worker}-{i}",
                channel="sms", provider="twilio", address="+15550001111"))
            out[f"proc-key-{i}"] = [record.message_id, created]
    finally:
        await ledger.close()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


async def test_two_processes_accepting_the_same_keys(backend: Backend) -> None:
    ledger = backend.open()
    await ledger.migrate()
    try:
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _ACCEPT_SCRIPT,
                backend.url,
                backend.schema or "",
                str(worker),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for worker in (1, 2)
        ]
        async with asyncio.timeout(60):
            outputs = [await p.communicate() for p in procs]
        for proc, (_, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, err.decode()
        one, two = (json.loads(out) for out, _ in outputs)
        for key in one:
            assert one[key][0] == two[key][0], key  # both got the same message
            assert one[key][1] != two[key][1], key  # exactly one created it
        assert len((await ledger.list(page_size=1000)).messages) == 40
    finally:
        await ledger.close()


async def test_a_deadlock_victim_is_redone(
    ledger: Ledger, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A genuine PostgreSQL deadlock error, as asyncpg reports it through SQLAlchemy.
    engine = create_async_engine(asyncpg_url(postgres_url))
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(
                "DO $$ BEGIN RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END $$"
            )
    except DBAPIError as exc:
        deadlock = exc
    finally:
        await engine.dispose()
    real = store.apply_batch
    calls = 0

    async def victim_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise deadlock
        return await real(*args, **kwargs)

    record, _ = await ledger.accept(new("k1", "m1"))
    monkeypatch.setattr(store, "apply_batch", victim_once)
    after = await ledger.apply_status(
        StatusUpdate(state=S.DELIVERY_STATE_SENT, message_id=record.message_id)
    )
    assert after is not None
    assert after.state == S.DELIVERY_STATE_SENT
    assert calls == 2
