"""Initial schema: ledger, patient state, evaluation queue, evaluations, write-backs, cards, subscriptions.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Checked against the models by tests/service/db/test_migrations.py (an autogenerate diff after upgrading an
empty SQLite and an empty PostgreSQL database is empty).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.types.TypeEngine:
    # BIGINT, but INTEGER on SQLite where only INTEGER PRIMARY KEY autoincrements.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _json() -> sa.types.TypeEngine:
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql")


def _ts() -> sa.types.TypeEngine:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "inbound_events",
        sa.Column("id", _id(), autoincrement=True, nullable=False),
        sa.Column("dedup_key", sa.String(length=512), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("subscription", sa.String(length=512), nullable=True),
        sa.Column("event_number", sa.BigInteger(), nullable=True),
        sa.Column("resource_type", sa.String(length=64), nullable=True),
        sa.Column("resource_id", sa.String(length=128), nullable=True),
        sa.Column("version_id", sa.String(length=64), nullable=True),
        sa.Column("patient_ref", sa.String(length=256), nullable=True),
        sa.Column("payload", _json(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("received_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.Column("handled_at", _ts(), nullable=True),
        sa.CheckConstraint(
            "status IN ('received', 'queued', 'processing', 'handled', 'failed', 'ignored')",
            name=op.f("ck_inbound_events_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbound_events")),
        sa.UniqueConstraint("dedup_key", name=op.f("uq_inbound_events_dedup_key")),
    )
    op.create_index(op.f("ix_inbound_events_patient_ref"), "inbound_events", ["patient_ref"])
    op.create_index("ix_inbound_events_status_updated_at", "inbound_events", ["status", "updated_at"])

    op.create_table(
        "patient_resources",
        sa.Column("id", _id(), autoincrement=True, nullable=False),
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("resource_id", sa.String(length=128), nullable=False),
        sa.Column("patient_ref", sa.String(length=256), nullable=True),
        sa.Column("version_id", sa.String(length=64), nullable=True),
        sa.Column("version_num", sa.BigInteger(), nullable=True),
        sa.Column("last_updated", _ts(), nullable=True),
        sa.Column("content", _json(), nullable=True),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_resources")),
        sa.UniqueConstraint("resource_type", "resource_id", name=op.f("uq_patient_resources_resource_type_resource_id")),
    )
    op.create_index(
        "ix_patient_resources_patient_ref_resource_type", "patient_resources", ["patient_ref", "resource_type"]
    )

    op.create_table(
        "patient_evaluation_queue",
        sa.Column("patient_ref", sa.String(length=256), nullable=False),
        sa.Column("dirty_since", _ts(), nullable=True),
        sa.Column("requested_at", _ts(), nullable=False),
        sa.Column("last_started_at", _ts(), nullable=True),
        sa.Column("last_finished_at", _ts(), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("patient_ref", name=op.f("pk_patient_evaluation_queue")),
    )

    op.create_table(
        "evaluations",
        sa.Column("id", _id(), autoincrement=True, nullable=False),
        sa.Column("patient_ref", sa.String(length=256), nullable=False),
        sa.Column("evaluated_at", _ts(), nullable=False),
        sa.Column("inputs_hash", sa.String(length=128), nullable=False),
        sa.Column("inputs", _json(), nullable=False),
        sa.Column("rules_version", sa.String(length=64), nullable=False),
        sa.Column("mappings_version", sa.String(length=128), nullable=False),
        sa.Column("calciphylaxis_tier", sa.String(length=32), nullable=False),
        sa.Column("metastatic_tier", sa.String(length=32), nullable=False),
        sa.Column("renal_context", sa.String(length=16), nullable=True),
        sa.Column("assessment", _json(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
    )
    op.create_index("ix_evaluations_patient_ref_evaluated_at", "evaluations", ["patient_ref", "evaluated_at"])
    op.create_index("ix_evaluations_patient_ref_inputs_hash", "evaluations", ["patient_ref", "inputs_hash"])

    op.create_table(
        "writebacks",
        sa.Column("id", _id(), autoincrement=True, nullable=False),
        sa.Column("patient_ref", sa.String(length=256), nullable=False),
        sa.Column("flag", sa.String(length=64), nullable=False),
        sa.Column("identifier_system", sa.String(length=512), nullable=False),
        sa.Column("identifier_value", sa.String(length=256), nullable=False),
        sa.Column("basis_hash", sa.String(length=128), nullable=False),
        sa.Column("tier", sa.String(length=32), nullable=False),
        sa.Column("fhir_id", sa.String(length=128), nullable=True),
        sa.Column("fhir_version", sa.String(length=64), nullable=True),
        sa.Column("written_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_writebacks")),
        sa.UniqueConstraint("patient_ref", "flag", name=op.f("uq_writebacks_patient_ref_flag")),
    )

    op.create_table(
        "card_feedback",
        sa.Column("id", _id(), autoincrement=True, nullable=False),
        sa.Column("service_id", sa.String(length=128), nullable=False),
        sa.Column("card_uuid", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("outcome_timestamp", _ts(), nullable=False),
        sa.Column("override_reason", _json(), nullable=True),
        sa.Column("accepted_suggestions", _json(), nullable=True),
        sa.Column("user_comment", sa.Text(), nullable=True),
        sa.Column("received_at", _ts(), nullable=False),
        sa.CheckConstraint("outcome IN ('accepted', 'overridden')", name=op.f("ck_card_feedback_outcome")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_card_feedback")),
        sa.UniqueConstraint(
            "service_id", "card_uuid", "outcome", name=op.f("uq_card_feedback_service_id_card_uuid_outcome")
        ),
    )
    op.create_index(op.f("ix_card_feedback_card_uuid"), "card_feedback", ["card_uuid"])
    op.create_index(op.f("ix_card_feedback_received_at"), "card_feedback", ["received_at"])

    op.create_table(
        "issued_cards",
        sa.Column("card_uuid", sa.String(length=64), nullable=False),
        sa.Column("service_id", sa.String(length=128), nullable=False),
        sa.Column("patient_ref", sa.String(length=256), nullable=False),
        sa.Column("topic", sa.String(length=128), nullable=True),
        sa.Column("rule_id", sa.String(length=128), nullable=True),
        sa.Column("issued_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("card_uuid", name=op.f("pk_issued_cards")),
    )
    op.create_index(op.f("ix_issued_cards_issued_at"), "issued_cards", ["issued_at"])
    op.create_index(op.f("ix_issued_cards_patient_ref"), "issued_cards", ["patient_ref"])

    op.create_table(
        "subscription_state",
        sa.Column("subscription", sa.String(length=512), nullable=False),
        sa.Column("topic", sa.String(length=512), nullable=True),
        sa.Column("criteria", sa.Text(), nullable=True),
        sa.Column("last_event_number", sa.BigInteger(), nullable=True),
        sa.Column("last_heartbeat_at", _ts(), nullable=True),
        sa.Column("last_notification_at", _ts(), nullable=True),
        sa.Column("watermark", _ts(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("subscription", name=op.f("pk_subscription_state")),
    )


def downgrade() -> None:
    # Dropping a table drops its indexes on both dialects.
    for table in (
        "subscription_state",
        "issued_cards",
        "card_feedback",
        "writebacks",
        "evaluations",
        "patient_evaluation_queue",
        "patient_resources",
        "inbound_events",
    ):
        op.drop_table(table)
