"""All SQL of the service. Repositories take the caller's session and never commit.

Every write that can race with another process is a single atomic statement (INSERT ... ON CONFLICT,
conditional UPDATE ... RETURNING) that behaves the same on SQLite and PostgreSQL, so no repository relies
on a read-then-write inside one transaction. Where a row must be read and then changed (subscription event
numbering), the row is taken with a write first (INSERT ... ON CONFLICT DO NOTHING, which holds SQLite's
write lock) and then ``SELECT ... FOR UPDATE`` (PostgreSQL's row lock).

Timestamps default to :func:`service.db.base.utcnow`; every method that stamps time takes ``now`` so tests
(and use cases with an injected clock) control it. Messages and exceptions name ids only, never payloads.

JSON columns are replaced, never mutated in place (mutation is not tracked).

Hot paths (the notification write path, the evaluation queue, the evaluation load) execute Core statements
that are built once per dialect with bind parameters and reused (:func:`_prepared`): a reused statement
object keeps its cache key, so SQLAlchemy neither rebuilds nor re-keys it and the compiled form comes from
the compiled cache. Batches are one statement: on PostgreSQL an INSERT ... SELECT FROM jsonb_to_recordset(one
JSON parameter), the same text for every batch size (prepared once by psycopg); on SQLite ``executemany``
(``insertmanyvalues``, one multi-row INSERT ... RETURNING). Batches take their rows in key order (ledger
keys, resources, then patients; new queue rows before existing ones), so concurrent batches never wait for
each other in a cycle. Core UPDATEs do not touch the Session's identity map; :func:`_expire` expires an
affected object that is loaded, as the ORM's ``synchronize_session`` did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    String,
    Table,
    and_,
    bindparam,
    case,
    cast,
    column,
    delete,
    false,
    func,
    literal_column,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import KeyedColumnElement

from service.db.base import Base, UTCDateTime, json_dumps, utcnow
from service.db.models import (
    DEDUP_KEY_LEN,
    CardFeedback,
    Evaluation,
    EventStatus,
    FeedbackOutcome,
    InboundEvent,
    IssuedCard,
    PatientEvaluationQueue,
    PatientResource,
    SubscriptionState,
    SubscriptionWatermark,
    Writeback,
    WritebackLease,
    WritebackRequest,
    WritebackStatus,
)

log = logging.getLogger(__name__)

MAX_ERROR_LEN = 2000
#: Subscription.status codes (FHIR R4/R5, Backport): the bounded label values of ``fhir_subscriptions``, plus "other".
SUBSCRIPTION_STATUSES = ("requested", "active", "error", "off", "entered-in-error", "other")
_INT64_MAX = 2**63 - 1

_UNHANDLED = (EventStatus.RECEIVED.value, EventStatus.QUEUED.value, EventStatus.PROCESSING.value)


# ------------------------------------------------------------------------------------------ helpers


def _insert(session: Session, model: type[Base] | Table) -> PgInsert | SqliteInsert:
    """The dialect's INSERT construct (both support ON CONFLICT and RETURNING)."""
    return _insert_for(session.get_bind().dialect.name, model)


def _insert_for(dialect: str, model: type[Base] | Table) -> PgInsert | SqliteInsert:
    if dialect == "postgresql":
        return pg_insert(model)
    if dialect == "sqlite":
        return sqlite_insert(model)
    raise RuntimeError(f"unsupported database dialect: {dialect}")


_STATEMENTS: dict[tuple[str, str], Any] = {}


def _prepared(session: Session, name: str, build: Callable[[str], Any]) -> Any:
    """The statement ``name`` for the session's dialect, built once by ``build(dialect)`` and then reused."""
    dialect = session.get_bind().dialect.name
    stmt = _STATEMENTS.get((dialect, name))
    if stmt is None:
        stmt = _STATEMENTS.setdefault((dialect, name), build(dialect))
    return stmt


def _expire(session: Session, model: type[Base], key: Any, attrs: Sequence[str]) -> None:
    """Expire ``attrs`` of the loaded ``model`` object with primary key ``key``, if the session holds one (a
    Core UPDATE bypasses the identity map; the next attribute access reloads the row)."""
    if not len(session.identity_map):
        return
    obj = session.identity_map.get(session.identity_key(model, key))
    if obj is not None:
        session.expire(obj, list(attrs))


def _now(now: datetime | None) -> datetime:
    return utcnow() if now is None else now


def _cutoff(older_than: datetime | timedelta, now: datetime | None) -> datetime:
    """A cutoff instant: a datetime as given, or ``now - older_than`` for a timedelta."""
    if isinstance(older_than, timedelta):
        return _now(now) - older_than
    return older_than


def _error_text(error: str | BaseException | None) -> str | None:
    if error is None:
        return None
    text = type(error).__name__ if isinstance(error, BaseException) else error
    return text[:MAX_ERROR_LEN]


def version_number(version_id: str | None) -> int | None:
    """``versionId`` as an integer when it is a plain non-negative decimal that fits in BIGINT, else None."""
    if version_id is None:
        return None
    v = version_id.strip()
    if not v.isascii() or not v.isdigit():
        return None
    n = int(v)
    return n if n <= _INT64_MAX else None


def _newer(
    incoming: dict[str, KeyedColumnElement[Any]], stored: dict[str, KeyedColumnElement[Any]], *, strict: bool
) -> ColumnElement[bool]:
    """SQL: is the incoming version newer than the stored one (``strict``) or at least as new (not strict)?

    Numeric versionIds are compared when both are numeric; otherwise lastUpdated when both are known;
    otherwise two opaque versionIds count as newer only when they differ. With nothing to compare, the
    incoming version wins (last arrival wins).
    """
    inum, snum = incoming["version_num"], stored["version_num"]
    ilu, slu = incoming["last_updated"], stored["last_updated"]
    ivid, svid = incoming["version_id"], stored["version_id"]
    return case(
        (and_(inum.is_not(None), snum.is_not(None)), (inum > snum) if strict else (inum >= snum)),
        (and_(ilu.is_not(None), slu.is_not(None)), (ilu > slu) if strict else (ilu >= slu)),
        (and_(ivid.is_not(None), svid.is_not(None)), (ivid != svid) if strict else true()),
        else_=true(),
    )


def _cols(obj: Any, names: Iterable[str]) -> dict[str, KeyedColumnElement[Any]]:
    return {name: getattr(obj, name) for name in names}


