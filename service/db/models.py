"""Tables of the service (typed SQLAlchemy 2 declarative models).

No business logic here and no queries: all SQL lives in :mod:`service.db.repositories`. Timestamps are
timezone-aware UTC (:class:`~service.db.base.UTCDateTime`) and set by the repositories from Python, never by
server defaults, so SQLite and PostgreSQL store the same values.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Boolean, CheckConstraint, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base, UTCDateTime, id_type, json_type, utcnow

REF_LEN = 256  # "Patient/<id>" and other relative references; FHIR ids are at most 64 characters
SUBSCRIPTION_LEN = 512
DEDUP_KEY_LEN = 512


class EventStatus(StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    PROCESSING = "processing"
    HANDLED = "handled"
    FAILED = "failed"
    IGNORED = "ignored"


class EventKind(StrEnum):
    """Known ledger kinds (the column accepts others, so a new notification shape needs no migration)."""

    RESOURCE = "resource"
    BACKPORT_EVENT = "backport-event"
    EMPTY_PING = "empty-ping"
    POLL = "poll"
    BACKFILL = "backfill"
    HANDSHAKE = "handshake"
    HEARTBEAT = "heartbeat"
    CATCH_UP = "catch-up"  # the next round of a _lastUpdated search cut at CDS_FHIR_MAX_PAGES


class WritebackStatus(StrEnum):
    PENDING = "pending"  # to be written (queued, running, or waiting for a task retry or the sweeper)
    WRITTEN = "written"
    FAILED = "failed"  # given up: listed by `events --failed`, replayable; a transient one is retried by the sweeper
    SUPERSEDED = "superseded"  # a newer evaluation of the patient is written instead


class FeedbackOutcome(StrEnum):
    ACCEPTED = "accepted"
    OVERRIDDEN = "overridden"


def _in(values: type[StrEnum]) -> str:
    return ", ".join(f"'{v.value}'" for v in values)


class InboundEvent(Base):
    """The idempotency ledger: one row per distinct inbound notification, poll hit or backfill item."""

    __tablename__ = "inbound_events"
    __table_args__ = (
        Index("ix_inbound_events_status_updated_at", "status", "updated_at"),
        CheckConstraint(f"status IN ({_in(EventStatus)})", name="status"),
    )

    id: Mapped[int] = mapped_column(id_type(), primary_key=True, autoincrement=True)
    dedup_key: Mapped[str] = mapped_column(String(DEDUP_KEY_LEN), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    subscription: Mapped[str | None] = mapped_column(String(SUBSCRIPTION_LEN))
    event_number: Mapped[int | None] = mapped_column(BigInteger)
    resource_type: Mapped[str | None] = mapped_column(String(64))
    resource_id: Mapped[str | None] = mapped_column(String(128))
    version_id: Mapped[str | None] = mapped_column(String(64))
    patient_ref: Mapped[str | None] = mapped_column(String(REF_LEN), index=True)
    payload: Mapped[dict[str, Any] | None] = mapped_column(json_type())
    status: Mapped[str] = mapped_column(String(16), default=EventStatus.RECEIVED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    handled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PatientResource(Base):
    """Current state of one FHIR resource of a monitored patient (a tombstone once deleted).

    ``version_num`` is ``version_id`` as an integer when it is one; it lets the version guard compare
    versions numerically inside the database.
    """

    __tablename__ = "patient_resources"
    __table_args__ = (
        UniqueConstraint("resource_type", "resource_id"),
        Index("ix_patient_resources_patient_ref_resource_type", "patient_ref", "resource_type"),
    )

    id: Mapped[int] = mapped_column(id_type(), primary_key=True, autoincrement=True)
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(128))
    patient_ref: Mapped[str | None] = mapped_column(String(REF_LEN))
    version_id: Mapped[str | None] = mapped_column(String(64))
    version_num: Mapped[int | None] = mapped_column(BigInteger)
    last_updated: Mapped[datetime | None] = mapped_column(UTCDateTime)
    content: Mapped[dict[str, Any] | None] = mapped_column(json_type())
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PatientEvaluationQueue(Base):
    """Coalescing of evaluations: one row per patient; ``generation`` counts every mark_dirty."""

    __tablename__ = "patient_evaluation_queue"

    patient_ref: Mapped[str] = mapped_column(String(REF_LEN), primary_key=True)
    dirty_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)


class Evaluation(Base):
    """One stored risk evaluation (audit: inputs as references and versions, versions of rules and mappings)."""

    __tablename__ = "evaluations"
    __table_args__ = (
        Index("ix_evaluations_patient_ref_evaluated_at", "patient_ref", "evaluated_at"),
        Index("ix_evaluations_patient_ref_inputs_hash", "patient_ref", "inputs_hash"),
    )

    id: Mapped[int] = mapped_column(id_type(), primary_key=True, autoincrement=True)
    patient_ref: Mapped[str] = mapped_column(String(REF_LEN))
    evaluated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    inputs_hash: Mapped[str] = mapped_column(String(128))
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(json_type())
    rules_version: Mapped[str] = mapped_column(String(64))
    mappings_version: Mapped[str] = mapped_column(String(128))
    calciphylaxis_tier: Mapped[str] = mapped_column(String(32))
    metastatic_tier: Mapped[str] = mapped_column(String(32))
    renal_context: Mapped[str | None] = mapped_column(String(16))
    assessment: Mapped[dict[str, Any]] = mapped_column(json_type())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Writeback(Base):
    """The last RiskAssessment (or flag) written back to the EHR per patient and flag."""

    __tablename__ = "writebacks"
    __table_args__ = (UniqueConstraint("patient_ref", "flag"),)

    id: Mapped[int] = mapped_column(id_type(), primary_key=True, autoincrement=True)
    patient_ref: Mapped[str] = mapped_column(String(REF_LEN))
    flag: Mapped[str] = mapped_column(String(64))
    identifier_system: Mapped[str] = mapped_column(String(512))
    identifier_value: Mapped[str] = mapped_column(String(256))
    basis_hash: Mapped[str] = mapped_column(String(128))
    tier: Mapped[str] = mapped_column(String(32))
    fhir_id: Mapped[str | None] = mapped_column(String(128))
    fhir_version: Mapped[str | None] = mapped_column(String(64))
    written_at: Mapped[datetime] = mapped_column(UTCDateTime)
    checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # its basis last read again from the FHIR server


class WritebackRequest(Base):
    """The write-back of one evaluation's RiskAssessments to the EHR, until it is written: its attempts, its last
    error (error types and HTTP statuses only, no values) and when the sweeper may send it again."""

    __tablename__ = "writeback_requests"
    __table_args__ = (
        Index("ix_writeback_requests_status_next_sweep_at", "status", "next_sweep_at"),
        Index("ix_writeback_requests_patient_ref_status", "patient_ref", "status"),
        CheckConstraint(f"status IN ({_in(WritebackStatus)})", name="status"),
    )

    evaluation_id: Mapped[int] = mapped_column(id_type(), primary_key=True, autoincrement=False)
    patient_ref: Mapped[str] = mapped_column(String(REF_LEN))
    status: Mapped[str] = mapped_column(String(16), default=WritebackStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # task runs (Celery retries included)
    sweeps: Mapped[int] = mapped_column(Integer, default=0)  # times the sweeper sent it again
    transient: Mapped[bool] = mapped_column(Boolean, default=False)  # failed on a transient error: the sweeper retries it
    last_error: Mapped[str | None] = mapped_column(Text)
    results: Mapped[dict[str, Any] | None] = mapped_column(json_type())  # flag → written | unchanged
    next_sweep_at: Mapped[datetime] = mapped_column(UTCDateTime)  # not sent again by the sweeper before this
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WritebackLease(Base):
    """Who is writing one patient's RiskAssessments to the EHR now: one write-back per patient at a time, so an
    older evaluation's slow PUT can never land after a newer one's.

    ``holder`` is one task run's token. ``expires_at`` bounds the run: an expired lease is taken over (after a
    killed worker, say). ``resend`` says the EHR may hold an older evaluation's resource (a run whose lease had
    expired wrote after another): whoever takes the lease next writes every flag again instead of skipping unchanged
    ones. A row with an empty ``holder`` that has expired only carries that demand."""

    __tablename__ = "writeback_leases"

    patient_ref: Mapped[str] = mapped_column(String(REF_LEN), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    evaluation_id: Mapped[int | None] = mapped_column(BigInteger)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    resend: Mapped[bool] = mapped_column(Boolean, default=False)


class CardFeedback(Base):
    """CDS Hooks feedback on a card; the same outcome for the same card is stored once."""

    __tablename__ = "card_feedback"
    __table_args__ = (
        UniqueConstraint("service_id", "card_uuid", "outcome"),
        CheckConstraint(f"outcome IN ({_in(FeedbackOutcome)})", name="outcome"),
    )

    id: Mapped[int] = mapped_column(id_type(), primary_key=True, autoincrement=True)
    service_id: Mapped[str] = mapped_column(String(128))
    card_uuid: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    outcome_timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    override_reason: Mapped[dict[str, Any] | None] = mapped_column(json_type())
    accepted_suggestions: Mapped[list[dict[str, Any]] | None] = mapped_column(json_type())
    user_comment: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class IssuedCard(Base):
    """A card the service returned (joined with card_feedback for audit)."""

    __tablename__ = "issued_cards"

    card_uuid: Mapped[str] = mapped_column(String(64), primary_key=True)
    service_id: Mapped[str] = mapped_column(String(128))
    patient_ref: Mapped[str] = mapped_column(String(REF_LEN), index=True)
    topic: Mapped[str | None] = mapped_column(String(128))
    rule_id: Mapped[str | None] = mapped_column(String(128))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class SubscriptionState(Base):
    """What the receiver knows about one FHIR Subscription: event numbering, liveness, polling watermark."""

    __tablename__ = "subscription_state"

    subscription: Mapped[str] = mapped_column(String(SUBSCRIPTION_LEN), primary_key=True)
    topic: Mapped[str | None] = mapped_column(String(SUBSCRIPTION_LEN))
    criteria: Mapped[str | None] = mapped_column(Text)
    last_event_number: Mapped[int | None] = mapped_column(BigInteger)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_notification_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    watermark: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SubscriptionWatermark(Base):
    """How far one resource type's ``_lastUpdated`` catch-up search of a subscription has fetched everything.

    One row per type: a single mark across types would skip a change to one type made while another was searched
    (the newest ``lastUpdated`` of the type searched last is later than the first type's search)."""

    __tablename__ = "subscription_watermarks"

    subscription: Mapped[str] = mapped_column(String(SUBSCRIPTION_LEN), primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    watermark: Mapped[datetime] = mapped_column(UTCDateTime)
    #: How far the type's ``_history`` has been read completely for deletions and re-codes (its own mark: a type
    #: whose only changes are ones its search filters out, vitals, would otherwise read an ever longer window).
    history_watermark: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


__all__ = [
    "CardFeedback",
    "Evaluation",
    "EventKind",
    "EventStatus",
    "FeedbackOutcome",
    "InboundEvent",
    "IssuedCard",
    "PatientEvaluationQueue",
    "PatientResource",
    "SubscriptionState",
    "SubscriptionWatermark",
    "Writeback",
    "WritebackLease",
    "WritebackRequest",
    "WritebackStatus",
]
