"""Indexes for the fallback engine's outbox replay and for purging old messages.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Partial index of unconfirmed commands (polled every second); seen events by message."""
    op.create_index(
        "ix_ledger_attempts_undispatched",
        "ledger_attempts",
        ["created_at"],
        postgresql_where=sa.text("NOT dispatched"),
        sqlite_where=sa.text("dispatched = 0"),
    )
    op.create_index("ix_ledger_seen_events_message", "ledger_seen_events", ["message_id"])
    op.create_index("ix_ledger_messages_updated", "ledger_messages", ["updated_at"])


def downgrade() -> None:
    """Drop the indexes."""
    op.drop_index("ix_ledger_messages_updated", "ledger_messages")
    op.drop_index("ix_ledger_seen_events_message", "ledger_seen_events")
    op.drop_index("ix_ledger_attempts_undispatched", "ledger_attempts")
