"""Initial ledger: messages, attempts, timeline, dedup, pending statuses, fallback timers.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the ledger tables (frozen copy of gateway/ledger/schema.py at 0001)."""
    op.create_table(
        "ledger_messages",
        sa.Column("message_id", sa.String(64), primary_key=True),
        sa.Column("idempotency_key", sa.String(255), nullable=False, unique=True),
        sa.Column("fingerprint", sa.String(128), nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("conversation_id", sa.String(128), nullable=False),
        sa.Column("correlation_id", sa.String(128), nullable=False),
        sa.Column("metadata_json", sa.Text, nullable=False),
        sa.Column("command", sa.LargeBinary, nullable=False),
        sa.Column("fallback_json", sa.Text, nullable=True),
        sa.Column("expires_at", sa.DateTime, nullable=True),
        sa.Column("trace_id", sa.String(64), nullable=False),
        sa.Column("reason_code", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("late_delivery", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_ledger_messages_created", "ledger_messages", ["created_at", "message_id"])
    op.create_index(
        "ix_ledger_messages_conversation", "ledger_messages", ["conversation_id", "created_at"]
    )
    op.create_index(
        "ix_ledger_messages_correlation", "ledger_messages", ["correlation_id", "created_at"]
    )
    op.create_table(
        "ledger_attempts",
        sa.Column(
            "message_id",
            sa.String(64),
            sa.ForeignKey("ledger_messages.message_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("provider_message_id", sa.String(255), nullable=False),
        sa.Column("dispatched", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_ledger_attempts_provider_id", "ledger_attempts", ["provider_message_id"])
    op.create_table(
        "ledger_timeline",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
        sa.Column(
            "message_id",
            sa.String(64),
            sa.ForeignKey("ledger_messages.message_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("provider_status", sa.String(128), nullable=False),
        sa.Column("reason_code", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("permanent", sa.Boolean, nullable=False),
        sa.Column("provider_message_id", sa.String(255), nullable=False),
        sa.Column("trace_id", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("occurred_at", sa.DateTime, nullable=True),
        sa.Column("recorded_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_ledger_timeline_message", "ledger_timeline", ["message_id", "seq"])
    op.create_table(
        "ledger_seen_events",
        sa.Column("event_id", sa.String(255), primary_key=True),
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("recorded_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "ledger_pending_statuses",
        sa.Column("event_id", sa.String(255), primary_key=True),
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("provider_message_id", sa.String(255), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_ledger_pending_message", "ledger_pending_statuses", ["message_id"])
    op.create_index(
        "ix_ledger_pending_provider_id", "ledger_pending_statuses", ["provider_message_id"]
    )
    op.create_table(
        "ledger_timers",
        sa.Column(
            "message_id",
            sa.String(64),
            sa.ForeignKey("ledger_messages.message_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("due_at", sa.DateTime, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
    )
    op.create_index("ix_ledger_timers_due", "ledger_timers", ["due_at"])


def downgrade() -> None:
    """Drop the ledger tables."""
    for table in (
        "ledger_timers",
        "ledger_pending_statuses",
        "ledger_seen_events",
        "ledger_timeline",
        "ledger_attempts",
        "ledger_messages",
    ):
        op.drop_table(table)
