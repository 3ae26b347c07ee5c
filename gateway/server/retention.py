"""Ledger retention: a periodic task in the gateway that deletes what is kept too long.

Two things grow without bound otherwise:

* settled messages (a final state or DELIVERED, no fallback timer left) with
  their attempts, timeline and remembered event ids, deleted once they were
  last updated more than ``gateway.retention.messages_days`` ago; their
  idempotency keys become free again, so keep them at least as long as a
  client may repeat a request;
* call commands (SendCallCommand), deleted like messages once last updated
  more than ``messages_days`` ago, whatever their state (a command still
  PENDING that long never reached a connector); their keys become free too;
* pending statuses that never met their message (a status for a purged or
  unknown message), dropped after ``gateway.retention.pending_hours``.

Each pass deletes in batches of ``batch_size`` (one short write transaction
each, so ingestion is not starved) and stops after ``max_batches`` batches;
the next pass goes on. Several gateways sharing one PostgreSQL ledger may all
run it: the ledger locks the rows it deletes with ``SKIP LOCKED``. A failed
pass (database down) is logged and counted, and the next one tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta

from prometheus_client import Counter

from gateway.ledger.store import Ledger
from gateway.runtime.telemetry import get_logger
from gateway.server.settings import RetentionSettings

log = get_logger("gateway.retention")

PURGED = Counter(
    "gateway_ledger_purged_total",
    "Ledger rows deleted by retention: settled messages, call commands and never-matched "
    "pending statuses",
    ["kind"],
)
RETENTION_FAILURES = Counter(
    "gateway_ledger_retention_failures_total", "Retention passes that failed (retried next pass)"
)


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What one retention pass deleted."""

    messages: int
    pending: int
    #: True when the pass stopped at ``max_batches`` with more left to delete.
    more: bool
    call_commands: int = 0


class RetentionTask:
    """Runs :meth:`run_once` every ``interval_seconds`` until stopped."""

    def __init__(self, ledger: Ledger, settings: RetentionSettings) -> None:
        self._ledger, self._settings = ledger, settings
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> PurgeResult:
        """One pass: settled messages past retention, then stale pending statuses."""
        s = self._settings
        now = self._ledger.now()
        messages = 0
        more = False
        if s.messages_days is not None:
            before = now - timedelta(days=s.messages_days)
            for _ in range(s.max_batches):
                deleted = await self._ledger.purge(before, limit=s.batch_size)
                messages += deleted
                more = deleted == s.batch_size
                if not more:
                    break
                await asyncio.sleep(0)  # let ingestion and RPCs in between batches
        call_commands = 0
        if s.messages_days is not None:
            before = now - timedelta(days=s.messages_days)
            for _ in range(s.max_batches):
                deleted = await self._ledger.purge_call_commands(before, limit=s.batch_size)
                call_commands += deleted
                if deleted < s.batch_size:
                    break
                await asyncio.sleep(0)
            else:
                more = True  # every batch was full: go on next pass
        pending = 0
        if s.pending_hours is not None:
            pending = await self._ledger.purge_pending(now - timedelta(hours=s.pending_hours))
        if messages:
            PURGED.labels("message").inc(messages)
        if pending:
            PURGED.labels("pending_status").inc(pending)
        if call_commands:
            PURGED.labels("call_command").inc(call_commands)
        if messages or pending or call_commands:
            log.info(
                "ledger retention",
                messages=messages,
                call_commands=call_commands,
                pending_statuses=pending,
                more=more,
            )
        return PurgeResult(
            messages=messages, pending=pending, more=more, call_commands=call_commands
        )

    async def _loop(self) -> None:
        while True:
            try:
                result = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed pass must not end retention
                RETENTION_FAILURES.inc()
                log.warning("ledger retention failed; retrying next pass", error=repr(exc))
                result = PurgeResult(messages=0, pending=0, more=False)
            # More left over: go on soon rather than a whole interval later.
            await asyncio.sleep(
                min(1.0, self._settings.interval_seconds)
                if result.more
                else self._settings.interval_seconds
            )

    def start(self) -> None:
        """Start the periodic task (the first pass runs at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="ledger retention")

    async def stop(self) -> None:
        """Stop the task (a pass in flight is cancelled; its batches are atomic)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
