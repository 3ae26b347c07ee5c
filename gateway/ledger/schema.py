"""Tables of the delivery ledger (SQLAlchemy Core; one schema for SQLite and PostgreSQL).

The migrations in ``gateway/ledger/migrations`` create exactly these tables;
``tests/ledger/test_migrations.py`` checks that they agree. Datetimes are
stored naive in UTC so both backends compare and order them the same way.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

#: An auto-incrementing 64-bit key (SQLite only auto-increments INTEGER PRIMARY KEY).
SeqType = BigInteger().with_variant(Integer(), "sqlite")

messages = Table(
    "ledger_messages",
    metadata,
    Column("message_id", String(64), primary_key=True),
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("fingerprint", String(128), nullable=False, default=""),
    Column("state", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("conversation_id", String(128), nullable=False, default=""),
    Column("correlation_id", String(128), nullable=False, default=""),
    Column("metadata_json", Text, nullable=False, default="{}"),
    Column("command", LargeBinary, nullable=False, default=b""),
    Column("fallback_json", Text, nullable=True),
    Column("expires_at", DateTime, nullable=True),
    Column("trace_id", String(64), nullable=False, default=""),
    Column("reason_code", String(128), nullable=False, default=""),
    Column("reason", Text, nullable=False, default=""),
    Column("late_delivery", Boolean, nullable=False, default=False),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Index("ix_ledger_messages_created", "created_at", "message_id"),
    Index("ix_ledger_messages_conversation", "conversation_id", "created_at"),
    Index("ix_ledger_messages_correlation", "correlation_id", "created_at"),
    Index("ix_ledger_messages_updated", "updated_at"),
)

attempts = Table(
    "ledger_attempts",
    metadata,
    Column(
        "message_id",
        String(64),
        ForeignKey("ledger_messages.message_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("attempt", Integer, primary_key=True),
    Column("channel", String(64), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("address", String(320), nullable=False),
    Column("state", Integer, nullable=False),
    Column("provider_message_id", String(255), nullable=False, default=""),
    Column("dispatched", Boolean, nullable=False, default=False),
    Column("created_at", DateTime, nullable=False),
    Index("ix_ledger_attempts_provider_id", "provider_message_id"),
    # The fallback engine polls for unconfirmed commands every second (0002).
    Index(
        "ix_ledger_attempts_undispatched",
        "created_at",
        postgresql_where=text("NOT dispatched"),
        sqlite_where=text("dispatched = 0"),
    ),
)

timeline = Table(
    "ledger_timeline",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column(
        "message_id",
        String(64),
        ForeignKey("ledger_messages.message_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("kind", String(32), nullable=False),
    Column("state", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("channel", String(64), nullable=False, default=""),
    Column("provider", String(64), nullable=False, default=""),
    Column("provider_status", String(128), nullable=False, default=""),
    Column("reason_code", String(128), nullable=False, default=""),
    Column("reason", Text, nullable=False, default=""),
    Column("permanent", Boolean, nullable=False, default=False),
    Column("provider_message_id", String(255), nullable=False, default=""),
    Column("trace_id", String(64), nullable=False, default=""),
    Column("event_id", String(255), nullable=False, default=""),
    Column("occurred_at", DateTime, nullable=True),
    Column("recorded_at", DateTime, nullable=False),
    Index("ix_ledger_timeline_message", "message_id", "seq"),
)

#: Every status event id applied, so a re-delivered event changes nothing.
seen_events = Table(
    "ledger_seen_events",
    metadata,
    Column("event_id", String(255), primary_key=True),
    Column("message_id", String(64), nullable=False),
    Column("recorded_at", DateTime, nullable=False),
    Index("ix_ledger_seen_events_message", "message_id"),
)

#: Statuses that arrived before their message (or its provider id) was known.
pending = Table(
    "ledger_pending_statuses",
    metadata,
    Column("event_id", String(255), primary_key=True),
    Column("message_id", String(64), nullable=False, default=""),
    Column("provider_message_id", String(255), nullable=False, default=""),
    Column("payload", Text, nullable=False),
    Column("received_at", DateTime, nullable=False),
    Index("ix_ledger_pending_message", "message_id"),
    Index("ix_ledger_pending_provider_id", "provider_message_id"),
)

#: Fallback timers: the engine looks at ``message_id`` at ``due_at``.
timers = Table(
    "ledger_timers",
    metadata,
    Column(
        "message_id",
        String(64),
        ForeignKey("ledger_messages.message_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("due_at", DateTime, nullable=False),
    Column("attempt", Integer, nullable=False),
    Index("ix_ledger_timers_due", "due_at"),
)

#: Call commands sent through SendCallCommand, and outcomes of call commands the
#: gateway did not send (``idempotency_key`` NULL), keyed by command id (0003).
call_commands = Table(
    "ledger_call_commands",
    metadata,
    Column("command_id", String(128), primary_key=True),
    # NULL for a command known only from its outcome event (NULLs are distinct).
    Column("idempotency_key", String(255), nullable=True, unique=True),
    Column("fingerprint", String(128), nullable=False, default=""),
    Column("state", Integer, nullable=False),
    Column("channel", String(64), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("account", String(64), nullable=False, default=""),
    Column("action", String(32), nullable=False),
    Column("command", LargeBinary, nullable=False, default=b""),
    Column("dispatched", Boolean, nullable=False, default=False),
    Column("call_id", String(255), nullable=False, default=""),
    Column("provider_status", String(128), nullable=False, default=""),
    Column("reason_code", String(128), nullable=False, default=""),
    Column("reason", Text, nullable=False, default=""),
    Column("permanent", Boolean, nullable=False, default=False),
    Column("correlation_id", String(128), nullable=False, default=""),
    Column("conversation_id", String(128), nullable=False, default=""),
    Column("trace_id", String(64), nullable=False, default=""),
    Column("outcome_event_id", String(255), nullable=False, default=""),
    Column("completed_at", DateTime, nullable=True),
    Column("expires_at", DateTime, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    # Retention purges by age.
    Index("ix_ledger_call_commands_updated", "updated_at"),
)
