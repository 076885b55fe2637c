"""How far each type's ``_history`` has been read for deletions and re-codes (``subscription_watermarks.history_watermark``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23

A nullable column only: old workers do not read type history and ignore it; a type without it starts reading its
history at the next round's start.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("subscription_watermarks", sa.Column("history_watermark", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("subscription_watermarks") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("history_watermark")
