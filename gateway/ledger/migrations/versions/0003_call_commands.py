"""Call commands sent through SendCallCommand and their outcomes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ledger_call_commands (frozen copy of gateway/ledger/schema.py at 0003)."""
    op.create_table(
        "ledger_call_commands",
        sa.Column("command_id", sa.String(128), primary_key=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True, unique=True),
        sa.Column("fingerprint", sa.String(128), nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("command", sa.LargeBinary, nullable=False),
        sa.Column("dispatched", sa.Boolean, nullable=False),
        sa.Column("call_id", sa.String(255), nullable=False),
        sa.Column("provider_status", sa.String(128), nullable=False),
        sa.Column("reason_code", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("permanent", sa.Boolean, nullable=False),
        sa.Column("correlation_id", sa.String(128), nullable=False),
        sa.Column("conversation_id", sa.String(128), nullable=False),
        sa.Column("trace_id", sa.String(64), nullable=False),
        sa.Column("outcome_event_id", sa.String(255), nullable=False),
        sa.Column("completed_at", sa.DateTime, nullable=True),
        sa.Column("expires_at", sa.DateTime, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_ledger_call_commands_updated", "ledger_call_commands", ["updated_at"])


def downgrade() -> None:
    """Drop ledger_call_commands."""
    op.drop_index("ix_ledger_call_commands_updated", "ledger_call_commands")
    op.drop_table("ledger_call_commands")
