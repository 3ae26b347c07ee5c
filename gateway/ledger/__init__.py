"""The delivery ledger: outbound messages, their status timelines and fallback.

Public interface (used by the gRPC server in ``gateway/server``)::

    ledger = open_ledger("sqlite+aiosqlite:///channel-gateway.db")  # or postgresql+asyncpg://
    await ledger.migrate()
    record, created = await ledger.accept(NewMessage(idempotency_key=..., channel=..., ...))
    if created or not record.dispatched:
        ...publish the SendMessageCommand...
        await ledger.mark_dispatched(record.message_id, record.attempt)
    record = await ledger.get(message_id)            # with .timeline (ordered StatusEntry)
    page = await ledger.list(ListFilter(conversation_id=...), page_size=50, page_token="")
    await ledger.close()

Statuses reach the ledger through :class:`StatusIngestor` (``message.status.#``
on the bus) or :meth:`Ledger.apply_status`; :class:`FallbackEngine` runs the
persisted fallback timers and publishes the next step's command.
"""

from gateway.ledger.fallback import FallbackEngine, bus_command_publisher, notice_event
from gateway.ledger.ingest import StatusIngestor, status_update_from_event
from gateway.ledger.models import (
    REASON_FALLBACK_EXHAUSTED,
    REASON_FALLBACK_TTL,
    REASON_LATE_DELIVERY,
    REASON_REJECTED,
    REASON_TIMEOUT,
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
    Page,
    StatusEntry,
    StatusUpdate,
    Timer,
)
from gateway.ledger.store import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_URL,
    MAX_PAGE_SIZE,
    Applied,
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
    "REASON_TIMEOUT",
    "Applied",
    "Attempt",
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
    "NewMessage",
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
