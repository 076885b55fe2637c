"""Write-back requests: one row per evaluation to write back (pending, written, failed or superseded).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

A new table only (nothing existing changes), so old and new pods can share the database during a rolling update.
Evaluations stored before this revision have no row; a write-back task for one creates it when it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.types.TypeEngine:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _json() -> sa.types.TypeEngine:
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql")


def _ts() -> sa.types.TypeEngine:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "writeback_requests",
        sa.Column("evaluation_id", _id(), autoincrement=False, nullable=False),
        sa.Column("patient_ref", sa.String(length=256), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("sweeps", sa.Integer(), nullable=False),
        sa.Column("transient", sa.Boolean(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("results", _json(), nullable=True),
        sa.Column("next_sweep_at", _ts(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'written', 'failed', 'superseded')",
            name=op.f("ck_writeback_requests_status"),
        ),
        sa.PrimaryKeyConstraint("evaluation_id", name=op.f("pk_writeback_requests")),
    )
    op.create_index("ix_writeback_requests_status_next_sweep_at", "writeback_requests", ["status", "next_sweep_at"])
    op.create_index("ix_writeback_requests_patient_ref_status", "writeback_requests", ["patient_ref", "status"])


def downgrade() -> None:
    op.drop_table("writeback_requests")  # its indexes go with it on both dialects
