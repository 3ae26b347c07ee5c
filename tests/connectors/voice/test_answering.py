"""AnswerEvents: confirmed within the budget, retried after it, bounded, drained at stop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp

from connectors.voice.answering import AnswerEvents
from gateway.api.v1.envelope_pb2 import Event
from gateway.contract import TransientError


class RecordingLog:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **kw: Any) -> None:
        self.records.append((level, event, kw))

    def debug(self, event: str, **kw: Any) -> None:
        self._add("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._add("error", event, **kw)


class FlakyContext:
    """A ConnectorContext whose publish fails ``failures`` times, or blocks."""

    def __init__(self, failures: int = 0, block: asyncio.Event | None = None) -> None:
        self.failures, self.block = failures, block
        self.published: list[str] = []
        self.attempts = 0
        self.log = RecordingLog()

    @property
    def http(self) -> aiohttp.ClientSession:
        raise AssertionError("not used")

    def webhook_url(self, route: str, **path_params: str) -> str:
        raise AssertionError("not used")

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def publish(self, events: Sequence[Event]) -> None:
        self.attempts += 1
        if self.block is not None:
            await self.block.wait()
        if self.failures:
            self.failures -= 1
            raise TransientError("broker down")
        self.published.extend(e.id for e in events)

    async def quarantine(self, event: Event) -> None:
        raise AssertionError("not used")


def events(*ids: str) -> list[Event]:
    return [Event(id=i, type="call.ringing") for i in ids]


async def test_confirmed_within_budget() -> None:
    ctx = FlakyContext()
    answers = AnswerEvents(ctx, wait=1.0, max_pending=10)
    assert await answers.submit(events("a")) is True
    assert ctx.published == ["a"]
    assert answers.pending == 0


async def test_failures_are_retried_after_answering() -> None:
    ctx = FlakyContext(failures=2)
    answers = AnswerEvents(ctx, wait=0.01, max_pending=10, initial_backoff=0.01)
    assert await answers.submit(events("a", "b")) is False
    for _ in range(200):
        if ctx.published:
            break
        await asyncio.sleep(0.01)
    assert ctx.published == ["a", "b"]
    assert ctx.attempts == 3
    assert [r[1] for r in ctx.log.records].count("call events not confirmed, retrying") == 2


async def test_pending_is_bounded_and_stop_gives_up_loudly() -> None:
    block = asyncio.Event()
    ctx = FlakyContext(block=block)
    answers = AnswerEvents(ctx, wait=0.0, max_pending=2)
    assert await answers.submit(events("a")) is False
    assert await answers.submit(events("b")) is False
    assert await answers.submit(events("c")) is False  # over the bound: dropped
    assert answers.pending == 2
    dropped = [r for r in ctx.log.records if r[0] == "error"]
    assert dropped[0][2]["event_ids"] == ["c"]
    await answers.close(drain_timeout=0.05)
    assert answers.pending == 0
    assert ctx.published == []
    assert any(r[1] == "call events lost at shutdown: never confirmed" for r in ctx.log.records)
    assert await answers.submit(events("d")) is False  # closed


async def test_close_waits_for_a_late_confirm() -> None:
    block = asyncio.Event()
    ctx = FlakyContext(block=block)
    answers = AnswerEvents(ctx, wait=0.0, max_pending=2)
    await answers.submit(events("a"))
    asyncio.get_running_loop().call_later(0.05, block.set)
    await answers.close(drain_timeout=2.0)
    assert ctx.published == ["a"]