_VERSION_COLS = ("version_num", "last_updated", "version_id")


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One ledger row for :meth:`InboundEventRepository.create_many_if_absent` (the fields of ``create_if_absent``)."""

    dedup_key: str
    kind: str
    status: str = EventStatus.RECEIVED
    subscription: str | None = None
    event_number: int | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    version_id: str | None = None
    patient_ref: str | None = None
    payload: dict[str, Any] | None = None


class LedgerResult(NamedTuple):
    id: int
    status: str
    created: bool


class Upserted(NamedTuple):
    """What :meth:`PatientResourceRepository.upsert_many_tracked` did with one resource version."""

    written: bool
    moved_from: str | None  # written over a live version filed on another patient: that patient (else None)


@dataclass(frozen=True, slots=True)
class ResourceVersion:
    """One resource version for :meth:`PatientResourceRepository.upsert_many` (the fields of ``upsert``)."""

    resource_type: str
    resource_id: str
    patient_ref: str
    content: dict[str, Any]
    version_id: str | None = None
    last_updated: datetime | None = None


def _ledger_row(entry: LedgerEntry, ts: datetime) -> dict[str, Any]:
    if not entry.dedup_key or len(entry.dedup_key) > DEDUP_KEY_LEN:
        raise ValueError(f"dedup_key must be 1..{DEDUP_KEY_LEN} characters")
    return {
        "dedup_key": entry.dedup_key,
        "kind": entry.kind,
        "subscription": entry.subscription,
        "event_number": entry.event_number,
        "resource_type": entry.resource_type,
        "resource_id": entry.resource_id,
        "version_id": entry.version_id,
        "patient_ref": entry.patient_ref,
        "payload": entry.payload,
        "status": EventStatus(entry.status).value,
        "attempts": 0,
        "received_at": ts,
        "updated_at": ts,
    }


def _table(model: type[Base]) -> Table:
    return model.__table__  # type: ignore[return-value]


def _build_issued_cards_insert(dialect: str) -> Any:
    t = _table(IssuedCard)
    return _insert_for(dialect, t).on_conflict_do_nothing(index_elements=[t.c.card_uuid])


def _build_ledger_insert(dialect: str) -> Any:
    return _on_ledger_conflict(_insert_for(dialect, _table(InboundEvent)))


def _on_ledger_conflict(stmt: PgInsert | SqliteInsert) -> Any:
    """Shared by the one-row and the batch ledger insert: a known dedup key is kept and reported, not inserted."""
    t = _table(InboundEvent)
    return stmt.on_conflict_do_nothing(index_elements=[t.c.dedup_key]).returning(t.c.dedup_key, t.c.id, t.c.status)


# PostgreSQL batches: one INSERT ... SELECT FROM jsonb_to_recordset(<the batch as one JSON array>), whatever the
# batch size. The SQL text and its single parameter are the same for every batch, so psycopg parses and
# prepares the statement once (a multi-row VALUES list is new text for every batch size, and past 4 KB or 50
# parameters psycopg re-parses it on every execution; arrays per column cost more to adapt than the JSON).

_LEDGER_RECORD: dict[str, Any] = {
    "dedup_key": String(), "kind": String(), "subscription": String(), "event_number": BigInteger(), "resource_type": String(),
    "resource_id": String(), "version_id": String(), "patient_ref": String(), "payload": JSONB(), "status": String(),
}
_RESOURCE_RECORD: dict[str, Any] = {
    "resource_type": String(), "resource_id": String(), "patient_ref": String(), "version_id": String(), "version_num": BigInteger(),
    "last_updated": DateTime(timezone=True), "content": JSONB(),
}
_UTC = UTCDateTime()


def _recordset(columns: dict[str, Any]) -> Any:
    rows = func.jsonb_to_recordset(cast(bindparam("rows"), JSONB))
    return rows.table_valued(*[column(name, type_) for name, type_ in columns.items()]).render_derived(name="u", with_types=True)


def _records(rows: Sequence[dict[str, Any]], columns: dict[str, Any], dialect: Any) -> str:
    """The batch as the JSON text :func:`_recordset` reads (timestamps through :class:`UTCDateTime`: naive refused)."""
    times = [name for name, type_ in columns.items() if isinstance(type_, DateTime)]
    records = []
    for row in rows:
        record = {name: row[name] for name in columns}
        for name in times:
            value = _UTC.process_bind_param(record[name], dialect)
            record[name] = None if value is None else value.isoformat()
        records.append(record)
    return json_dumps(records)


def _build_ledger_insert_batch(_: str) -> Any:
    t = _table(InboundEvent)
    u = _recordset(_LEDGER_RECORD)
    ts = bindparam("ts", type_=t.c.received_at.type)
    source = select(*[u.c[name] for name in _LEDGER_RECORD], literal_column("0"), ts, ts)
    return _on_ledger_conflict(pg_insert(t).from_select([*_LEDGER_RECORD, "attempts", "received_at", "updated_at"], source))


def _build_resource_upsert_batch(_: str, *, current: bool = False) -> Any:
    t = _table(PatientResource)
    u = _recordset(_RESOURCE_RECORD)
    source = select(*[u.c[name] for name in _RESOURCE_RECORD], false(), bindparam("updated_at", type_=t.c.updated_at.type))
    return _on_resource_conflict(pg_insert(t).from_select([*_RESOURCE_RECORD, "deleted", "updated_at"], source), current=current)


def _build_ledger_lookup(_: str) -> Any:
    t = _table(InboundEvent)
    return select(t.c.dedup_key, t.c.id, t.c.status).where(t.c.dedup_key.in_(bindparam("keys", expanding=True)))


def _resource_row(r: ResourceVersion, ts: datetime) -> dict[str, Any]:
    return {
        "resource_type": r.resource_type,
        "resource_id": r.resource_id,
        "patient_ref": r.patient_ref,
        "version_id": r.version_id,
        "version_num": version_number(r.version_id),
        "last_updated": r.last_updated,
        "content": r.content,
        "deleted": False,
        "updated_at": ts,
    }


def _build_resource_upsert(dialect: str, *, current: bool = False) -> Any:
    return _on_resource_conflict(_insert_for(dialect, _table(PatientResource)), current=current)


_KEYS_RECORD: dict[str, Any] = {"resource_type": String(), "resource_id": String()}


def _build_resource_owners(dialect: str) -> Any:
    """The stored patient and tombstone flag of a batch's resources, locked (PostgreSQL ``FOR UPDATE``, in key
    order like the upsert; SQLite holds its write lock once the transaction has written). PostgreSQL reads the
    keys from one JSON parameter (one statement text for every batch size); SQLite from an expanding IN."""
    t = _table(PatientResource)
    cols = (t.c.resource_type, t.c.resource_id, t.c.patient_ref, t.c.deleted)
    if dialect == "postgresql":
        u = _recordset(_KEYS_RECORD)
        stmt = select(*cols).join_from(t, u, and_(t.c.resource_type == u.c.resource_type, t.c.resource_id == u.c.resource_id))
        return stmt.order_by(t.c.resource_type, t.c.resource_id).with_for_update(of=t)
    return select(*cols).where(tuple_(t.c.resource_type, t.c.resource_id).in_(bindparam("keys", expanding=True)))


def _on_resource_conflict(stmt: PgInsert | SqliteInsert, *, current: bool = False) -> Any:
    """The version guard shared by the one-row and the batch upsert: a stored row is replaced only by a newer version.

    ``current``: the versions are what the FHIR server answered to a read just now, so they also replace a
    tombstone of the same version (a deletion applied before the server said the resource still exists)."""
    t = _table(PatientResource)
    ex = stmt.excluded
    newer = _newer(_cols(ex, _VERSION_COLS), _cols(t.c, _VERSION_COLS), strict=True)
    if current:
        newer = or_(newer, and_(t.c.deleted == true(), _newer(_cols(ex, _VERSION_COLS), _cols(t.c, _VERSION_COLS), strict=False)))
    return stmt.on_conflict_do_update(
        index_elements=[t.c.resource_type, t.c.resource_id],
        set_={
            "patient_ref": ex.patient_ref,
            "version_id": ex.version_id,
            "version_num": ex.version_num,
            "last_updated": ex.last_updated,
            "content": ex.content,
            "deleted": false(),
            "updated_at": ex.updated_at,
        },
        where=newer,
    ).returning(t.c.resource_type, t.c.resource_id)


# ------------------------------------------------------------------------------------- the ledger


class _Repository:
    """Repositories hold all SQL; they work in the caller's session and never commit."""

    def __init__(self, session: Session) -> None:
        self.session = session


