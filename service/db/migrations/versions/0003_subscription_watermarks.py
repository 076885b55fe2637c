"""Per-type polling watermarks: one row per subscription and resource type.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

A new table only, so old and new pods can share the database during a rolling update. A subscription with no row
for a type starts that type's search from ``subscription_state.watermark``, as before this revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts() -> sa.types.TypeEngine:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "subscription_watermarks",
        sa.Column("subscription", sa.String(length=512), nullable=False),
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("watermark", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("subscription", "resource_type", name=op.f("pk_subscription_watermarks")),
    )


def downgrade() -> None:
    op.drop_table("subscription_watermarks")
