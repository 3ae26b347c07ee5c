"""The delivery ledger: outbound messages, their status timelines and fallback.

Public interface (used by the gRPC server in ``gateway/server``)::

    ledger = open_ledger("sqlite+aiosqlite:///channel-gateway.db")  # or postgresql+asyncpg://
    await ledger.migrate()                                          # alembic, idempotent
    record, created = await ledger.accept(NewMessage(idempotency_key=..., channel=...,
                                                     command=cmd.SerializeToString(), ...))
    if created or not record.dispatched:
        ...publish the SendMessageCommand (ledger.command_for(id, attempt) rebuilds it)...
        await ledger.mark_dispatched(record.message_id, record.attempt)
    record = await ledger.get(message_id)            # .timeline: ordered StatusEntry
    page = await ledger.list(ListFilter(conversation_id=...), page_size=50, page_token="")
    await ledger.close()

Call commands (SendCallCommand) have their own table: ``accept_call_command``
records one PENDING, ``mark_call_dispatched`` once the broker confirmed it,
``record_call_outcome`` applies the connector's ``call.command`` event (the
first outcome wins; an outcome of an unknown command is stored too) and
``get_call_command`` reads it (:class:`CallCommandNotFoundError`).

Errors: :class:`IdempotencyConflictError` (key reused for another request),
:class:`MessageNotFoundError` (``get``), :class:`NotRetryableError`
(``retry`` of a message that did not fail), :class:`InvalidPageTokenError` and
``ValueError`` (bad list arguments); database outages surface as SQLAlchemy
errors.

In the gateway process, statuses reach the ledger through
:class:`StatusIngestor` (``message.status.#`` on the bus, group commit, ack
after commit) and :class:`FallbackEngine` runs the persisted fallback timers,
publishing the next step's command with :func:`bus_command_publisher`. Both
take an ``emit`` callback for the ledger's own status events
(:func:`notice_event`: SWITCHING_CHANNEL, the final ``fallback_exhausted`` /
``fallback_ttl_expired`` status, and late deliveries marked with
``attributes["gateway.late_delivery"] = "true"``).

The contract has no dedicated state for "no channel left" or "late delivery":
the ledger uses FAILED with reason code ``fallback_exhausted``, and a
``LATE_DELIVERY`` timeline entry (reason code ``late_delivery``).

``python -m gateway.ledger.bench`` measures the ledger on SQLite or PostgreSQL.
"""

from gateway.ledger.calls import (
    CallCommandNotFoundError,
    CallCommandRecord,
    CallOutcome,
    CallOutcomeApplied,
    NewCallCommand,
)
from gateway.ledger.fallback import FallbackEngine, bus_command_publisher, notice_event
from gateway.ledger.ingest import StatusIngestor, status_update_from_event
from gateway.ledger.models import (
    REASON_FALLBACK_EXHAUSTED,
    REASON_FALLBACK_TTL,
    REASON_LATE_DELIVERY,
    REASON_REJECTED,
    REASON_RETRY,
    REASON_TIMEOUT,
    Applied,
    Attempt,
    EntryKind,
    FallbackPolicy,
    FallbackStep,
    IdempotencyConflictError,
    InvalidPageTokenError,
    LedgerError,
    ListFilter,
    MessageNotFoundError,
    MessageRecord,
    NewMessage,
    NotRetryableError,
    Page,
    StatusEntry,
    StatusUpdate,
    Timer,
)
from gateway.ledger.store import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_URL,
    MAX_PAGE_SIZE,
    Ledger,
    TimerAction,
    TimerOutcome,
    open_ledger,
)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_URL",
    "MAX_PAGE_SIZE",
    "REASON_FALLBACK_EXHAUSTED",
    "REASON_FALLBACK_TTL",
    "REASON_LATE_DELIVERY",
    "REASON_REJECTED",
    "REASON_RETRY",
    "REASON_TIMEOUT",
    "Applied",
    "Attempt",
    "CallCommandNotFoundError",
    "CallCommandRecord",
    "CallOutcome",
    "CallOutcomeApplied",
    "EntryKind",
    "FallbackEngine",
    "FallbackPolicy",
    "FallbackStep",
    "IdempotencyConflictError",
    "InvalidPageTokenError",
    "Ledger",
    "LedgerError",
    "ListFilter",
    "MessageNotFoundError",
    "MessageRecord",
    "NewCallCommand",
    "NewMessage",
    "NotRetryableError",
    "Page",
    "StatusEntry",
    "StatusIngestor",
    "StatusUpdate",
    "Timer",
    "TimerAction",
    "TimerOutcome",
    "bus_command_publisher",
    "notice_event",
    "open_ledger",
    "status_update_from_event",
]