class InboundEventRepository(_Repository):
    """``inbound_events``: the idempotency ledger of everything received or polled."""

    def create_if_absent(
        self,
        *,
        dedup_key: str,
        kind: str,
        subscription: str | None = None,
        event_number: int | None = None,
        resource_type: str | None = None,
        resource_id: str | None = None,
        version_id: str | None = None,
        patient_ref: str | None = None,
        payload: dict[str, Any] | None = None,
        status: str = EventStatus.RECEIVED,
        now: datetime | None = None,
    ) -> tuple[InboundEvent, bool]:
        """Insert the event unless ``dedup_key`` exists; returns ``(event, created)``. Race-free."""
        entry = LedgerEntry(
            dedup_key=dedup_key, kind=kind, status=status, subscription=subscription, event_number=event_number,
            resource_type=resource_type, resource_id=resource_id, version_id=version_id, patient_ref=patient_ref,
            payload=payload,
        )
        row = _ledger_row(entry, _now(now))
        created = self.session.execute(_prepared(self.session, "ledger_insert", _build_ledger_insert), row).first() is not None
        event = self.get_by_dedup_key(dedup_key)
        assert event is not None  # inserted now or by an earlier transaction
        return event, created

    def create_many_if_absent(self, entries: Sequence[LedgerEntry], *, now: datetime | None = None) -> list[LedgerResult]:
        """:meth:`create_if_absent` for many events in one multi-row INSERT (and one lookup of the duplicates):
        ``(id, status, created)`` per entry, in order. A key repeated within ``entries`` is created once, at its
        first occurrence, and is a duplicate afterwards, exactly as with successive ``create_if_absent`` calls.
        Race-free (ON CONFLICT DO NOTHING; a concurrent insert of the same key makes this one a duplicate)."""
        if not entries:
            return []
        ts = _now(now)
        first: dict[str, dict[str, Any]] = {}
        for entry in entries:
            row = _ledger_row(entry, ts)
            first.setdefault(row["dedup_key"], row)
        rows = [first[key] for key in sorted(first)]  # one lock order for every writer: no deadlock between batches
        dialect = self.session.get_bind().dialect
        if dialect.name == "postgresql":
            insert = _prepared(self.session, "ledger_insert_batch", _build_ledger_insert_batch)
            result = self.session.execute(insert, {"rows": _records(rows, _LEDGER_RECORD, dialect), "ts": ts})
        else:
            result = self.session.execute(_prepared(self.session, "ledger_insert", _build_ledger_insert), rows)
        inserted = {key: (event_id, status) for key, event_id, status in result}
        existing: dict[str, tuple[int, str]] = {}
        duplicates = [key for key in first if key not in inserted]
        if duplicates:
            lookup = _prepared(self.session, "ledger_lookup", _build_ledger_lookup)
            existing = {key: (event_id, status) for key, event_id, status in self.session.execute(lookup, {"keys": duplicates})}
        results: list[LedgerResult] = []
        reported: set[str] = set()
        for entry in entries:
            key = entry.dedup_key
            found = inserted.get(key) or existing.get(key)
            if found is None:
                raise RuntimeError("ledger: a conflicting event is not visible; retry the transaction")
            results.append(LedgerResult(found[0], found[1], key in inserted and key not in reported))
            reported.add(key)
        return results

    def get(self, event_id: int) -> InboundEvent | None:
        return self.session.scalars(
            select(InboundEvent).where(InboundEvent.id == event_id).execution_options(populate_existing=True)
        ).one_or_none()

    def get_by_dedup_key(self, dedup_key: str) -> InboundEvent | None:
        return self.session.scalars(
            select(InboundEvent).where(InboundEvent.dedup_key == dedup_key).execution_options(populate_existing=True)
        ).one_or_none()

    def mark_status(
        self,
        event_id: int,
        status: str,
        error: str | BaseException | None = None,
        *,
        now: datetime | None = None,
    ) -> bool:
        """Set the status (``handled`` stamps ``handled_at``); ``error`` is stored truncated (ids only, no PHI;
        an exception is stored as its class name). Returns whether the event exists."""
        status = EventStatus(status).value
        ts = _now(now)
        values: dict[str, Any] = {"status": status, "updated_at": ts}
        if status == EventStatus.HANDLED:
            values["handled_at"] = ts
        if error is not None:
            values["last_error"] = _error_text(error)
        stmt = (
            update(InboundEvent)
            .where(InboundEvent.id == event_id)
            .values(**values)
            .returning(InboundEvent.id)
            .execution_options(synchronize_session="fetch")
        )
        return self.session.execute(stmt).first() is not None

    def claim_for_processing(
        self,
        event_id: int,
        *,
        stale_after: timedelta = timedelta(minutes=10),
        allow_failed: bool = False,
        now: datetime | None = None,
    ) -> bool:
        """Atomically move the event to ``processing`` (and count the attempt); True for exactly one caller.

        Claimable: ``received`` and ``queued`` (and ``failed`` with ``allow_failed``), and ``processing`` rows
        not touched for ``stale_after`` (a killed worker's event). Under concurrency the losing session's
        UPDATE re-checks the condition after the winner commits (PostgreSQL) or waits for the write lock
        (SQLite), and matches nothing.
        """
        ts = _now(now)
        claimable = [EventStatus.RECEIVED.value, EventStatus.QUEUED.value]
        if allow_failed:
            claimable.append(EventStatus.FAILED.value)
        stmt = (
            update(InboundEvent)
            .where(
                InboundEvent.id == event_id,
                or_(
                    InboundEvent.status.in_(claimable),
                    and_(InboundEvent.status == EventStatus.PROCESSING.value, InboundEvent.updated_at < ts - stale_after),
                ),
            )
            .values(status=EventStatus.PROCESSING.value, attempts=InboundEvent.attempts + 1, updated_at=ts)
            .returning(InboundEvent.id)
            .execution_options(synchronize_session="fetch")
        )
        return self.session.execute(stmt).first() is not None

    def stale_unhandled(
        self, older_than: datetime | timedelta, limit: int = 100, *, now: datetime | None = None
    ) -> list[InboundEvent]:
        """Events still received/queued/processing and untouched since the cutoff (oldest first), for the sweeper."""
        cutoff = _cutoff(older_than, now)
        stmt = (
            select(InboundEvent)
            .where(InboundEvent.status.in_(_UNHANDLED), InboundEvent.updated_at < cutoff)
            .order_by(InboundEvent.updated_at, InboundEvent.id)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def list_failed(self, limit: int = 100) -> list[InboundEvent]:
        """Failed events, most recently failed first."""
        stmt = (
            select(InboundEvent)
            .where(InboundEvent.status == EventStatus.FAILED.value)
            .order_by(InboundEvent.updated_at.desc(), InboundEvent.id.desc())
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def replay_failed(
        self, event_ids: Iterable[int] | None = None, *, all_failed: bool = False, now: datetime | None = None
    ) -> list[int]:
        """Put failed events back to ``queued`` (attempts reset, last_error kept); returns their ids."""
        if event_ids is None and not all_failed:
            raise ValueError("pass event_ids or all_failed=True")
        conditions: list[ColumnElement[bool]] = [InboundEvent.status == EventStatus.FAILED.value]
        if event_ids is not None:
            ids = list(event_ids)
            if not ids:
                return []
            conditions.append(InboundEvent.id.in_(ids))
        stmt = (
            update(InboundEvent)
            .where(*conditions)
            .values(status=EventStatus.QUEUED.value, attempts=0, handled_at=None, updated_at=_now(now))
            .returning(InboundEvent.id)
            .execution_options(synchronize_session="fetch")
        )
        return sorted(self.session.scalars(stmt).all())

    def reset_for_replay(
        self, event_ids: Iterable[int] | None = None, *, all_failed: bool = False, now: datetime | None = None
    ) -> int:
        """Like :meth:`replay_failed`, returning how many events were reset."""
        return len(self.replay_failed(event_ids, all_failed=all_failed, now=now))

    def statuses(self, event_ids: Iterable[int]) -> dict[int, str]:
        """The status of each of these events that exists."""
        ids = list(event_ids)
        if not ids:
            return {}
        rows = self.session.execute(select(InboundEvent.id, InboundEvent.status).where(InboundEvent.id.in_(ids)))
        return {int(event_id): str(status) for event_id, status in rows}

    def counts_by_status(self) -> dict[str, int]:
        """Number of events per status (every status present, zero included)."""
        counts = {s.value: 0 for s in EventStatus}
        rows = self.session.execute(select(InboundEvent.status, func.count()).group_by(InboundEvent.status))
        for status, n in rows:
            counts[status] = int(n)
        return counts


# ---------------------------------------------------------------------------- patient resources


class PatientResourceRepository(_Repository):
    """``patient_resources``: the current version of each resource of a monitored patient."""

    def upsert(
        self,
        *,
        resource_type: str,
        resource_id: str,
        patient_ref: str,
        content: dict[str, Any],
        version_id: str | None = None,
        last_updated: datetime | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Store the resource only if it is NEWER than the stored one (see :func:`_newer`); returns whether it
        was written. A late older version never overwrites; a newer version revives a tombstone."""
        resource = ResourceVersion(
            resource_type=resource_type, resource_id=resource_id, patient_ref=patient_ref, content=content,
            version_id=version_id, last_updated=last_updated,
        )
        upsert = _prepared(self.session, "resource_upsert", _build_resource_upsert)
        return self.session.execute(upsert, _resource_row(resource, _now(now))).first() is not None

    def upsert_many(self, resources: Sequence[ResourceVersion], *, now: datetime | None = None) -> list[bool]:
        """:meth:`upsert` for many resources in one multi-row INSERT ... ON CONFLICT DO UPDATE (per occurrence
        of a resource within ``resources``): whether each was written, in order. The result is that of
        successive ``upsert`` calls in the given order (two versions of one resource: the second is applied
        after the first, so only a newer one wins)."""
        return [u.written for u in self.upsert_many_tracked(resources, now=now)]

    def upsert_many_tracked(
        self, resources: Sequence[ResourceVersion], *, now: datetime | None = None, current: bool = False
    ) -> list[Upserted]:
        """:meth:`upsert_many`, also naming, per resource written, the patient a live stored version was filed on
        when that is another patient (a result moved to another subject: the first patient lost an input too).
        One more statement per batch: the stored patients of the batch's resources, read (and on PostgreSQL
        locked) in the same transaction before the upsert.

        ``current``: the versions were just read from the FHIR server (its current state), so a tombstone of the
        same version is replaced too (a deletion the server does not confirm)."""
        if not resources:
            return []
        ts = _now(now)
        owners = self._live_owners(resources)
        waves: list[list[int]] = []  # wave k: the k-th occurrence of each resource (one statement cannot touch a row twice)
        seen: dict[tuple[str, str], int] = {}
        for i, r in enumerate(resources):
            key = (r.resource_type, r.resource_id)
            k = seen.get(key, 0)
            seen[key] = k + 1
            if k == len(waves):
                waves.append([])
            waves[k].append(i)
        dialect = self.session.get_bind().dialect
        postgres = dialect.name == "postgresql"
        name, build = ("resource_upsert_batch", _build_resource_upsert_batch) if postgres else ("resource_upsert", _build_resource_upsert)
        upsert = _prepared(self.session, name + ("_current" if current else ""), partial(build, current=current))
        results = [Upserted(False, None)] * len(resources)
        for wave in waves:
            wave.sort(key=lambda i: (resources[i].resource_type, resources[i].resource_id))  # one lock order for every writer
            rows = [_resource_row(resources[i], ts) for i in wave]
            params: Any = {"rows": _records(rows, _RESOURCE_RECORD, dialect), "updated_at": ts} if postgres else rows
            done = {(rtype, rid) for rtype, rid in self.session.execute(upsert, params)}
            for i in wave:
                r = resources[i]
                key = (r.resource_type, r.resource_id)
                if key not in done:
                    continue
                before = owners.get(key)
                results[i] = Upserted(True, before if before and before != r.patient_ref else None)
                owners[key] = r.patient_ref  # the next occurrence of the resource replaces this one
        return results

    def _live_owners(self, resources: Sequence[ResourceVersion]) -> dict[tuple[str, str], str | None]:
        """(type, id) → patient of the stored live version, for the resources of a batch that are stored live."""
        keys = sorted({(r.resource_type, r.resource_id) for r in resources})
        stmt = _prepared(self.session, "resource_owners", _build_resource_owners)
        if self.session.get_bind().dialect.name == "postgresql":
            params: dict[str, Any] = {"rows": json_dumps([{"resource_type": t, "resource_id": i} for t, i in keys])}
        else:
            params = {"keys": keys}
        return {(rtype, rid): patient for rtype, rid, patient, deleted in self.session.execute(stmt, params) if not deleted}

    def mark_deleted(
        self,
        *,
        resource_type: str,
        resource_id: str,
        patient_ref: str | None = None,
        version_id: str | None = None,
        last_updated: datetime | None = None,
        exact: bool = False,
        now: datetime | None = None,
    ) -> bool:
        """Turn the resource into a tombstone (content cleared); returns whether a row was written.

        With a version or lastUpdated, the deletion applies unless the stored version is newer (a deletion of
        the current version applies). Without either it applies to a live row and keeps the stored version, so
        a late version older than the stored one cannot revive it (one made between the stored version and the
        deletion can: confirm such a deletion with the FHIR server, then record it ``exact``). An unknown
        resource gets a tombstone row, which guards against an older version arriving after the deletion.

        ``exact``: the tombstone takes exactly the given version fields, a missing one cleared, rather than
        keeping the stored ones. A deletion whose version is unknown but which happened no later than an instant
        is recorded as ``last_updated=<that instant>, exact=True``: then only a version updated after it (a
        re-creation) revives the resource, whatever its versionId.
        """
        has_version = version_id is not None or last_updated is not None
        stmt = _insert(self.session, PatientResource).values(
            resource_type=resource_type,
            resource_id=resource_id,
            patient_ref=patient_ref,
            version_id=version_id,
            version_num=version_number(version_id),
            last_updated=last_updated,
            content=None,
            deleted=True,
            updated_at=_now(now),
        )
        ex = stmt.excluded
        set_: dict[str, Any] = {
            "patient_ref": func.coalesce(PatientResource.patient_ref, ex.patient_ref),
            "content": None,
            "deleted": true(),
            "updated_at": ex.updated_at,
        }
        where: ColumnElement[bool]
        if has_version:
            if version_id is not None or exact:
                set_["version_id"] = ex.version_id
                set_["version_num"] = ex.version_num
            if last_updated is not None or exact:
                set_["last_updated"] = ex.last_updated
            where = and_(
                _newer(_cols(ex, _VERSION_COLS), _cols(PatientResource, _VERSION_COLS), strict=False),
                or_(
                    PatientResource.deleted == false(),
                    _newer(_cols(ex, _VERSION_COLS), _cols(PatientResource, _VERSION_COLS), strict=True),
                ),
            )
        else:
            where = PatientResource.deleted == false()
        tombstone = stmt.on_conflict_do_update(
            index_elements=[PatientResource.resource_type, PatientResource.resource_id], set_=set_, where=where
        ).returning(PatientResource.id)
        return self.session.execute(tombstone).first() is not None

    def live_versions(self, resource_type: str, resource_ids: Sequence[str]) -> dict[str, str | None]:
        """Those of ``resource_ids`` stored live (not tombstones), each with its stored versionId."""
        found: dict[str, str | None] = {}
        for start in range(0, len(resource_ids), 500):
            chunk = list(resource_ids[start : start + 500])
            stmt = select(PatientResource.resource_id, PatientResource.version_id).where(
                PatientResource.resource_type == resource_type,
                PatientResource.resource_id.in_(chunk),
                PatientResource.deleted == false(),
            )
            found.update({rid: version for rid, version in self.session.execute(stmt)})
        return found

    def stored_version(self, resource_type: str, resource_id: str) -> str | None:
        """The stored versionId of a resource (live or tombstone); None when unknown or stored without one."""
        stmt = select(PatientResource.version_id).where(
            PatientResource.resource_type == resource_type, PatientResource.resource_id == resource_id
        )
        return self.session.execute(stmt).scalar_one_or_none()

    def get(self, resource_type: str, resource_id: str) -> PatientResource | None:
        stmt = (
            select(PatientResource)
            .where(PatientResource.resource_type == resource_type, PatientResource.resource_id == resource_id)
            .execution_options(populate_existing=True)
        )
        return self.session.scalars(stmt).one_or_none()

    def list_for_patient(
        self, patient_ref: str, *, resource_types: Sequence[str] | None = None, include_deleted: bool = False
    ) -> list[PatientResource]:
        """The patient's stored resources (live only unless ``include_deleted``), by type then id."""
        stmt = select(PatientResource).where(PatientResource.patient_ref == patient_ref)
        if resource_types is not None:
            stmt = stmt.where(PatientResource.resource_type.in_(list(resource_types)))
        if not include_deleted:
            stmt = stmt.where(PatientResource.deleted == false())
        stmt = stmt.order_by(PatientResource.resource_type, PatientResource.resource_id)
        return list(self.session.scalars(stmt.execution_options(populate_existing=True)))

    def contents_for_patient(self, patient_ref: str) -> list[dict[str, Any]]:
        """The content of the patient's live resources, in :meth:`list_for_patient` order (what an evaluation
        reads; no ORM objects)."""
        stmt = _prepared(self.session, "resource_contents", _build_resource_contents)
        return [content for (content,) in self.session.execute(stmt, {"p": patient_ref})]

    def patients(self) -> list[str]:
        """Every patient with at least one live stored resource."""
        stmt = (
            select(PatientResource.patient_ref)
            .where(PatientResource.deleted == false(), PatientResource.patient_ref.is_not(None))
            .distinct()
            .order_by(PatientResource.patient_ref)
        )
        return [ref for ref in self.session.scalars(stmt) if ref is not None]


# ---------------------------------------------------------------------------- evaluation queue

_QUEUE_MARK_ATTRS = ("dirty_since", "requested_at", "generation")


def _queue() -> Table:
    return _table(PatientEvaluationQueue)


def _build_queue_mark(_: str) -> Any:
    """PostgreSQL: mark in one statement, returning the ``dirty_since`` the row had (NULL: it became dirty)."""
    q = _queue()
    ts = bindparam("ts", type_=q.c.dirty_since.type)
    old = select(q.c.patient_ref, q.c.dirty_since).where(q.c.patient_ref == bindparam("p")).with_for_update().subquery("old")
    return (
        update(q)
        .where(q.c.patient_ref == old.c.patient_ref)
        .values(generation=q.c.generation + bindparam("n"), requested_at=ts, dirty_since=func.coalesce(q.c.dirty_since, ts))
        .returning(old.c.dirty_since)
    )


_MARKS: dict[str, Any] = {"p": String(), "n": BigInteger()}


def _build_queue_mark_batch(_: str) -> Any:
    """PostgreSQL: :func:`_build_queue_mark` for the patients and counts of a JSON array ``[{"p", "n"}]``."""
    q = _queue()
    marks = _recordset(_MARKS)
    locked = q.alias("l")
    old = (
        select(locked.c.patient_ref, locked.c.dirty_since, marks.c.n)
        .join_from(locked, marks, locked.c.patient_ref == marks.c.p)
        .order_by(locked.c.patient_ref)
        .with_for_update(of=locked)
        .subquery("old")
    )
    ts = bindparam("ts", type_=q.c.dirty_since.type)
    return (
        update(q)
        .where(q.c.patient_ref == old.c.patient_ref)
        .values(generation=q.c.generation + old.c.n, requested_at=ts, dirty_since=func.coalesce(q.c.dirty_since, ts))
        .returning(old.c.patient_ref, old.c.dirty_since)
    )


def _build_queue_insert_batch(_: str) -> Any:
    q = _queue()
    marks = _recordset(_MARKS)
    ts = bindparam("ts", type_=q.c.dirty_since.type)
    return (
        pg_insert(q)
        .from_select(["patient_ref", "dirty_since", "requested_at", "generation"], select(marks.c.p, ts, ts, marks.c.n).order_by(marks.c.p))
        .on_conflict_do_nothing(index_elements=[q.c.patient_ref])
        .returning(q.c.patient_ref)
    )


def _build_queue_still_dirty(_: str) -> Any:
    q = _queue()
    return (
        update(q)
        .where(q.c.patient_ref == bindparam("p"), q.c.dirty_since.is_not(None))
        .values(requested_at=bindparam("ts", type_=q.c.requested_at.type), generation=q.c.generation + bindparam("n"))
        .returning(q.c.patient_ref)
    )


def _build_queue_became_dirty(_: str) -> Any:
    q = _queue()
    ts = bindparam("ts", type_=q.c.dirty_since.type)
    return (
        update(q)
        .where(q.c.patient_ref == bindparam("p"), q.c.dirty_since.is_(None))
        .values(dirty_since=ts, requested_at=ts, generation=q.c.generation + bindparam("n"))
        .returning(q.c.patient_ref)
    )


def _build_queue_insert(dialect: str) -> Any:
    q = _queue()
    ts = bindparam("ts", type_=q.c.dirty_since.type)
    return (
        _insert_for(dialect, q)
        .values(patient_ref=bindparam("p"), dirty_since=ts, requested_at=ts, generation=bindparam("n"))
        .on_conflict_do_nothing(index_elements=[q.c.patient_ref])
        .returning(q.c.patient_ref)
    )


def _build_queue_claim(_: str) -> Any:
    q = _queue()
    return (
        update(q)
        .where(q.c.patient_ref == bindparam("p"), q.c.dirty_since.is_not(None))
        .values(last_started_at=bindparam("ts", type_=q.c.last_started_at.type))
        .returning(q.c.generation)
    )


def _build_queue_finish(_: str) -> Any:
    q = _queue()
    return (
        update(q)
        .where(q.c.patient_ref == bindparam("p"), q.c.generation == bindparam("g"))
        .values(dirty_since=None, last_finished_at=bindparam("ts", type_=q.c.last_finished_at.type))
        .returning(q.c.patient_ref)
    )


def _build_queue_finish_rerun(_: str) -> Any:
    q = _queue()
    return (
        update(q)
        .where(q.c.patient_ref == bindparam("p"), q.c.dirty_since.is_not(None))
        .values(last_finished_at=bindparam("ts", type_=q.c.last_finished_at.type))
        .returning(q.c.patient_ref)
    )


class EvaluationQueueRepository(_Repository):
    """``patient_evaluation_queue``: coalesces many changes of one patient into few evaluations.

    Protocol: ``mark_dirty`` after storing a change (enqueue an evaluation only when it returns True);
    the task calls ``claim`` (None: nothing to do), evaluates, then ``finish(generation)``; when that
    returns True a change arrived meanwhile and the evaluation must run again.
    """

    def mark_dirty(self, patient_ref: str, *, now: datetime | None = None) -> bool:
        """Record a change; True when the patient was not already dirty (the caller should enqueue)."""
        return self._mark(patient_ref, _now(now), 1)

    def mark_dirty_many(self, changes: Mapping[str, int], *, now: datetime | None = None) -> list[str]:
        """Record ``changes[patient]`` changes per patient (the same as that many ``mark_dirty`` calls in this
        transaction); returns the patients that were not already dirty (the caller enqueues those), in order.

        On PostgreSQL several patients take :meth:`_mark_batch` (two statements for the lot); one patient takes
        :meth:`_mark`, whose UPDATE comes first and is the only statement when the patient already has a queue
        row, the common case for a patient whose results keep arriving."""
        ts = _now(now)
        pending = {ref: count for ref, count in changes.items() if count > 0}
        if len(pending) > 1 and self.session.get_bind().dialect.name == "postgresql":
            became_dirty = self._mark_batch(pending, ts)
        else:
            became_dirty = {ref for ref in sorted(pending) if self._mark(ref, ts, pending[ref])}  # one lock order
        return [ref for ref in changes if ref in became_dirty]

    def _mark_batch(self, pending: dict[str, int], ts: datetime) -> set[str]:
        """PostgreSQL: :meth:`_mark` for many patients: one INSERT of the patients without a row, then one UPDATE
        of the others (each returning the ``dirty_since`` it replaced). Both take their rows in patient order,
        inserts before updates, so two batches never wait for each other in a cycle."""
        became_dirty: set[str] = set()

        def marks() -> str:
            return json_dumps([{"p": ref, "n": pending[ref]} for ref in sorted(pending)])

        for _ in range(10):
            for (ref,) in self.session.execute(_prepared(self.session, "queue_insert_batch", _build_queue_insert_batch),
                                               {"rows": marks(), "ts": ts}):
                pending.pop(ref)
                became_dirty.add(ref)
            if not pending:
                return became_dirty
            for ref, old_dirty_since in self.session.execute(_prepared(self.session, "queue_mark_batch", _build_queue_mark_batch),
                                                             {"rows": marks(), "ts": ts}):
                pending.pop(ref)
                _expire(self.session, PatientEvaluationQueue, ref, _QUEUE_MARK_ATTRS)
                if old_dirty_since is None:
                    became_dirty.add(ref)
            if not pending:
                return became_dirty
        raise RuntimeError("mark_dirty: the queue rows kept changing; retry the transaction")

    def _mark(self, patient_ref: str, ts: datetime, count: int) -> bool:
        params = {"p": patient_ref, "ts": ts, "n": count}
        execute = self.session.execute
        postgres = self.session.get_bind().dialect.name == "postgresql"
        for _ in range(10):
            if postgres:
                # One statement: bump the generation, set dirty_since unless set, and return the value it had
                # (the sub-select locks the row first, so that is the value this UPDATE replaced).
                row = execute(_prepared(self.session, "queue_mark", _build_queue_mark), params).first()
                if row is not None:
                    _expire(self.session, PatientEvaluationQueue, patient_ref, _QUEUE_MARK_ATTRS)
                    return row[0] is None
            else:
                # Each UPDATE is conditional, so a finish() between them cannot make the mark disappear.
                if execute(_prepared(self.session, "queue_still_dirty", _build_queue_still_dirty), params).first() is not None:
                    _expire(self.session, PatientEvaluationQueue, patient_ref, _QUEUE_MARK_ATTRS)
                    return False
                if execute(_prepared(self.session, "queue_became_dirty", _build_queue_became_dirty), params).first() is not None:
                    _expire(self.session, PatientEvaluationQueue, patient_ref, _QUEUE_MARK_ATTRS)
                    return True
            if execute(_prepared(self.session, "queue_insert", _build_queue_insert), params).first() is not None:
                return True
        raise RuntimeError("mark_dirty: the queue row kept changing; retry the transaction")

    def claim(self, patient_ref: str, *, now: datetime | None = None) -> int | None:
        """Start an evaluation of a dirty patient: returns the generation to pass to :meth:`finish`, or None
        when the patient is not dirty (another evaluation already covered the change)."""
        row = self.session.execute(_prepared(self.session, "queue_claim", _build_queue_claim), {"p": patient_ref, "ts": _now(now)}).first()
        if row is None:
            return None
        _expire(self.session, PatientEvaluationQueue, patient_ref, ("last_started_at",))
        return int(row[0])

    def finish(self, patient_ref: str, generation: int, *, now: datetime | None = None) -> bool:
        """End an evaluation; clears dirty only if no mark happened since the claim. Returns True when the
        patient is still dirty (marked meanwhile) and must be evaluated again."""
        params = {"p": patient_ref, "g": generation, "ts": _now(now)}
        done = self.session.execute(_prepared(self.session, "queue_finish", _build_queue_finish), params).first()
        if done is not None:
            _expire(self.session, PatientEvaluationQueue, patient_ref, ("dirty_since", "last_finished_at"))
            return False
        rerun = self.session.execute(_prepared(self.session, "queue_finish_rerun", _build_queue_finish_rerun), params).first()
        if rerun is not None:
            _expire(self.session, PatientEvaluationQueue, patient_ref, ("last_finished_at",))
        return rerun is not None

    def get(self, patient_ref: str) -> PatientEvaluationQueue | None:
        stmt = (
            select(PatientEvaluationQueue)
            .where(PatientEvaluationQueue.patient_ref == patient_ref)
            .execution_options(populate_existing=True)
        )
        return self.session.scalars(stmt).one_or_none()

    def stale_dirty(self, older_than: datetime | timedelta, limit: int = 100, *, now: datetime | None = None) -> list[str]:
        """Patients dirty since before the cutoff with no evaluation started since (a lost task or a killed
        worker), oldest first: the sweeper enqueues them again."""
        cutoff = _cutoff(older_than, now)
        pq = PatientEvaluationQueue
        stmt = (
            select(pq.patient_ref)
            .where(
                pq.dirty_since.is_not(None),
                pq.dirty_since < cutoff,
                or_(pq.last_started_at.is_(None), pq.last_started_at < cutoff),
            )
            .order_by(pq.dirty_since, pq.patient_ref)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))


# ---------------------------------------------------------------------------------- evaluations


class EvaluationSummary(NamedTuple):
    id: int
    evaluated_at: datetime
    inputs_hash: str
    rules_version: str
    mappings_version: str


def _build_evaluation_insert(dialect: str) -> Any:
    t = _table(Evaluation)
    return _insert_for(dialect, t).returning(t.c.id)


def _build_evaluation_latest(_: str) -> Any:
    t = _table(Evaluation)
    return (
        select(t.c.id, t.c.evaluated_at, t.c.inputs_hash, t.c.rules_version, t.c.mappings_version)
        .where(t.c.patient_ref == bindparam("p"))
        .order_by(t.c.evaluated_at.desc(), t.c.id.desc())
        .limit(1)
    )


def _build_resource_contents(_: str) -> Any:
    t = _table(PatientResource)
    return (
        select(t.c.content)
        .where(t.c.patient_ref == bindparam("p"), t.c.deleted == false())
        .order_by(t.c.resource_type, t.c.resource_id)
    )


class EvaluationRepository(_Repository):
    """``evaluations``: the stored assessments (audit trail and CDS Hooks reuse)."""

    def add(
        self,
        *,
        patient_ref: str,
        evaluated_at: datetime,
        inputs_hash: str,
        inputs: list[dict[str, Any]],
        rules_version: str,
        mappings_version: str,
        calciphylaxis_tier: str,
        metastatic_tier: str,
        renal_context: str | None,
        assessment: dict[str, Any],
        now: datetime | None = None,
    ) -> int:
        """Store an evaluation with one INSERT ... RETURNING id (no ORM object); returns the id."""
        row = {
            "patient_ref": patient_ref,
            "evaluated_at": evaluated_at,
            "inputs_hash": inputs_hash,
            "inputs": inputs,
            "rules_version": rules_version,
            "mappings_version": mappings_version,
            "calciphylaxis_tier": calciphylaxis_tier,
            "metastatic_tier": metastatic_tier,
            "renal_context": renal_context,
            "assessment": assessment,
            "created_at": _now(now),
        }
        return int(self.session.execute(_prepared(self.session, "evaluation_insert", _build_evaluation_insert), row).scalar_one())

    def get(self, evaluation_id: int) -> Evaluation | None:
        return self.session.get(Evaluation, evaluation_id)

    def latest_summary_for(self, patient_ref: str) -> EvaluationSummary | None:
        """The identifying columns of :meth:`latest_for` (no inputs, no assessment document)."""
        row = self.session.execute(_prepared(self.session, "evaluation_latest", _build_evaluation_latest), {"p": patient_ref}).first()
        return None if row is None else EvaluationSummary(*row)

    def latest_for(self, patient_ref: str) -> Evaluation | None:
        stmt = (
            select(Evaluation)
            .where(Evaluation.patient_ref == patient_ref)
            .order_by(Evaluation.evaluated_at.desc(), Evaluation.id.desc())
            .limit(1)
        )
        return self.session.scalars(stmt).first()

    def find_fresh(
        self,
        patient_ref: str,
        inputs_hash: str,
        rules_version: str,
        mappings_version: str,
        newer_than: datetime,
    ) -> Evaluation | None:
        """The latest evaluation of the same inputs with the same rules and mappings, evaluated at or after
        ``newer_than`` (None: evaluate again)."""
        stmt = (
            select(Evaluation)
            .where(
                Evaluation.patient_ref == patient_ref,
                Evaluation.inputs_hash == inputs_hash,
                Evaluation.rules_version == rules_version,
                Evaluation.mappings_version == mappings_version,
                Evaluation.evaluated_at >= newer_than,
            )
            .order_by(Evaluation.evaluated_at.desc(), Evaluation.id.desc())
            .limit(1)
        )
        return self.session.scalars(stmt).first()

    def count_for(self, patient_ref: str) -> int:
        stmt = select(func.count()).select_from(Evaluation).where(Evaluation.patient_ref == patient_ref)
        return int(self.session.scalar(stmt) or 0)

    def list_for(self, patient_ref: str, limit: int = 20) -> list[Evaluation]:
        """The patient's evaluations, newest first."""
        stmt = (
            select(Evaluation)
            .where(Evaluation.patient_ref == patient_ref)
            .order_by(Evaluation.evaluated_at.desc(), Evaluation.id.desc())
            .limit(limit)
        )
        return list(self.session.scalars(stmt))


# ----------------------------------------------------------------------------------- writebacks


class WritebackRepository(_Repository):
    """``writebacks``: what was last written to the EHR per (patient, flag)."""

    def get(self, patient_ref: str, flag: str) -> Writeback | None:
        stmt = (
            select(Writeback)
            .where(Writeback.patient_ref == patient_ref, Writeback.flag == flag)
            .execution_options(populate_existing=True)
        )
        return self.session.scalars(stmt).one_or_none()

    def upsert(
        self,
        *,
        patient_ref: str,
        flag: str,
        identifier_system: str,
        identifier_value: str,
        basis_hash: str,
        tier: str,
        fhir_id: str | None = None,
        fhir_version: str | None = None,
        written_at: datetime | None = None,
    ) -> Writeback:
        stmt = _insert(self.session, Writeback).values(
            patient_ref=patient_ref,
            flag=flag,
            identifier_system=identifier_system,
            identifier_value=identifier_value,
            basis_hash=basis_hash,
            tier=tier,
            fhir_id=fhir_id,
            fhir_version=fhir_version,
            written_at=_now(written_at),
            checked_at=_now(written_at),
        )
        ex = stmt.excluded
        stmt = stmt.on_conflict_do_update(
            index_elements=[Writeback.patient_ref, Writeback.flag],
            set_={
                "identifier_system": ex.identifier_system,
                "identifier_value": ex.identifier_value,
                "basis_hash": ex.basis_hash,
                "tier": ex.tier,
                "fhir_id": ex.fhir_id,
                "fhir_version": ex.fhir_version,
                "written_at": ex.written_at,
                "checked_at": ex.checked_at,
            },
        )
        self.session.execute(stmt)
        written = self.get(patient_ref, flag)
        assert written is not None  # just written in this transaction
        return written

    def due_for_recheck(self, checked_before: datetime, limit: int = 100) -> list[str]:
        """Patients with a flag written (any tier but none) whose basis was last read before ``checked_before``,
        the longest unchecked first."""
        w = Writeback
        last = func.min(func.coalesce(w.checked_at, w.written_at))
        stmt = (
            select(w.patient_ref)
            .where(w.tier != "none", func.coalesce(w.checked_at, w.written_at) < checked_before)
            .group_by(w.patient_ref)
            .order_by(last, w.patient_ref)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def claim_recheck(self, patient_ref: str, checked_before: datetime, *, now: datetime | None = None) -> bool:
        """Record that the patient's basis is being read again now; False when another sweep claimed it first."""
        w = Writeback
        stmt = (
            update(w)
            .where(w.patient_ref == patient_ref, func.coalesce(w.checked_at, w.written_at) < checked_before)
            .values(checked_at=_now(now))
            .returning(w.id)
            .execution_options(synchronize_session="fetch")
        )
        return bool(self.session.execute(stmt).all())


_OPEN_WRITEBACK = (WritebackStatus.PENDING.value, WritebackStatus.FAILED.value)


def _sweep_due(ts: datetime) -> tuple[ColumnElement[bool], ...]:
    """What the sweeper may act on at ``ts``: pending past its time, or failed on a transient error whose wait is over."""
    r = WritebackRequest
    return (
        r.next_sweep_at <= ts,
        or_(r.status == WritebackStatus.PENDING.value, and_(r.status == WritebackStatus.FAILED.value, r.transient == true())),
    )


class WritebackRequestRepository(_Repository):
    """``writeback_requests``: each evaluation's write-back until it is written (pending, failed, superseded)."""

    def add(self, evaluation_id: int, patient_ref: str, *, next_sweep_at: datetime, now: datetime | None = None) -> None:
        """A pending write-back (none when the evaluation has one); the patient's older ones still open are
        superseded (the newer evaluation is what the EHR must show)."""
        ts = _now(now)
        self._insert_pending(evaluation_id, patient_ref, next_sweep_at, ts)
        r = WritebackRequest
        self.session.execute(
            update(r)
            .where(r.patient_ref == patient_ref, r.evaluation_id < evaluation_id, r.status.in_(_OPEN_WRITEBACK))
            .values(status=WritebackStatus.SUPERSEDED.value, finished_at=ts, updated_at=ts)
            .execution_options(synchronize_session="fetch")
        )

    def _insert_pending(self, evaluation_id: int, patient_ref: str, next_sweep_at: datetime, ts: datetime) -> None:
        """The evaluation's pending row, unless it has one (whatever its status)."""
        self.session.execute(
            _insert(self.session, WritebackRequest)
            .values(
                evaluation_id=evaluation_id,
                patient_ref=patient_ref,
                status=WritebackStatus.PENDING.value,
                attempts=0,
                sweeps=0,
                transient=False,
                next_sweep_at=next_sweep_at,
                created_at=ts,
                updated_at=ts,
            )
            .on_conflict_do_nothing(index_elements=[WritebackRequest.evaluation_id])
        )

    def get(self, evaluation_id: int) -> WritebackRequest | None:
        stmt = select(WritebackRequest).where(WritebackRequest.evaluation_id == evaluation_id).execution_options(populate_existing=True)
        return self.session.scalars(stmt).one_or_none()

    def begin(self, evaluation_id: int, patient_ref: str, *, lease_until: datetime, now: datetime | None = None) -> bool:
        """A task run starts: count the attempt and keep the sweeper away until ``lease_until``. False when there is
        nothing to write (written or superseded). An evaluation stored before write-backs were recorded gets its row."""
        ts = _now(now)
        self._insert_pending(evaluation_id, patient_ref, lease_until, ts)
        r = WritebackRequest
        stmt = (
            update(r)
            .where(r.evaluation_id == evaluation_id, r.status.in_(_OPEN_WRITEBACK))
            .values(attempts=r.attempts + 1, next_sweep_at=lease_until, updated_at=ts)
            .returning(r.evaluation_id)
            .execution_options(synchronize_session="fetch")
        )
        return self.session.execute(stmt).first() is not None

    def finish(
        self,
        evaluation_id: int,
        status: str,
        *,
        results: dict[str, Any] | None = None,
        error: str | None = None,
        transient: bool = False,
        next_sweep_at: datetime | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Record an outcome: ``written`` or ``superseded`` (done), ``failed`` (``error``: types and statuses only;
        ``transient`` with ``next_sweep_at``: the sweeper sends it again then), or ``pending`` (a task retry is
        scheduled; the sweeper stays away until ``next_sweep_at``). ``pending`` and ``failed`` change only a row
        still open. Returns whether a row changed."""
        status = WritebackStatus(status).value
        ts = _now(now)
        values: dict[str, Any] = {"status": status, "transient": transient, "updated_at": ts}
        if status in (WritebackStatus.WRITTEN, WritebackStatus.SUPERSEDED, WritebackStatus.FAILED):
            values["finished_at"] = ts
        if results is not None:
            values["results"] = results
        if error is not None:
            values["last_error"] = _error_text(error)
        if next_sweep_at is not None:
            values["next_sweep_at"] = next_sweep_at
        r = WritebackRequest
        conditions: list[ColumnElement[bool]] = [r.evaluation_id == evaluation_id]
        if status in _OPEN_WRITEBACK:  # a late failure never reopens one written or superseded meanwhile
            conditions.append(r.status.in_(_OPEN_WRITEBACK))
        stmt = update(r).where(*conditions).values(**values).returning(r.evaluation_id).execution_options(synchronize_session="fetch")
        return self.session.execute(stmt).first() is not None

    def due(self, now: datetime | None = None, limit: int = 100) -> list[WritebackRequest]:
        """What the sweeper may send again now: pending ones not done in time (a lost message, a killed worker) and
        failed ones that failed on a transient error; the longest waiting first."""
        r = WritebackRequest
        stmt = (
            select(r)
            .where(*_sweep_due(_now(now)))
            .order_by(r.next_sweep_at, r.evaluation_id)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def swept(self, evaluation_id: int, *, next_sweep_at: datetime, now: datetime | None = None) -> bool:
        """The sweeper sends it again: count that, and not again before ``next_sweep_at``. False when it is no longer
        due (another sweep took it first, or it was written meanwhile): then it must not be sent. The condition is
        checked again on the row a concurrent sweep's update left, so of two sweeps only one sends it."""
        ts = _now(now)
        r = WritebackRequest
        stmt = (
            update(r)
            .where(r.evaluation_id == evaluation_id, *_sweep_due(ts))
            .values(sweeps=r.sweeps + 1, next_sweep_at=next_sweep_at, updated_at=ts)
            .returning(r.evaluation_id)
            .execution_options(synchronize_session="fetch")
        )
        return self.session.execute(stmt).first() is not None

    def give_up(self, evaluation_id: int, error: str, *, now: datetime | None = None) -> bool:
        """The sweeper stops sending it: failed for an operator, unless another sweep or a task settled it first."""
        ts = _now(now)
        r = WritebackRequest
        stmt = (
            update(r)
            .where(r.evaluation_id == evaluation_id, *_sweep_due(ts))
            .values(status=WritebackStatus.FAILED.value, transient=False, last_error=_error_text(error), finished_at=ts, updated_at=ts)
            .returning(r.evaluation_id)
            .execution_options(synchronize_session="fetch")
        )
        return self.session.execute(stmt).first() is not None

    def newest_pending(self, patient_ref: str) -> int | None:
        """The patient's newest write-back still waiting to be written, if any."""
        r = WritebackRequest
        stmt = select(func.max(r.evaluation_id)).where(r.patient_ref == patient_ref, r.status == WritebackStatus.PENDING.value)
        found = self.session.execute(stmt).scalar()
        return int(found) if found is not None else None

    def reopen(self, evaluation_id: int, patient_ref: str, *, next_sweep_at: datetime, now: datetime | None = None) -> None:
        """Make the write-back pending again (whatever its status): it must be sent once more."""
        ts = _now(now)
        self._insert_pending(evaluation_id, patient_ref, next_sweep_at, ts)
        r = WritebackRequest
        self.session.execute(
            update(r)
            .where(r.evaluation_id == evaluation_id)
            .values(status=WritebackStatus.PENDING.value, transient=False, finished_at=None, next_sweep_at=next_sweep_at, updated_at=ts)
            .execution_options(synchronize_session="fetch")
        )

    def list_failed(self, limit: int = 100) -> list[WritebackRequest]:
        """Failed write-backs, most recently failed first."""
        r = WritebackRequest
        stmt = select(r).where(r.status == WritebackStatus.FAILED.value).order_by(r.updated_at.desc(), r.evaluation_id.desc()).limit(limit)
        return list(self.session.scalars(stmt))

    def replay_failed(
        self, evaluation_ids: Iterable[int] | None = None, *, all_failed: bool = False, next_sweep_at: datetime, now: datetime | None = None
    ) -> list[int]:
        """Put failed write-backs back to ``pending`` (sweeper count reset, last_error kept); returns their ids."""
        if evaluation_ids is None and not all_failed:
            raise ValueError("pass evaluation_ids or all_failed=True")
        r = WritebackRequest
        conditions: list[ColumnElement[bool]] = [r.status == WritebackStatus.FAILED.value]
        if evaluation_ids is not None:
            ids = list(evaluation_ids)
            if not ids:
                return []
            conditions.append(r.evaluation_id.in_(ids))
        stmt = (
            update(r)
            .where(*conditions)
            .values(status=WritebackStatus.PENDING.value, sweeps=0, transient=False, finished_at=None, next_sweep_at=next_sweep_at, updated_at=_now(now))
            .returning(r.evaluation_id)
            .execution_options(synchronize_session="fetch")
        )
        return sorted(self.session.scalars(stmt).all())

    def statuses(self, evaluation_ids: Iterable[int]) -> dict[int, str]:
        ids = list(evaluation_ids)
        if not ids:
            return {}
        rows = self.session.execute(select(WritebackRequest.evaluation_id, WritebackRequest.status).where(WritebackRequest.evaluation_id.in_(ids)))
        return {int(i): str(status) for i, status in rows}

    def counts_by_status(self) -> dict[str, int]:
        """Number of write-backs per status (every status present, zero included)."""
        counts = {s.value: 0 for s in WritebackStatus}
        for status, n in self.session.execute(select(WritebackRequest.status, func.count()).group_by(WritebackRequest.status)):
            counts[status] = int(n)
        return counts


_EXPIRED = datetime(1970, 1, 1, tzinfo=UTC)


class WritebackLeaseRepository(_Repository):
    """``writeback_leases``: one write-back per patient at a time (see :class:`~service.db.models.WritebackLease`).

    Every statement is a single atomic upsert, update or delete whose condition PostgreSQL checks again on the row
    a concurrent statement left, so two runs never both hold a patient's lease."""

    def acquire(self, patient_ref: str, holder: str, evaluation_id: int, *, until: datetime, now: datetime | None = None) -> tuple[bool, bool]:
        """Take the patient's lease for ``holder`` until ``until`` when it is free or expired. Returns (taken,
        resend): ``resend`` is the demand to write every flag again, which the taker now owns (cleared)."""
        ts = _now(now)
        lease = WritebackLease
        insert = _insert(self.session, lease).values(patient_ref=patient_ref, holder=holder, evaluation_id=evaluation_id, expires_at=until, resend=False)
        ex = insert.excluded
        stmt = insert.on_conflict_do_update(
            index_elements=[lease.patient_ref],
            set_={"holder": ex.holder, "evaluation_id": ex.evaluation_id, "expires_at": ex.expires_at},  # resend is kept: the taker owns it
            where=lease.expires_at < ts,
        ).returning(lease.resend)
        row = self.session.execute(stmt).first()
        if row is None:
            return False, False
        resend = bool(row[0])
        if resend:
            self.session.execute(update(lease).where(lease.patient_ref == patient_ref, lease.holder == holder).values(resend=False))
        return True, resend

    def renew(self, patient_ref: str, holder: str, *, until: datetime) -> bool:
        """Extend ``holder``'s lease to ``until``; False when it no longer holds it."""
        lease = WritebackLease
        stmt = (
            update(lease)
            .where(lease.patient_ref == patient_ref, lease.holder == holder)
            .values(expires_at=until)
            .returning(lease.patient_ref)
            .execution_options(synchronize_session="fetch")
        )
        return self.session.execute(stmt).first() is not None

    def release(self, patient_ref: str, holder: str) -> bool | None:
        """Give the lease up. Returns None when ``holder`` no longer held it (it expired and may have been taken),
        else whether a write-back again was demanded meanwhile."""
        lease = WritebackLease
        stmt = delete(lease).where(lease.patient_ref == patient_ref, lease.holder == holder).returning(lease.resend)
        row = self.session.execute(stmt).first()
        return None if row is None else bool(row[0])

    def demand_resend(self, patient_ref: str) -> None:
        """The EHR may hold an older resource of the patient: the lease's current or next holder writes every flag
        again. With no holder, a row that has expired already carries the demand."""
        lease = WritebackLease
        stmt = _insert(self.session, lease).values(patient_ref=patient_ref, holder="", evaluation_id=None, expires_at=_EXPIRED, resend=True)
        self.session.execute(stmt.on_conflict_do_update(index_elements=[lease.patient_ref], set_={"resend": True}))

    def get(self, patient_ref: str) -> WritebackLease | None:
        stmt = select(WritebackLease).where(WritebackLease.patient_ref == patient_ref).execution_options(populate_existing=True)
        return self.session.scalars(stmt).one_or_none()


# --------------------------------------------------------------------------- cards and feedback


class IssuedCardRepository(_Repository):
    """``issued_cards``: cards returned to the EHR, for joining feedback in audits."""

    def record_many(self, rows: Sequence[dict[str, Any]], issued_at: datetime | None = None) -> None:
        """Store a batch of cards (``card_uuid``, ``service_id``, ``patient_ref``, ``topic``, ``rule_id``) in one
        executemany of a prebuilt statement; uuids already known are skipped."""
        if not rows:
            return
        ts = _now(issued_at)
        stmt = _prepared(self.session, "issued_cards_insert_many", _build_issued_cards_insert)
        self.session.execute(stmt, [{**row, "issued_at": ts} for row in rows])

    def get(self, card_uuid: str) -> IssuedCard | None:
        return self.session.get(IssuedCard, card_uuid)

    def list_for_patient(self, patient_ref: str, limit: int = 100) -> list[IssuedCard]:
        stmt = (
            select(IssuedCard)
            .where(IssuedCard.patient_ref == patient_ref)
            .order_by(IssuedCard.issued_at.desc(), IssuedCard.card_uuid)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))


class CardFeedbackRepository(_Repository):
    """``card_feedback``: CDS Hooks feedback; the same (service, card, outcome) is stored once."""

    def record_feedback(
        self,
        *,
        service_id: str,
        card_uuid: str,
        outcome: str,
        outcome_timestamp: datetime,
        override_reason: dict[str, Any] | None = None,
        accepted_suggestions: list[dict[str, Any]] | None = None,
        user_comment: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Store the feedback; False when this outcome for this card was already recorded."""
        outcome = FeedbackOutcome(outcome).value
        stmt = (
            _insert(self.session, CardFeedback)
            .values(
                service_id=service_id,
                card_uuid=card_uuid,
                outcome=outcome,
                outcome_timestamp=outcome_timestamp,
                override_reason=override_reason,
                accepted_suggestions=accepted_suggestions,
                user_comment=user_comment,
                received_at=_now(now),
            )
            .on_conflict_do_nothing(index_elements=[CardFeedback.service_id, CardFeedback.card_uuid, CardFeedback.outcome])
            .returning(CardFeedback.id)
        )
        return self.session.execute(stmt).first() is not None

    def list_feedback(
        self,
        service_id: str | None = None,
        card_uuid: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[CardFeedback]:
        """Feedback, newest received first, optionally filtered by service, card and received time."""
        return [feedback for feedback, _ in self.list_feedback_with_cards(service_id, card_uuid, since, limit)]

    def list_feedback_with_cards(
        self,
        service_id: str | None = None,
        card_uuid: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[tuple[CardFeedback, IssuedCard | None]]:
        """:meth:`list_feedback`, each with the issued card it refers to (None when the card is unknown: never
        issued by this service, or its audit row was dropped)."""
        stmt = select(CardFeedback, IssuedCard).outerjoin(IssuedCard, IssuedCard.card_uuid == CardFeedback.card_uuid)
        if service_id is not None:
            stmt = stmt.where(CardFeedback.service_id == service_id)
        if card_uuid is not None:
            stmt = stmt.where(CardFeedback.card_uuid == card_uuid)
        if since is not None:
            stmt = stmt.where(CardFeedback.received_at >= since)
        stmt = stmt.order_by(CardFeedback.received_at.desc(), CardFeedback.id.desc()).limit(limit)
        return [(feedback, card) for feedback, card in self.session.execute(stmt).tuples()]


# --------------------------------------------------------------------------- subscription state


class SubscriptionStateRepository(_Repository):
    """``subscription_state``: event numbering (gap detection), liveness and the polling watermark."""

    def _ensure_row(self, subscription: str, ts: datetime) -> None:
        self.session.execute(
            _insert(self.session, SubscriptionState)
            .values(subscription=subscription, created_at=ts, updated_at=ts)
            .on_conflict_do_nothing(index_elements=[SubscriptionState.subscription])
        )

    def _locked(self, subscription: str, ts: datetime) -> SubscriptionState:
        # The INSERT takes SQLite's write lock for the rest of the transaction; FOR UPDATE locks the
        # PostgreSQL row. Either way the read-modify-write below is not interleaved with another one.
        self._ensure_row(subscription, ts)
        stmt = (
            select(SubscriptionState)
            .where(SubscriptionState.subscription == subscription)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return self.session.scalars(stmt).one()

    def ensure(
        self,
        subscription: str,
        *,
        topic: str | None = None,
        criteria: str | None = None,
        status: str | None = None,
        now: datetime | None = None,
    ) -> SubscriptionState:
        """The subscription's row, created if absent; given topic/criteria/status are stored."""
        ts = _now(now)
        state = self._locked(subscription, ts)
        if topic is not None:
            state.topic = topic
        if criteria is not None:
            state.criteria = criteria
        if status is not None:
            state.status = status
        if topic is not None or criteria is not None or status is not None:
            state.updated_at = ts
        self.session.flush()
        return state

    def get(self, subscription: str) -> SubscriptionState | None:
        stmt = (
            select(SubscriptionState)
            .where(SubscriptionState.subscription == subscription)
            .execution_options(populate_existing=True)
        )
        return self.session.scalars(stmt).one_or_none()

    def list_all(self) -> list[SubscriptionState]:
        return list(self.session.scalars(select(SubscriptionState).order_by(SubscriptionState.subscription)))

    def set_status(self, subscription: str, status: str, *, now: datetime | None = None) -> None:
        self.ensure(subscription, status=status, now=now)

    def _advance(self, state: SubscriptionState, highest_seen: int, *, inclusive: bool) -> range:
        last = state.last_event_number
        if last is None:
            state.last_event_number = highest_seen
            return range(0)
        if highest_seen <= last:
            return range(0)
        state.last_event_number = highest_seen
        return range(last + 1, highest_seen + 1 if inclusive else highest_seen)

    def observe_event_number(self, subscription: str, event_number: int, *, now: datetime | None = None) -> range:
        """Record a notification's event number; returns the numbers skipped since the highest seen, however many
        (a ``range``: its first and last number, never a list). Each gap is reported once. The first number seen
        is the baseline; a late or repeated number reports nothing."""
        ts = _now(now)
        state = self._locked(subscription, ts)
        missing = self._advance(state, event_number, inclusive=False)
        state.last_notification_at = ts
        state.updated_at = ts
        self.session.flush()
        if missing:
            log.info("subscription event gap: %d missing", len(missing))
        return missing

    def observe_events_since_start(self, subscription: str, events_since_start: int, *, now: datetime | None = None) -> range:
        """Record ``eventsSinceSubscriptionStart`` of a handshake, heartbeat or status: events up to and
        including that count were sent, so any of them beyond the highest seen are missing (a ``range``)."""
        ts = _now(now)
        state = self._locked(subscription, ts)
        missing = self._advance(state, events_since_start, inclusive=True)
        state.updated_at = ts
        self.session.flush()
        return missing

    def merge_into(self, old: str, new: str, *, now: datetime | None = None) -> bool:
        """Fold the row kept under another form of the same subscription's reference (``old``, e.g. the absolute URL
        recorded before keys were normalised) into ``new``, then delete it: the highest event number, the latest
        heartbeat, notification and watermarks, the earliest creation; topic, criteria and status where ``new`` has
        none. Returns whether there was a row to fold. Locks ``new`` first, then ``old`` (one order for all)."""
        if old == new:
            return False
        ts = _now(now)
        if self.get(old) is None:
            return False
        state = self._locked(new, ts)
        legacy = self.session.scalars(
            select(SubscriptionState).where(SubscriptionState.subscription == old).with_for_update().execution_options(populate_existing=True)
        ).one_or_none()
        if legacy is None:
            return False

        def latest(a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else max(a, b)

        state.last_event_number = latest(state.last_event_number, legacy.last_event_number)
        state.last_heartbeat_at = latest(state.last_heartbeat_at, legacy.last_heartbeat_at)
        state.last_notification_at = latest(state.last_notification_at, legacy.last_notification_at)
        state.watermark = latest(state.watermark, legacy.watermark)
        state.topic = state.topic if state.topic is not None else legacy.topic
        state.criteria = state.criteria if state.criteria is not None else legacy.criteria
        state.status = state.status if state.status is not None else legacy.status
        state.created_at = min(state.created_at, legacy.created_at)
        state.updated_at = ts
        self.session.flush()
        marks = self.type_watermarks(old)
        if marks:
            self.set_type_watermarks(new, marks, now=ts)
            for rtype, mark in sorted(self.history_watermarks(old).items()):
                self.set_history_watermark(new, rtype, mark, now=ts)
            self.session.execute(delete(SubscriptionWatermark).where(SubscriptionWatermark.subscription == old))
        self.session.delete(legacy)
        self.session.flush()
        return True

    def touch_heartbeat(self, subscription: str, *, now: datetime | None = None) -> None:
        ts = _now(now)
        stmt = _insert(self.session, SubscriptionState).values(
            subscription=subscription, last_heartbeat_at=ts, created_at=ts, updated_at=ts
        )
        ex = stmt.excluded
        self.session.execute(
            stmt.on_conflict_do_update(
                index_elements=[SubscriptionState.subscription],
                set_={"last_heartbeat_at": ex.last_heartbeat_at, "updated_at": ex.updated_at},
            )
        )

    def get_watermark(self, subscription: str) -> datetime | None:
        stmt = select(SubscriptionState.watermark).where(SubscriptionState.subscription == subscription)
        return self.session.scalar(stmt)

    def set_watermark(self, subscription: str, watermark: datetime, *, now: datetime | None = None) -> bool:
        """Move the ``_lastUpdated`` polling watermark forward (never back); returns whether it moved."""
        ts = _now(now)
        stmt = _insert(self.session, SubscriptionState).values(
            subscription=subscription, watermark=watermark, created_at=ts, updated_at=ts
        )
        ex = stmt.excluded
        forward = stmt.on_conflict_do_update(
            index_elements=[SubscriptionState.subscription],
            set_={"watermark": ex.watermark, "updated_at": ex.updated_at},
            where=or_(SubscriptionState.watermark.is_(None), SubscriptionState.watermark < ex.watermark),
        ).returning(SubscriptionState.subscription)
        return self.session.execute(forward).first() is not None

    def type_watermarks(self, subscription: str) -> dict[str, datetime]:
        """Each resource type's polling watermark of the subscription (types never searched are absent)."""
        stmt = select(SubscriptionWatermark.resource_type, SubscriptionWatermark.watermark).where(
            SubscriptionWatermark.subscription == subscription
        )
        return {rtype: mark for rtype, mark in self.session.execute(stmt)}

    def set_type_watermarks(self, subscription: str, marks: Mapping[str, datetime], *, now: datetime | None = None) -> None:
        """Move each type's polling watermark forward (never back), then the subscription's own watermark to the
        oldest of them: the point up to which every type has been fetched."""
        if not marks:
            return
        ts = _now(now)
        for rtype, mark in sorted(marks.items()):  # one lock order for every writer
            stmt = _insert(self.session, SubscriptionWatermark).values(
                subscription=subscription, resource_type=rtype, watermark=mark, updated_at=ts
            )
            ex = stmt.excluded
            self.session.execute(
                stmt.on_conflict_do_update(
                    index_elements=[SubscriptionWatermark.subscription, SubscriptionWatermark.resource_type],
                    set_={"watermark": ex.watermark, "updated_at": ex.updated_at},
                    where=SubscriptionWatermark.watermark < ex.watermark,
                )
            )
        self.set_watermark(subscription, min(self.type_watermarks(subscription).values()), now=ts)

    def history_watermarks(self, subscription: str) -> dict[str, datetime]:
        """Each resource type's ``_history`` mark of the subscription (types whose history was never read are absent)."""
        stmt = select(SubscriptionWatermark.resource_type, SubscriptionWatermark.history_watermark).where(
            SubscriptionWatermark.subscription == subscription, SubscriptionWatermark.history_watermark.is_not(None)
        )
        return {rtype: mark for rtype, mark in self.session.execute(stmt) if mark is not None}

    def set_history_watermark(self, subscription: str, resource_type: str, mark: datetime, *, now: datetime | None = None) -> None:
        """Move a type's ``_history`` mark forward (never back). Called after the type's search mark was set, so its row
        exists; were it absent, the row is made with the same instant as its search mark."""
        ts = _now(now)
        stmt = _insert(self.session, SubscriptionWatermark).values(
            subscription=subscription, resource_type=resource_type, watermark=mark, history_watermark=mark, updated_at=ts
        )
        ex = stmt.excluded
        self.session.execute(
            stmt.on_conflict_do_update(
                index_elements=[SubscriptionWatermark.subscription, SubscriptionWatermark.resource_type],
                set_={"history_watermark": ex.history_watermark, "updated_at": ex.updated_at},
                where=or_(SubscriptionWatermark.history_watermark.is_(None), SubscriptionWatermark.history_watermark < ex.history_watermark),
            )
        )

    def counts_by_status(self) -> dict[str, int]:
        """Subscriptions per status the FHIR server last reported (every status of ``SUBSCRIPTION_STATUSES``, zero
        included; any other code as ``other``); the polling pseudo-subscription, which has none, is not counted."""
        counts = dict.fromkeys(SUBSCRIPTION_STATUSES, 0)
        rows = self.session.execute(
            select(SubscriptionState.status, func.count()).where(SubscriptionState.status.is_not(None)).group_by(SubscriptionState.status)
        )
        for status, n in rows:
            key = status if status in counts else "other"
            counts[key] += int(n)
        return counts

    def stale_heartbeats(self, older_than: datetime | timedelta, *, now: datetime | None = None) -> list[SubscriptionState]:
        """Subscriptions (not ``off``) with neither a heartbeat nor a notification since the cutoff, and
        known for longer than that."""
        cutoff = _cutoff(older_than, now)
        s = SubscriptionState
        stmt = (
            select(s)
            .where(
                or_(s.status.is_(None), s.status != "off"),
                s.created_at < cutoff,
                or_(s.last_heartbeat_at.is_(None), s.last_heartbeat_at < cutoff),
                or_(s.last_notification_at.is_(None), s.last_notification_at < cutoff),
            )
            .order_by(s.subscription)
        )
        return list(self.session.scalars(stmt))


# ------------------------------------------------------------------------------------ all of them


class Repositories:
    """Every repository over one session: ``repos = Repositories(session); repos.ledger.get(1)``."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.ledger = InboundEventRepository(session)
        self.resources = PatientResourceRepository(session)
        self.queue = EvaluationQueueRepository(session)
        self.evaluations = EvaluationRepository(session)
        self.writebacks = WritebackRepository(session)
        self.writeback_requests = WritebackRequestRepository(session)
        self.writeback_leases = WritebackLeaseRepository(session)
        self.issued_cards = IssuedCardRepository(session)
        self.feedback = CardFeedbackRepository(session)
        self.subscriptions = SubscriptionStateRepository(session)


__all__ = [
    "CardFeedbackRepository",
    "EvaluationQueueRepository",
    "EvaluationRepository",
    "EvaluationSummary",
    "InboundEventRepository",
    "IssuedCardRepository",
    "LedgerEntry",
    "LedgerResult",
    "PatientResourceRepository",
    "Repositories",
    "ResourceVersion",
    "SubscriptionStateRepository",
    "Upserted",
    "WritebackLeaseRepository",
    "WritebackRepository",
    "WritebackRequestRepository",
    "version_number",
]
