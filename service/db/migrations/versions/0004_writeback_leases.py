"""One write-back per patient at a time (the ``writeback_leases`` table); when a written flag's basis was last
read again (``writebacks.checked_at``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22

A new table and a nullable column only. During a rolling update, old workers (which take no lease) can still
interleave their write-backs with new ones until they are gone, as they did before this revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "writeback_leases",
        sa.Column("patient_ref", sa.String(length=256), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("evaluation_id", sa.BigInteger(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resend", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("patient_ref", name=op.f("pk_writeback_leases")),
    )
    op.add_column("writebacks", sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("writebacks") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("checked_at")
    op.drop_table("writeback_leases")
