"""Publishing the events of an answer webhook without holding up the call.

The provider waits on an answer webhook (Twilio's voice URL, a Gather action,
Vonage's answer URL) before the caller hears anything, so the call flow must
be answered fast and must be answered even while the broker is down: a 503
here is a dropped call. :class:`AnswerEvents` therefore waits for the
publish only for a short budget and answers anyway; the publish goes on in
the background.

Where the events go when the broker cannot confirm them: both voice
connectors set ``spool_on_outage``, so with the runtime's durable spool
enabled (``spool.enabled``) ``ConnectorContext.publish`` writes them to the
spool (fsynced on local disk, republished by the runtime when the broker is
back, surviving a crash or restart) and returns; nothing stays in this
process. Only when ``publish`` raises, because no spool is configured or the
spool refused the events (full or unwritable), are they retried here in
memory, with backoff, until the broker confirms them (publishing dedupes on
the deterministic event ids, so a retry that races a late confirm publishes
nothing twice). Those in-memory retries are lost if the process dies (logged
with their ids at shutdown); the spool is what makes answer events durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gateway.api.v1.envelope_pb2 import Event
from gateway.contract import ConnectorContext


class AnswerEvents:
    """Publishes answer-webhook events: confirmed within a budget, else retried."""

    def __init__(
        self,
        context: ConnectorContext,
        *,
        wait: float,
        max_pending: int,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self._ctx = context
        self._wait, self._max_pending = wait, max_pending
        self._initial_backoff, self._max_backoff = initial_backoff, max_backoff
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pending(self) -> int:
        """Batches of events not yet confirmed."""
        return len(self._tasks)

    async def submit(self, events: Sequence[Event]) -> bool:
        """Publish ``events``; True when confirmed (or spooled) within the wait budget.

        Never raises for broker trouble: unconfirmed events keep being
        retried in the background (the caller answers the provider anyway).
        """
        if not events:
            return True
        if self._closed:
            self._ctx.log.error(
                "call events dropped: connector stopping", event_ids=[e.id for e in events]
            )
            return False
        if len(self._tasks) >= self._max_pending:
            # Memory is the only bound left: refuse to grow without limit, loudly.
            self._ctx.log.error(
                "call events dropped: too many unconfirmed events",
                event_ids=[e.id for e in events],
                pending=len(self._tasks),
            )
            return False
        task = asyncio.create_task(self._deliver(list(events)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # asyncio.wait (unlike wait_for) leaves the delivery running past the budget.
        done, _ = await asyncio.wait({task}, timeout=self._wait)
        return bool(done) and not task.cancelled() and task.exception() is None

    async def _deliver(self, events: list[Event]) -> None:
        backoff = self._initial_backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._ctx.publish(events)
                if attempt > 1:
                    self._ctx.log.info("call events published after retry", attempts=attempt)
                return
            except Exception as exc:  # noqa: BLE001 - any failure is retried: the call was answered
                # publish spools broker failures when the runtime has a spool,
                # so reaching here means neither broker nor spool took them.
                self._ctx.log.warning(
                    "call events not confirmed, retrying",
                    error=repr(exc),
                    attempt=attempt,
                    retry_in=backoff,
                    event_ids=[e.id for e in events],
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def close(self, drain_timeout: float) -> None:
        """Wait up to ``drain_timeout`` for retries to succeed, then give up loudly."""
        self._closed = True
        if not self._tasks:
            return
        _, still = await asyncio.wait(set(self._tasks), timeout=drain_timeout)
        for task in still:
            task.cancel()
        if still:
            self._ctx.log.error("call events lost at shutdown: never confirmed", batches=len(still))
        await asyncio.gather(*still, return_exceptions=True)
