"""Background monitoring: inbound changes → durable ledger → per-patient state → coalesced evaluation → write-back.

FHIR servers deliver notifications at least once, out of order, sometimes not at all. Hence:
- every accepted event lands in the ledger under a unique key before we answer 2xx (duplicates: no work);
- full resources are applied at once (version-guarded upsert: an older version never overwrites a newer);
  events that need a fetch are queued for a worker; jobs are sent only after the commit;
- each change marks its patient dirty; only the first mark enqueues an evaluation, which re-runs if more
  changes arrived meanwhile (coalescing: a panel of 20 results evaluates once or twice, not 20 times);
- a sweeper re-enqueues whatever was accepted but not finished (lost messages, killed workers, a restarted
  Redis); gaps in Backport event numbers and silent subscriptions trigger a recovery fetch.
Tasks take ids and re-read state, so running any of them twice changes nothing.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.cds.cards import basis_hash
from service.cds.discovery import observation_code_tokens
from service.cds.engine import evaluate_patient
from service.cds.fhirutil import last_updated_of, resource_ref, subject_reference, version_of
from service.cds.thresholds import Thresholds
from service.config import Settings
from service.db.models import DEDUP_KEY_LEN, EventKind, EventStatus, WritebackStatus
from service.db.repositories import LedgerEntry, Repositories, ResourceVersion
from service.db.session import engine_for, make_session_factory, session_scope
from service.fhir.client import FhirClient, HistoryEntry, client_from_settings, entry_resources, history_entries, next_link
from service.fhir.errors import FhirError, FhirNotFound, FhirPermanentError, redact_url
from service.fhir.notifications import (
    BackportNotification,
    EmptyPing,
    NotificationEvent,
    ResourceChanged,
    ResourceDeleted,
    dedup_key,
    parse_subscription_status,
    subscription_key,
    with_subscription_key,
)
from service.logging import get_logger
from service.metrics import CATCH_UP_HISTORY, CATCH_UP_TRUNCATED, EVALUATIONS, NOTIFICATIONS, WRITEBACKS
from service.queue import TASK_EVALUATE, TASK_PROCESS_EVENT, TASK_WRITEBACK, CeleryQueue, Jobs, NotSent, TaskQueue, unit_of_work
from service.terminology.catalog import Catalog
from service.terminology.checks import load_rule_catalog

log = get_logger("calcinosis-cds.monitor")

#: Resource types the monitor keeps per patient (the evaluation reads nothing else).
MONITORED_TYPES = ("Patient", "Observation", "Condition", "MedicationRequest", "MedicationStatement", "MedicationAdministration", "Procedure")
POLL_SUBSCRIPTION = "poll"  # pseudo-subscription whose watermark drives polling mode


class PermanentEventError(Exception):
    """Processing this event can never succeed as it is (a poison message): mark it failed, keep it replayable."""


@dataclass
class MonitorContext:
    settings: Settings
    catalog: Catalog
    thresholds: Thresholds
    sessions: sessionmaker[Session]
    queue: TaskQueue
    fhir_client: Callable[[], FhirClient] | None = None  # factory; None when no FHIR server is configured
    _client: FhirClient | None = field(default=None, init=False, repr=False, compare=False)
    _client_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _group_commit: _GroupCommit = field(default_factory=lambda: _GroupCommit(), init=False, repr=False, compare=False)
    #: Types whose ``_history`` the FHIR server refused (4xx): deletions of them are not followed by this process.
    no_type_history: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        catalog: Catalog | None = None,
        thresholds: Thresholds | None = None,
        sessions: sessionmaker[Session] | None = None,
        queue: TaskQueue | None = None,
    ) -> MonitorContext:
        """The one way to assemble the monitor's dependencies from settings (API, workers and CLI alike)."""
        if sessions is None:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            sessions = make_session_factory(engine_for(settings))
        return cls(
            settings=settings,
            catalog=catalog if catalog is not None else load_rule_catalog(settings.mappings_dir),
            thresholds=thresholds if thresholds is not None else settings.effective_thresholds(),
            sessions=sessions,
            queue=queue if queue is not None else CeleryQueue.from_settings(settings),
            fhir_client=(lambda: client_from_settings(settings)) if settings.fhir_base_url else None,
        )

    def shared_client(self) -> FhirClient:
        """The process's one FHIR client: its connections and (SMART) access token are reused by every task,
        instead of a new client, TLS handshake and token request for each event."""
        if self.fhir_client is None:
            raise PermanentEventError("no FHIR server configured (CDS_FHIR_BASE_URL)")
        with self._client_lock:
            if self._client is None:
                self._client = self.fhir_client()
            return self._client


@dataclass
class ReceiveSummary:
    accepted: int = 0
    duplicates: int = 0
    events: list[int] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC)


def patient_of(resource: dict[str, Any]) -> str | None:
    if resource.get("resourceType") == "Patient":
        return resource_ref(resource)
    return subject_reference(resource)


# --------------------------------------------------------------------------- applying changes


def apply_resource(repos: Repositories, jobs: Jobs, resource: dict[str, Any], settings: Settings) -> bool:
    """Version-guarded upsert of one resource; marks its patient dirty (enqueueing an evaluation on the first mark)."""
    return apply_resources(repos, jobs, [resource], settings)[0]


def apply_resources(
    repos: Repositories, jobs: Jobs, resources: list[dict[str, Any]], settings: Settings, *, current: bool = False
) -> list[bool]:
    """:func:`apply_resource` for many resources in one transaction: one multi-row version-guarded upsert (the
    same outcome as applying them one by one, in order), then one mark per changed patient counting its
    changes (the same as one mark per change: nobody sees the transaction in between). A version that moves
    a resource to another patient (a result filed on the wrong subject, corrected) marks the patient it left
    too: that patient lost an input. Returns, per resource, whether it was stored.

    ``current``: the resources were just read from the FHIR server, so they also replace a tombstone of their own
    version (a deletion the server does not confirm)."""
    versions: list[ResourceVersion] = []
    targets: list[tuple[int, str | None]] = []
    for i, resource in enumerate(resources):
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if not isinstance(rtype, str) or not isinstance(rid, str) or rtype not in MONITORED_TYPES:
            continue
        patient = patient_of(resource)
        versions.append(ResourceVersion(rtype, rid, patient or "", resource, version_of(resource), last_updated_of(resource)))
        targets.append((i, patient))
    changed = [False] * len(resources)
    marks: dict[str, int] = {}
    for (i, patient), (written, moved_from) in zip(targets, repos.resources.upsert_many_tracked(versions, current=current), strict=True):
        changed[i] = written
        for ref in (patient, moved_from) if written else ():
            if ref:
                marks[ref] = marks.get(ref, 0) + 1
    if marks:
        for patient_ref in repos.queue.mark_dirty_many(marks):
            jobs.add(TASK_EVALUATE, patient_ref, countdown=settings.coalesce_window_s)
    return changed


def apply_deletion(
    repos: Repositories,
    jobs: Jobs,
    resource_type: str,
    resource_id: str,
    settings: Settings,
    *,
    version_id: str | None = None,
    deleted_by: datetime | None = None,
) -> bool:
    """Tombstone a resource; marks its patient dirty when a live version was deleted. Returns whether a row changed.

    Without ``deleted_by`` (a deletion notification, which names no version): the tombstone keeps the stored
    version (see ``mark_deleted``), until :func:`_confirm_deletion` records the deleted version. With it (the FHIR
    server says the resource is gone): the tombstone is exactly at the deleted ``version_id`` (None: unknown) and
    at ``deleted_by``, an instant no earlier than the deletion, so only a newer version (a re-creation) revives it.
    """
    stored = repos.resources.get(resource_type, resource_id)
    patient = stored.patient_ref if stored is not None else None
    was_live = stored is not None and not stored.deleted
    changed = repos.resources.mark_deleted(
        resource_type=resource_type, resource_id=resource_id, patient_ref=patient,
        version_id=version_id, last_updated=deleted_by, exact=deleted_by is not None,
    )
    if changed and was_live and patient:
        mark_dirty(repos, jobs, patient, settings)
    return changed


def mark_dirty(repos: Repositories, jobs: Jobs, patient_ref: str, settings: Settings) -> None:
    if repos.queue.mark_dirty(patient_ref):
        jobs.add(TASK_EVALUATE, patient_ref, countdown=settings.coalesce_window_s)


# --------------------------------------------------------------------------- receiving


def receive(ctx: MonitorContext, notifications: list[Any], form: str) -> ReceiveSummary:
    """Record every event in the ledger, apply full resources, enqueue the rest after commit; returns when the
    events are committed (a duplicate is counted, not redone).

    Group commit: concurrent calls in one process share one transaction (see :class:`_GroupCommit`); if that
    transaction fails, each call is retried in a transaction of its own, so a bad notification fails only its
    own request. Full resources are written in batches: one ledger INSERT, one version-guarded upsert of the
    new ones and one mark per patient for all the consecutive full resources of the group.

    :raises NotSent: the events are committed but sending their jobs failed (``__cause__``: the broker's error).
    Any other exception: nothing of this call was committed."""
    request = _Receipt(notifications, form)
    ctx._group_commit.submit(ctx, request)
    if request.error is not None:
        raise request.error
    NOTIFICATIONS.labels(form, "accepted").inc(request.summary.accepted)
    NOTIFICATIONS.labels(form, "duplicate").inc(request.summary.duplicates)
    return request.summary


@dataclass(eq=False)
class _Receipt:
    """One receive() call: its notifications, and what happened to them."""

    notifications: list[Any]
    form: str
    summary: ReceiveSummary = field(default_factory=ReceiveSummary)
    requeue: list[int] = field(default_factory=list)
    error: BaseException | None = None
    committed: bool = False
    finished: bool = False
    wake: threading.Event = field(default_factory=threading.Event)

    def reset(self) -> None:
        self.summary, self.requeue = ReceiveSummary(), []


class _GroupCommit:
    """Leader/follower group commit of receive() calls (one per MonitorContext: ``ctx._group_commit``).

    A call queues its receipt; if no transaction is running it leads: it takes every queued receipt, writes
    them in one transaction, sends their jobs after the commit, marks them finished, and hands the lead to
    the oldest receipt still queued. The others wait until finished. Nothing is answered before its commit,
    and there is no added delay: a group is whatever arrived while the previous transaction ran.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: list[_Receipt] = []
        self.busy = False

    def submit(self, ctx: MonitorContext, receipt: _Receipt) -> None:
        with self.lock:
            self.queue.append(receipt)
            lead = not self.busy
            self.busy = True
        if not lead:
            receipt.wake.wait()  # finished, or handed the lead
            if receipt.finished:
                return
        # Leading: the batch holds this call's own receipt (queued under the lock that made it leader, and only
        # a leader empties the queue), and _commit_receipts finishes every receipt of its batch.
        with self.lock:
            batch, self.queue = self.queue, []
        try:
            _commit_receipts(ctx, batch)
        finally:
            with self.lock:
                self._hand_off()

    def _hand_off(self) -> None:
        """Under the lock: wake the oldest queued receipt to lead (busy stays True), or go idle."""
        if self.queue:
            self.queue[0].wake.set()
        else:
            self.busy = False


def _commit_receipts(ctx: MonitorContext, batch: list[_Receipt]) -> None:
    """One transaction for the batch; if it fails before its commit, one transaction per receipt."""
    try:
        if len(batch) > 1:
            try:
                _receive_transaction(ctx, batch)
                for receipt in batch:
                    receipt.committed = True
                return
            except NotSent as exc:  # committed, but the broker failed: every receipt gets the error (its cause the broker's)
                for receipt in batch:
                    receipt.error = exc
                return
            except Exception:  # rolled back: retry each receipt on its own
                for receipt in batch:
                    receipt.reset()
        for receipt in batch:
            try:
                _receive_transaction(ctx, [receipt])
                receipt.committed = True
            except NotSent as exc:
                receipt.error = exc
            except Exception as exc:  # answered by the caller (400 for a value the ledger refuses, else 5xx)
                receipt.error = exc
    finally:
        for receipt in batch:
            if not receipt.committed and receipt.error is None:  # interrupted: never answer 2xx for it
                receipt.error = RuntimeError("notification not recorded")
            receipt.finished = True
            receipt.wake.set()


def _receive_transaction(ctx: MonitorContext, batch: list[_Receipt]) -> None:
    jobs = Jobs()
    with session_scope(ctx.sessions) as session:
        repos = Repositories(session)
        pending = _Pending()
        for receipt in batch:
            summary, requeue = receipt.summary, receipt.requeue
            for n in receipt.notifications:
                if isinstance(n, ResourceChanged):
                    _receive_resource(n, summary, requeue, pending)
                    continue
                pending.write(repos, jobs, ctx.settings)
                if isinstance(n, ResourceDeleted):
                    # Keyed by the version it deletes, so delete → recreate → delete is two events, a redelivery one.
                    # "?" when there is none. Processing may record the deleted version the FHIR server names; a
                    # redelivery after that is another event, and processing it again changes nothing.
                    deletes = repos.resources.stored_version(n.resource_type, n.id) or "?"
                    _record(repos, jobs, summary, requeue, dedup_key=f"{dedup_key(n)}/{deletes}", kind="deletion",
                            resource_type=n.resource_type, resource_id=n.id, subscription=n.subscription_id)
                elif isinstance(n, EmptyPing):
                    _receive_ping(repos, jobs, summary, requeue, n.subscription_id or POLL_SUBSCRIPTION)
                elif isinstance(n, BackportNotification):
                    _receive_backport(repos, jobs, with_subscription_key(n, ctx.settings.fhir_base_url), summary, requeue, pending,
                                      sent_as=n.subscription)
                    pending.write(repos, jobs, ctx.settings)
        pending.write(repos, jobs, ctx.settings)
        for receipt in batch:
            for event_id in receipt.requeue:
                jobs.add(TASK_PROCESS_EVENT, event_id)
    jobs.send(ctx.queue)  # committed: if the broker fails, the sweeper and a redelivery resend the jobs


def _receive_ping(repos: Repositories, jobs: Jobs, summary: ReceiveSummary, requeue: list[int], subscription: str) -> None:
    """Pings within 5 s share one fetch, but only while it has not started: a fetch that started (or finished)
    may have searched before the change this ping announces, so the ping then chains a fetch of its own."""
    key = base = f"ping:{subscription}:{int(_now().timestamp() // 5)}"
    for _ in range(100):
        existing = repos.ledger.get_by_dedup_key(key)
        if existing is None or existing.status in (EventStatus.QUEUED, EventStatus.RECEIVED):
            break
        key = f"{base}:after:{existing.id}"
    _record(repos, jobs, summary, requeue, dedup_key=key, kind="empty-ping", subscription=subscription)


def _count(summary: ReceiveSummary, requeue: list[int], event_id: int, status: str, created: bool) -> None:
    if created:
        summary.accepted += 1
        summary.events.append(event_id)
    else:
        summary.duplicates += 1
        # A redelivery of something still waiting (e.g. the broker was down when we first answered): send it again.
        if status in (EventStatus.QUEUED, EventStatus.RECEIVED):
            requeue.append(event_id)


@dataclass
class _Pending:
    """Full resources received and not yet written: their ledger rows, the resource to apply when new, and
    the summary they count in."""

    entries: list[LedgerEntry] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    owners: list[tuple[ReceiveSummary, list[int]]] = field(default_factory=list)

    def add(self, entry: LedgerEntry, resource: dict[str, Any], summary: ReceiveSummary, requeue: list[int]) -> None:
        self.entries.append(entry)
        self.resources.append(resource)
        self.owners.append((summary, requeue))

    def write(self, repos: Repositories, jobs: Jobs, settings: Settings) -> None:
        """Ledger rows first (duplicates: no work), then the new resources (as ``_record`` + ``apply_resource``)."""
        if not self.entries:
            return
        results = repos.ledger.create_many_if_absent(self.entries)
        new: list[dict[str, Any]] = []
        for result, resource, (summary, requeue) in zip(results, self.resources, self.owners, strict=True):
            _count(summary, requeue, result.id, result.status, result.created)
            if result.created:
                new.append(resource)
        self.entries, self.resources, self.owners = [], [], []
        apply_resources(repos, jobs, new, settings)


def _record(repos: Repositories, jobs: Jobs, summary: ReceiveSummary, requeue: list[int], *, dedup_key: str, kind: str,
            status: str = EventStatus.QUEUED, **fields: Any) -> None:
    event_id, stored_status, created = repos.ledger.create_many_if_absent([LedgerEntry(dedup_key, kind, status, **fields)])[0]
    _count(summary, requeue, event_id, stored_status, created)
    if created and status == EventStatus.QUEUED:
        jobs.add(TASK_PROCESS_EVENT, event_id)


def _receive_resource(n: ResourceChanged, summary: ReceiveSummary, requeue: list[int], pending: _Pending) -> None:
    entry = LedgerEntry(dedup_key(n), "resource", EventStatus.HANDLED, subscription=n.subscription_id,
                        resource_type=n.resource_type, resource_id=n.id, version_id=n.version_id, patient_ref=patient_of(n.resource))
    pending.add(entry, n.resource, summary, requeue)


def _receive_backport(repos: Repositories, jobs: Jobs, n: BackportNotification, summary: ReceiveSummary, requeue: list[int],
                      pending: _Pending, *, sent_as: str) -> None:
    """``n`` with its subscription key normalised (``subscription_key``); ``sent_as`` the reference as the server
    sent it, whose row, if one was recorded under it before keys were normalised, is folded into the key's."""
    sub = n.subscription
    if sent_as != sub:
        repos.subscriptions.merge_into(sent_as, sub)
    repos.subscriptions.ensure(sub, topic=n.topic, status=n.status)
    if n.status == "error":  # the server says it is failing to deliver: no sign of life, the silent check stays armed
        log.warning("subscription_status_error", subscription=sub, notification=n.type)
    else:
        repos.subscriptions.touch_heartbeat(sub)
    gaps: list[range] = []
    # The count of events the server has generated: a handshake's (normally 0) is the baseline, so an event missed
    # before the first one delivered is still a gap; a heartbeat's or status's, or that of a notification naming no
    # event, reports the events not listed. An event-notification that lists events is judged by their numbers:
    # its count may already include events still on their way in the next notifications.
    if n.events_since_start is not None and not n.events:
        gaps.append(repos.subscriptions.observe_events_since_start(sub, n.events_since_start))
    for ev in n.events:
        gaps.append(repos.subscriptions.observe_event_number(sub, ev.event_number))
        key = dedup_key(ev)
        if ev.resource is not None:
            pending.add(LedgerEntry(key, "backport-event", EventStatus.HANDLED, subscription=sub, event_number=ev.event_number,
                                  resource_type=str(ev.resource.get("resourceType")), resource_id=str(ev.resource.get("id")),
                                  version_id=version_of(ev.resource), patient_ref=patient_of(ev.resource)), ev.resource, summary, requeue)
        else:
            _record(repos, jobs, summary, requeue, dedup_key=key, kind="backport-event", subscription=sub,
                    event_number=ev.event_number, resource_type=ev.focus_type, resource_id=ev.focus_id,
                    payload={"focus": ev.focus_reference} if ev.focus_reference else None)
    span = _gap_span(gaps, {ev.event_number for ev in n.events})
    if span is not None:
        first, last = span
        log.warning("event_gap", subscription=sub, missing=last - first + 1, first=first, last=last)
        # Each number is reported once (the state moved past it), so the key of a span is new and a redelivery
        # of this notification reports nothing.
        _record(repos, jobs, summary, requeue, dedup_key=f"{sub}#gap#{first}-{last}", kind="recovery",
                subscription=sub, payload={"missing": [first, last]})


def _gap_span(gaps: Iterable[range], delivered: set[int]) -> tuple[int, int] | None:
    """First and last missing number of the spans reported for one notification, less the numbers it delivered at
    either end (the span may still hold some it delivered: recovering them again changes nothing)."""
    spans = [g for g in gaps if g]
    if not spans:
        return None
    first, last = min(g[0] for g in spans), max(g[-1] for g in spans)
    while first <= last and first in delivered:
        first += 1
    while last >= first and last in delivered:
        last -= 1
    return (first, last) if first <= last else None


# --------------------------------------------------------------------------- worker: one ledger event


def process_event(ctx: MonitorContext, event_id: int) -> str:
    """Do the work of one queued ledger event. Returns its final status. Safe to run twice."""
    with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
        repos = Repositories(session)
        if not repos.ledger.claim_for_processing(event_id, stale_after=timedelta(seconds=ctx.settings.sweeper_stale_after_s)):
            event = repos.ledger.get(event_id)
            return event.status if event is not None else "missing"
        event = repos.ledger.get(event_id)
        if event is not None and event.kind == "deletion":
            # At once, committed with the claim: the deleted version stops counting even while the FHIR server
            # cannot be asked (the event then stays queued or failed, and the confirmation below is retried).
            apply_deletion(repos, jobs, str(event.resource_type), str(event.resource_id), ctx.settings)
    with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
        repos = Repositories(session)
        event = repos.ledger.get(event_id)
        if event is None:
            return "missing"
        # Events recorded before subscription keys were normalised name the subscription as the server sent it.
        subscription = subscription_key(event.subscription or POLL_SUBSCRIPTION, ctx.settings.fhir_base_url)
        if event.kind == "deletion":
            if ctx.fhir_client is not None:
                _confirm_deletion(ctx, repos, jobs, str(event.resource_type), str(event.resource_id))
        elif event.kind == "backport-event" and event.resource_type and event.resource_id:
            _fetch_focus(ctx, repos, jobs, event.resource_type, event.resource_id)
        elif event.kind == "backport-event":  # an ``empty`` payload only says "event n happened": find out what
            number = event.event_number
            _recover_gap(ctx, repos, jobs, subscription, [number, number] if number is not None else [])
        elif event.kind in ("empty-ping", "poll", EventKind.CATCH_UP):
            fetch_changes_since_watermark(ctx, repos, jobs, subscription)
        elif event.kind == "recovery":
            _recover_gap(ctx, repos, jobs, subscription, (event.payload or {}).get("missing") or [])
        elif event.kind in ("resource", "backfill") and event.payload:
            apply_resource(repos, jobs, event.payload, ctx.settings)
        repos.ledger.mark_status(event_id, EventStatus.HANDLED)
    return EventStatus.HANDLED


def mark_failed(ctx: MonitorContext, event_id: int, error: BaseException | str) -> None:
    with unit_of_work(ctx.sessions, ctx.queue) as (session, _):
        Repositories(session).ledger.mark_status(event_id, EventStatus.FAILED, error=_describe(error))


def _describe(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]


def _read_or_gone(ctx: MonitorContext, repos: Repositories, jobs: Jobs, rtype: str, rid: str) -> dict[str, Any] | None:
    """The resource's current version read from the FHIR server; None when the server says it is gone (then its
    tombstone is recorded: :func:`_apply_gone`). A refused read is a permanent event error; an unreachable server
    propagates (the task retries)."""
    asked_at = _now()
    try:
        return ctx.shared_client().read(rtype, rid)
    except FhirNotFound:
        _apply_gone(ctx, repos, jobs, rtype, rid, asked_at)
        return None
    except FhirPermanentError as exc:
        raise PermanentEventError(str(exc)) from exc


def _fetch_focus(ctx: MonitorContext, repos: Repositories, jobs: Jobs, rtype: str | None, rid: str | None) -> None:
    if not rtype or not rid:
        raise PermanentEventError("event has no usable focus reference")
    if rtype in MONITORED_TYPES and (resource := _read_or_gone(ctx, repos, jobs, rtype, rid)) is not None:
        apply_resource(repos, jobs, resource, ctx.settings)


def _confirm_deletion(ctx: MonitorContext, repos: Repositories, jobs: Jobs, rtype: str, rid: str) -> None:
    """A deletion notification names no version, and a late update made before the deletion (a retried delivery)
    would be newer than the version it kept: ask the FHIR server. Gone: the tombstone is recorded at the deleted
    version (:func:`_apply_gone`). Still there (re-created, or the notification was stale): its current version is
    applied, over the tombstone of its own version too. The server unreachable: the error propagates (the task
    retries; then the event is failed and replayable) and the tombstone applied on receipt stays meanwhile."""
    if rtype not in MONITORED_TYPES or (current := _read_or_gone(ctx, repos, jobs, rtype, rid)) is None:
        return
    if current.get("id") != rid:
        raise PermanentEventError(f"reading {rtype}/{rid} returned another resource")
    apply_resources(repos, jobs, [current], ctx.settings, current=True)


def _apply_gone(ctx: MonitorContext, repos: Repositories, jobs: Jobs, rtype: str, rid: str, asked_at: datetime) -> None:
    """The FHIR server answered 404/410 to a read sent at ``asked_at``: the deletion happened before then. Tombstone at
    the deleted version its history names, and at the deletion's time (else ``asked_at``): a version updated later
    (or with a higher versionId) is a re-creation and revives the resource; any other is older than the deletion."""
    version_id, deleted_at = _deleted_version(ctx, rtype, rid)
    apply_deletion(repos, jobs, rtype, rid, ctx.settings, version_id=version_id, deleted_by=deleted_at or asked_at)


def _deleted_version(ctx: MonitorContext, rtype: str, rid: str) -> tuple[str | None, datetime | None]:
    """The versionId and time of a deleted resource's deletion, from the newest entry of its ``_history`` (a
    deletion: :func:`history_entries`); (None, None) when the server cannot say. Without them the caller's bound is
    still safe, only coarser."""
    try:
        bundle = ctx.shared_client().history(rtype, rid, count=1)
    except FhirError as exc:
        log.info("deleted_version_unavailable", resource_type=rtype, error=type(exc).__name__)
        return None, None
    newest = next(history_entries(bundle, rtype), None)
    if newest is None or not newest.deleted or newest.resource_id != rid:
        return None, None
    return newest.version_id, newest.modified


def _search_params(ctx: MonitorContext, rtype: str) -> list[tuple[str, str]]:
    if rtype != "Observation":
        return []
    return [("code", ",".join(observation_code_tokens(ctx.catalog)))]


#: A search cut at ``CDS_FHIR_MAX_PAGES`` where stopping would not move the watermark (a page boundary inside one
#: ``lastUpdated`` instant, or a server that does not sort) goes on for up to this many times as many pages.
CATCH_UP_STUCK_FACTOR = 10


@dataclass
class _TypeCatchUp:
    """One type's ``_lastUpdated`` search of a catch-up round."""

    resources: int = 0
    pages: int = 0
    newest: datetime | None = None  # the newest lastUpdated fetched
    cut_at: datetime | None = None  # cut short: every change up to this instant was fetched (None: complete)


def _reread_overlap(ctx: MonitorContext, repos: Repositories, jobs: Jobs, subscription: str, rtype: str, mark: datetime) -> int:
    """Search the ``CDS_POLL_OVERLAP_S`` before a type's watermark again: a server may commit a change after a later
    one was already visible (HAPI stamps ``lastUpdated`` before the commit). What comes back again is an unchanged
    version, stored once and not evaluated again. A search of its own, within ``CDS_FHIR_MAX_PAGES`` pages, so a
    burst of changes inside the window never holds back the search past the watermark; a cut is logged."""
    overlap = timedelta(seconds=ctx.settings.poll_overlap_s)
    if not overlap:
        return 0
    soft = max(1, ctx.settings.fhir_max_pages)
    client, count = ctx.shared_client(), ctx.settings.fhir_search_count
    fetched = 0
    pages = client.history_since_pages(rtype, mark - overlap, _search_params(ctx, rtype), count=count, max_pages=soft, until=mark)
    for page, bundle in enumerate(pages, start=1):
        resources = list(entry_resources(bundle, include_included=False))
        apply_resources(repos, jobs, resources, ctx.settings)
        fetched += len(resources)
        if next_link(bundle) is not None and page >= soft:
            log.warning("catch_up_overlap_truncated", subscription=subscription, resource_type=rtype, resources=fetched, pages=page)
    return fetched


def _catch_up_type(ctx: MonitorContext, repos: Repositories, jobs: Jobs, subscription: str, rtype: str, since: datetime) -> _TypeCatchUp:
    """Fetch a type's changes since its watermark ``since``, oldest first, page by page, for ``CDS_FHIR_MAX_PAGES``
    pages (after the overlap before it is read again: :func:`_reread_overlap`).

    Cut there, the fetched prefix holds every change older than the last ``lastUpdated`` fetched (ties with it may
    lie on the next page), so the type is complete up to the newest ``lastUpdated`` before that one. If there is
    none after ``since`` (every resource fetched shares one instant) or the pages are not in order, stopping would
    not move the watermark: the search goes on, within ``CATCH_UP_STUCK_FACTOR`` times the pages, until it would.
    Beyond that the round fails (:class:`PermanentEventError`): visible, replayable, nothing skipped."""
    soft = max(1, ctx.settings.fhir_max_pages)
    result = _TypeCatchUp()
    last: datetime | None = None  # lastUpdated of the last resource fetched
    complete_to: datetime | None = None  # the newest lastUpdated fetched that is older than ``last``
    ordered = True
    client, count = ctx.shared_client(), ctx.settings.fhir_search_count
    result.resources += _reread_overlap(ctx, repos, jobs, subscription, rtype, since)
    for bundle in client.history_since_pages(rtype, since, _search_params(ctx, rtype), count=count, max_pages=soft * CATCH_UP_STUCK_FACTOR):
        result.pages += 1
        resources = list(entry_resources(bundle, include_included=False))
        apply_resources(repos, jobs, resources, ctx.settings)
        for resource in resources:
            result.resources += 1
            updated = last_updated_of(resource)
            if updated is None or (last is not None and updated < last):
                ordered = False
            if updated is None:
                continue
            if last is not None and updated > last:
                complete_to = last
            last = updated
            if result.newest is None or updated > result.newest:
                result.newest = updated
        if next_link(bundle) is None:
            return result
        if result.pages >= soft and ordered and complete_to is not None and complete_to > since:
            result.cut_at = complete_to
            return result
    # The client stopped at the outer bound with pages left, and no point to stop at.
    CATCH_UP_TRUNCATED.labels(rtype).inc()
    log.warning("catch_up_stuck", subscription=subscription, resource_type=rtype, resources=result.resources, pages=result.pages)
    raise PermanentEventError(
        f"catch-up search of {rtype} cannot advance: {result.resources} resources in {result.pages} pages "
        "share one lastUpdated or are not sorted by it (raise CDS_FHIR_SEARCH_COUNT or CDS_FHIR_MAX_PAGES, then replay)"
    )


#: How far back a type's first ``_history`` read starts at most (see :func:`fetch_changes_since_watermark`).
HISTORY_FIRST_WINDOW = timedelta(hours=1)

#: Statuses with which a FHIR server answers a type-level ``_history`` it does not offer (or does not let us read).
_NO_TYPE_HISTORY = frozenset({400, 403, 404, 405, 501})


def _newer_entry(entry: HistoryEntry, kept: HistoryEntry) -> bool:
    """Whether ``entry`` is a later version than ``kept`` of the same resource, by time and else by a numeric
    versionId; neither comparable: no (history Bundles list the newest first)."""
    if entry.modified is not None and kept.modified is not None and entry.modified != kept.modified:
        return entry.modified > kept.modified
    if entry.version_id and kept.version_id and entry.version_id.isdigit() and kept.version_id.isdigit():
        return int(entry.version_id) > int(kept.version_id)
    return False


@dataclass
class _HistoryRead:
    """One type's ``_history`` read of a catch-up round."""

    changed: int = 0  # stored resources tombstoned or updated
    reached: datetime | None = None  # read completely up to this entry's time (None: the type's mark stays)


def _catch_up_history(
    ctx: MonitorContext, repos: Repositories, jobs: Jobs, subscription: str, rtype: str, since: datetime | None, *, first: datetime
) -> _HistoryRead:
    """Read ``rtype``'s ``_history`` since its own mark ``since`` (less ``CDS_POLL_OVERLAP_S``) and bring the stored
    live resources it names up to their newest entry there: a deletion is tombstoned, a version newer than the
    stored one applied. A type without a mark yet reads nothing: its mark starts at ``first``.

    R4 servers notify no deletion and no search returns a deleted resource; the Observation search is filtered by
    the mapped codes, so a result re-coded out of them is not returned either. Without this such a result would
    stay in the stored record, and if it was the one that lowered a risk, the risk would stay hidden. Resources
    never stored are left alone (a type's history holds every patient's).

    The mark moves to the newest entry read, only when the read was complete. Cut at ``CATCH_UP_STUCK_FACTOR``
    times ``CDS_FHIR_MAX_PAGES`` pages (newest first: the oldest entries of the window were not read), what was
    read is applied and the mark stays, so nothing is skipped; logged and counted, every round until the page
    bound is raised. A server that answers the first page with its own 4xx in ``_NO_TYPE_HISTORY`` offers no
    type-level history: the type is skipped for the life of the process (logged once). Any other failure (a 401, a
    5xx, a timeout) is logged and counted and leaves the mark where it was, without failing the round: the
    searches' results still land, and the next round reads the window again."""
    if since is None:
        return _HistoryRead(reached=first)
    result = _HistoryRead()
    if rtype in ctx.no_type_history:
        return result
    asked_at = _now()
    client = ctx.shared_client()
    history_url = redact_url(client.url(rtype, "_history"))
    window = since - timedelta(seconds=ctx.settings.poll_overlap_s)
    bound = max(1, ctx.settings.fhir_max_pages) * CATCH_UP_STUCK_FACTOR
    newest: dict[str, HistoryEntry] = {}
    read, cut, latest = 0, False, None
    try:
        for bundle in client.history_type_pages(rtype, window, count=ctx.settings.fhir_search_count, max_pages=bound):
            read += 1
            for entry in history_entries(bundle, rtype):
                kept = newest.get(entry.resource_id)
                if kept is None or _newer_entry(entry, kept):
                    newest[entry.resource_id] = entry
                if entry.modified is not None and (latest is None or entry.modified > latest):
                    latest = entry.modified
            cut = next_link(bundle) is not None
    except FhirError as exc:
        # Only the history request's own refusal: a SMART token endpoint refusing a refresh answers 400/403/404 too.
        if not read and isinstance(exc, FhirPermanentError) and exc.status in _NO_TYPE_HISTORY and exc.url == history_url:
            ctx.no_type_history.add(rtype)
            log.warning("type_history_unavailable", subscription=subscription, resource_type=rtype, status=exc.status)
            return result
        CATCH_UP_HISTORY.labels(rtype, "failed").inc()
        log.warning("type_history_failed", subscription=subscription, resource_type=rtype, error=type(exc).__name__, status=exc.status)
        return result
    tombstoned, versions = 0, []
    for rid, stored_version in repos.resources.live_versions(rtype, sorted(newest)).items():
        entry = newest[rid]
        if entry.deleted:
            tombstoned += apply_deletion(repos, jobs, rtype, rid, ctx.settings, version_id=entry.version_id, deleted_by=entry.modified or asked_at)
        elif entry.resource is not None and entry.version_id != stored_version:
            versions.append(entry.resource)  # one the search did not return (re-coded out of its codes)
    updated = sum(apply_resources(repos, jobs, versions, ctx.settings))  # version-guarded: an older one writes nothing
    if tombstoned:
        CATCH_UP_HISTORY.labels(rtype, "tombstoned").inc(tombstoned)
    if cut:
        CATCH_UP_HISTORY.labels(rtype, "truncated").inc()
        log.warning("history_truncated", subscription=subscription, resource_type=rtype, pages=read)
    elif latest is not None:
        # Never past the read's own start: one entry stamped in the future (a server node's clock ahead, an import
        # keeping its lastUpdated) would otherwise move the mark past every deletion made until then.
        result.reached = min(latest, asked_at)
    if tombstoned or updated:
        log.info("history_applied", subscription=subscription, resource_type=rtype, tombstoned=tombstoned, updated=updated)
    result.changed = tombstoned + updated
    return result


def fetch_changes_since_watermark(ctx: MonitorContext, repos: Repositories, jobs: Jobs, subscription: str) -> int:
    """``_lastUpdated`` search per monitored type since that type's watermark (R4 empty pings, polling, recovery).

    Each type's watermark moves to the newest ``lastUpdated`` fetched of that type when its search was complete;
    when a search was cut at ``CDS_FHIR_MAX_PAGES``, only as far as it was completely fetched, and another round
    (a ``catch-up`` event in the ledger, queued after the commit) fetches the rest. One watermark per type: a
    change to one type made while another was searched is older than that other type's newest ``lastUpdated``.
    Each round moves the watermark of every type it cut, so the rounds end; running one twice changes nothing.
    After each type's search, its ``_history`` is read for deletions and re-codes (:func:`_catch_up_history`),
    from a mark of its own."""
    repos.subscriptions.ensure(subscription)
    started = _now()
    base = repos.subscriptions.get_watermark(subscription) or (started - timedelta(hours=ctx.settings.poll_initial_lookback_h))
    marks = repos.subscriptions.type_watermarks(subscription)
    history_marks = repos.subscriptions.history_watermarks(subscription) if ctx.settings.poll_deletions else {}
    reached: dict[str, datetime] = {}
    history_reached: dict[str, datetime] = {}
    count = 0
    cuts: dict[str, datetime] = {}
    for rtype in MONITORED_TYPES:
        since = marks.get(rtype, base)
        fetched = _catch_up_type(ctx, repos, jobs, subscription, rtype, since)
        count += fetched.resources
        if fetched.cut_at is not None:
            cuts[rtype] = fetched.cut_at
            CATCH_UP_TRUNCATED.labels(rtype).inc()
            log.warning("catch_up_truncated", subscription=subscription, resource_type=rtype, resources=fetched.resources, pages=fetched.pages)
        newest = fetched.cut_at or fetched.newest
        reached[rtype] = max(since, newest) if newest is not None else since  # a quiet type keeps its mark
        if ctx.settings.poll_deletions:
            # A type's first history mark is where this round's search started (its search mark), not this round's
            # start: the search returns only changes since that mark and never a deletion, so a resource stored
            # before (an earlier round, a backfill, a release without history marks) and deleted since would
            # otherwise never be read; and our clock may run ahead of the server's. At most HISTORY_FIRST_WINDOW
            # back: a new install's search mark is CDS_POLL_INITIAL_LOOKBACK_H back, and a day of a busy server's
            # history would not fit one read (a cut read keeps its mark: it would never end).
            first = max(since, started - HISTORY_FIRST_WINDOW)
            read = _catch_up_history(ctx, repos, jobs, subscription, rtype, history_marks.get(rtype), first=first)
            count += read.changed
            if read.reached is not None:
                history_reached[rtype] = read.reached
    repos.subscriptions.set_type_watermarks(subscription, reached)
    for rtype, mark in sorted(history_reached.items()):
        repos.subscriptions.set_history_watermark(subscription, rtype, mark)
    if cuts:
        # Every round moves each cut type's watermark forward, so the key of the next round is a new one.
        where = ",".join(f"{rtype}@{mark.isoformat()}" for rtype, mark in sorted(cuts.items()))
        key = f"catch-up:{hashlib.sha256(where.encode()).hexdigest()[:24]}:{subscription}"
        event, created = repos.ledger.create_if_absent(
            dedup_key=key[:DEDUP_KEY_LEN], kind=EventKind.CATCH_UP, subscription=subscription, status=EventStatus.QUEUED
        )
        if created:
            jobs.add(TASK_PROCESS_EVENT, event.id)
    log.info("fetched_changes", subscription=subscription, resources=count, truncated=len(cuts))
    return count


#: The most event numbers one ``$events`` call asks for. A larger gap asks for its first ones and then searches
#: ``_lastUpdated`` for the rest; so does a gap of exactly this many (a recovery recorded before gaps were carried
#: whole was cut at this size).
EVENTS_SPAN_MAX = 10_000


def _recover_gap(ctx: MonitorContext, repos: Repositories, jobs: Jobs, subscription: str, span: list[int]) -> None:
    """Missing Backport events (or events sent with an ``empty`` payload): ask ``$events`` for them with their
    focus (at most ``EVENTS_SPAN_MAX`` numbers); if the server cannot, does not name every focus, or the gap is
    longer than was asked for, search ``_lastUpdated``."""
    sub_id = subscription.rstrip("/").split("/")[-1]
    if span and sub_id:
        first, last = span[0], span[-1]
        until = min(last, first + EVENTS_SPAN_MAX - 1)
        whole = last - first + 1 < EVENTS_SPAN_MAX
        if not whole:
            log.info("events_gap_beyond_operation", subscription=subscription, missing=last - first + 1, asked=until - first + 1)
        try:
            bundle = ctx.shared_client().subscription_events(sub_id, since=first, until=until, content="id-only")
            unresolved = set(range(first, until + 1))
            for n in parse_subscription_status(bundle):
                for ev in with_subscription_key(n, ctx.settings.fhir_base_url).events:
                    if ev.resource is None and not (ev.focus_type and ev.focus_id):
                        continue  # still no focus: left to the search below
                    _apply_event(ctx, repos, jobs, ev)
                    unresolved.discard(ev.event_number)
            if not unresolved and whole:
                return
            if unresolved:
                log.info("events_operation_incomplete", subscription=subscription, unresolved=len(unresolved))
        except (FhirPermanentError, FhirNotFound, ValueError) as exc:
            log.info("events_operation_unavailable", subscription=subscription, error=type(exc).__name__)
    fetch_changes_since_watermark(ctx, repos, jobs, subscription)


def _apply_event(ctx: MonitorContext, repos: Repositories, jobs: Jobs, ev: NotificationEvent) -> None:
    repos.ledger.create_if_absent(dedup_key=dedup_key(ev), kind="backport-event",
                                  status=EventStatus.HANDLED, subscription=ev.subscription, event_number=ev.event_number,
                                  resource_type=ev.focus_type, resource_id=ev.focus_id)
    if ev.resource is not None:
        apply_resource(repos, jobs, ev.resource, ctx.settings)
    else:
        _fetch_focus(ctx, repos, jobs, ev.focus_type, ev.focus_id)


# --------------------------------------------------------------------------- worker: evaluation


def evaluate_patient_state(ctx: MonitorContext, patient_ref: str, now: datetime | None = None) -> int | None:
    """Evaluate a dirty patient from stored state; returns the evaluation id (None if nothing to do)."""
    now = now or _now()
    with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
        repos = Repositories(session)
        generation = repos.queue.claim(patient_ref)
        if generation is None:
            return None
        resources = [c for c in repos.resources.contents_for_patient(patient_ref) if c is not None]
        evaluation = evaluate_patient(
            resources, patient_ref=patient_ref, catalog=ctx.catalog, thresholds=ctx.thresholds, now=now,
            topic_system=ctx.settings.topic_system,
        )
        a = evaluation.assessment
        latest = repos.evaluations.latest_summary_for(patient_ref)
        same = (
            latest is not None
            and latest.inputs_hash == a.inputs_hash
            and latest.rules_version == a.rules_version
            and latest.mappings_version == a.mappings_version
            and latest.evaluated_at.date() == now.date()
        )
        evaluation_id: int | None = latest.id if (same and latest is not None) else None
        if not same:
            document = a.model_dump(mode="json")
            document["risk_assessments"] = evaluation.risk_assessments
            evaluation_id = repos.evaluations.add(
                patient_ref=patient_ref, evaluated_at=now, inputs_hash=a.inputs_hash, inputs=[dict(i) for i in a.inputs],
                rules_version=a.rules_version, mappings_version=a.mappings_version,
                calciphylaxis_tier=a.calciphylaxis.tier, metastatic_tier=a.metastatic_calcification.tier,
                renal_context=a.renal_context, assessment=document,
            )
            EVALUATIONS.labels("monitor").inc()
            if ctx.settings.writeback_enabled:  # recorded with the evaluation: not lost if the job is
                repos.writeback_requests.add(evaluation_id, patient_ref, next_sweep_at=_now() + _writeback_lease(ctx))
                jobs.add(TASK_WRITEBACK, evaluation_id)
        if repos.queue.finish(patient_ref, generation):
            jobs.add(TASK_EVALUATE, patient_ref, countdown=ctx.settings.coalesce_window_s)
    return evaluation_id


# --------------------------------------------------------------------------- worker: write-back


FLAGS = ("calciphylaxis", "metastatic-calcification")


#: The sweeper's delay before sending a write-back again doubles from CDS_SWEEPER_STALE_AFTER_S up to this.
WRITEBACK_SWEEP_BACKOFF_MAX = timedelta(hours=6)


def _writeback_lease(ctx: MonitorContext) -> timedelta:
    """How long a write-back may stay pending (queued or running) before the sweeper sends it again."""
    return timedelta(seconds=ctx.settings.sweeper_stale_after_s)


def writeback_sweep_delay(settings: Settings, sweeps: int) -> timedelta:
    """The wait before the sweeper's next sending of a write-back it has sent ``sweeps`` times (exponential, capped)."""
    return min(timedelta(seconds=settings.sweeper_stale_after_s) * (2 ** min(sweeps, 16)), WRITEBACK_SWEEP_BACKOFF_MAX)


def _patient_lease(settings: Settings) -> timedelta:
    """How long one write-back run may hold its patient's lease to write: every flag's conditional update at its
    worst (each attempt's connect, send and read timeouts and every retry delay at its cap) and a minute more;
    never shorter than the sweeper's lease. The lease is taken for this long, and renewed for as long again once
    the basis has been read (:func:`_renew_lease`), just before the first PUT. A run still writing after that is
    handled as a lost lease (see :func:`_release`)."""
    attempt = 3 * settings.fhir_timeout_s
    update = (settings.fhir_max_retries + 1) * attempt + settings.fhir_max_retries * settings.fhir_retry_after_max_s
    return max(timedelta(seconds=len(FLAGS) * update + 60), timedelta(seconds=settings.sweeper_stale_after_s))


def write_back(ctx: MonitorContext, evaluation_id: int) -> dict[str, str]:
    """Write one RiskAssessment per flag, idempotent by identifier (conditional update), only when the tier or
    its basis changed; a flag that is no longer raised updates the earlier resource (status amended).

    One write-back per patient runs at a time (the patient's lease), so an older evaluation's slow PUT cannot land
    after a newer one's: a run that finds the lease taken leaves its write-back pending, and the holder sends the
    patient's newest pending write-back when it ends. The evaluation's write-back request records the attempt and,
    once done, the outcome; a failure is recorded by the task (:func:`writeback_failed`,
    :func:`writeback_retrying`). Running it twice writes nothing twice."""
    holder = uuid.uuid4().hex
    with unit_of_work(ctx.sessions, ctx.queue) as (session, _):
        repos = Repositories(session)
        row = repos.evaluations.get(evaluation_id)
        if row is None:
            return {}
        if not repos.writeback_requests.begin(evaluation_id, row.patient_ref, lease_until=_now() + _writeback_lease(ctx)):
            return {"skipped": "already written or superseded"}
        latest = repos.evaluations.latest_summary_for(row.patient_ref)
        if latest is not None and latest.id != row.id:
            repos.writeback_requests.finish(evaluation_id, WritebackStatus.SUPERSEDED)
            return {"skipped": "superseded by a newer evaluation"}
        patient_ref = row.patient_ref
        now = _now()
        taken, force = repos.writeback_leases.acquire(patient_ref, holder, evaluation_id, until=now + _patient_lease(ctx.settings), now=now)
        if not taken:
            WRITEBACKS.labels("deferred").inc()
            log.info("writeback_deferred", evaluation_id=evaluation_id)
            return {"skipped": "another write-back of the patient is in flight; it sends this one when it ends"}
        planned = {_flag_of(r): r for r in row.assessment.get("risk_assessments", [])}
        previous = {flag: repos.writebacks.get(patient_ref, flag) for flag in FLAGS}
    skipped: str | None = None  # why nothing was written
    results: dict[str, str] = {}
    try:
        if ctx.settings.writeback_confirm_basis and _basis_changed(ctx, planned):
            skipped = "basis-changed"
        elif not _renew_lease(ctx, patient_ref, holder):  # reading the basis outlasted the lease, and another run took it
            skipped = "lease-lost"
        else:
            results = _write_flags(ctx, patient_ref, row.evaluated_at, planned, previous, force=force)
    except BaseException:
        with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
            _release(ctx, Repositories(session), jobs, patient_ref, holder, evaluation_id, handing_back=force)
        raise
    with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
        repos = Repositories(session)
        if skipped is None:
            repos.writeback_requests.finish(evaluation_id, WritebackStatus.WRITTEN, results=results)
        _release(ctx, repos, jobs, patient_ref, holder, evaluation_id, handing_back=force and skipped is not None)
    if skipped is None:
        return results
    result, event, reason = _NOT_WRITTEN[skipped]
    WRITEBACKS.labels(result).inc()
    log.info(event, evaluation_id=evaluation_id)
    return {"skipped": reason}


#: Why a write-back that held the lease wrote nothing: its metric result, its log event and its answer. It stays
#: pending either way: superseded by the patient's new evaluation, or sent again by the sweeper.
_NOT_WRITTEN = {
    "basis-changed": ("basis-changed", "writeback_basis_changed", "results it rests on changed on the FHIR server; the patient is evaluated again"),
    "lease-lost": ("deferred", "writeback_deferred", "another write-back of the patient took over before this one wrote; it stays pending"),
}


def _renew_lease(ctx: MonitorContext, patient_ref: str, holder: str) -> bool:
    """Before the first PUT, the lease is extended by a whole write's bound (reading the basis took some of it):
    False when it was lost meanwhile (then nothing may be written)."""
    with unit_of_work(ctx.sessions, ctx.queue) as (session, _):
        now = _now()
        return Repositories(session).writeback_leases.renew(patient_ref, holder, until=now + _patient_lease(ctx.settings))


#: Most ids in one ``_id`` search when confirming a write-back's basis.
_BASIS_IDS_PER_SEARCH = 50


def _basis_changed(ctx: MonitorContext, planned: dict[str, dict[str, Any]]) -> bool:
    """Before flags are written, the resources they rest on (each RiskAssessment's ``basis``) are read again from
    the FHIR server: R4 servers notify no deletion, and the catch-up search never returns a deleted result nor one
    re-coded out of the mapped codes, so the stored record can hold a result the EHR no longer has. A basis
    resource that is gone (410, or 404 with a deletion in its history), or whose current version differs and is
    newer, is applied to the stored record (which marks the patient to be evaluated again) and True is returned:
    the write-back then stays pending, superseded by the newer evaluation, or sent again by the sweeper once the
    record is current. The server is asked first (:func:`_read_basis`), the record changed after, in one short
    transaction; an unreachable server propagates (the task retries)."""
    wanted: dict[str, list[str]] = {}
    refs = {b.get("reference") for r in planned.values() for b in r.get("basis", []) if isinstance(b, dict)}
    for ref in sorted(r for r in refs if isinstance(r, str)):
        rtype, _, rid = ref.partition("/")
        if rtype in MONITORED_TYPES and rid and "/" not in rid:
            wanted.setdefault(rtype, []).append(rid)
    if not wanted:
        return False
    current, gone = _read_basis(ctx, wanted)
    with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
        repos = Repositories(session)
        # Only another version than the stored one: a server that keeps no version would otherwise "change" every time.
        newer = [r for r in current if version_of(r) != repos.resources.stored_version(r["resourceType"], r["id"])]
        changed = any(apply_resources(repos, jobs, newer, ctx.settings, current=True))
        for rtype, rid, version_id, deleted_by in gone:
            changed |= apply_deletion(repos, jobs, rtype, rid, ctx.settings, version_id=version_id, deleted_by=deleted_by)
    return changed


def _read_basis(
    ctx: MonitorContext, wanted: dict[str, list[str]]
) -> tuple[list[dict[str, Any]], list[tuple[str, str, str | None, datetime]]]:
    """The current versions of the ``wanted`` resources (one ``_id`` search per type and up to
    ``_BASIS_IDS_PER_SEARCH`` ids, then a read for each id the search did not return), and those gone: (type, id,
    deleted version, deleted no later than). A 404 with no deletion in its history (the server never had it: a
    record loaded from files), or a read the service may not make, leaves the resource out of both."""
    client = ctx.shared_client()
    found: dict[tuple[str, str], dict[str, Any]] = {}
    gone: list[tuple[str, str, str | None, datetime]] = []
    for rtype, ids in wanted.items():
        for start in range(0, len(ids), _BASIS_IDS_PER_SEARCH):
            chunk = ids[start : start + _BASIS_IDS_PER_SEARCH]
            try:
                for resource in client.search(rtype, [("_id", ",".join(chunk)), ("_count", str(len(chunk)))], max_pages=1):
                    if resource.get("resourceType") == rtype and resource.get("id") in chunk:
                        found[(rtype, resource["id"])] = resource
            except FhirPermanentError as exc:  # no _id search here: each one is read instead
                log.info("writeback_basis_search_refused", resource_type=rtype, error=type(exc).__name__)
        for rid in (i for i in ids if (rtype, i) not in found):
            asked_at = _now()
            try:
                resource = client.read(rtype, rid)  # gone, or not searchable by _id
            except FhirNotFound as exc:
                version_id, deleted_at = _deleted_version(ctx, rtype, rid)
                if exc.gone or version_id is not None or deleted_at is not None:
                    gone.append((rtype, rid, version_id, deleted_at or asked_at))
                else:
                    log.info("writeback_basis_unconfirmed", resource_type=rtype, error="not found")
                continue
            except FhirPermanentError as exc:  # not allowed to read it: written as evaluated
                log.info("writeback_basis_unconfirmed", resource_type=rtype, error=type(exc).__name__)
                continue
            if resource.get("id") == rid:
                found[(rtype, rid)] = resource
    return list(found.values()), gone


def _write_flags(
    ctx: MonitorContext, patient_ref: str, evaluated_at: datetime, planned: dict[str, dict[str, Any]], previous: dict[str, Any], *, force: bool
) -> dict[str, str]:
    """PUT each flag's RiskAssessment that differs from what was last written (every one when ``force``: the EHR
    may hold an older evaluation's), recording each write as it lands."""
    results: dict[str, str] = {}
    client = ctx.shared_client()
    for flag in FLAGS:
        resource = planned.get(flag)
        prior = previous[flag]
        if resource is None:
            if prior is None or (prior.tier == "none" and not force):
                continue
            resource = _retracted(prior, patient_ref, evaluated_at)
        bhash = basis_hash(resource)
        tier = _tier_of(resource)
        if not force and prior is not None and prior.basis_hash == bhash and prior.tier == tier:
            results[flag] = "unchanged"
            WRITEBACKS.labels("unchanged").inc()
            continue
        ident = resource["identifier"][0]
        written = client.conditional_update("RiskAssessment", ident["system"], ident["value"], resource)
        with unit_of_work(ctx.sessions, ctx.queue) as (session, _):
            Repositories(session).writebacks.upsert(
                patient_ref=patient_ref, flag=flag, identifier_system=ident["system"], identifier_value=ident["value"],
                basis_hash=bhash, tier=tier, fhir_id=written.get("id"), fhir_version=version_of(written),
            )
        results[flag] = "written"
        WRITEBACKS.labels("written").inc()
    return results


def _release(
    ctx: MonitorContext, repos: Repositories, jobs: Jobs, patient_ref: str, holder: str, evaluation_id: int, *, handing_back: bool = False
) -> None:
    """Give the patient's lease up and send what waits: the newest pending write-back of the patient.

    When this run's lease had expired before it ended (another run may have written meanwhile, and this run's
    PUTs may have landed after it), or a run whose lease had expired wrote while this one held it, the EHR may
    hold an older evaluation's resources: the newest evaluation is written again, every flag, whatever the
    record of the last write says. ``handing_back``: this run took such a demand with the lease and did not
    write (it failed, or its basis changed): the demand goes back to the next run."""
    demanded = repos.writeback_leases.release(patient_ref, holder)
    resend = demanded is None or demanded  # lost while writing, or another wrote while this run held it
    if handing_back or resend:
        repos.writeback_leases.demand_resend(patient_ref)  # handed back only: the retry, the re-evaluation or the sweeper runs next
    if resend:
        log.warning("writeback_resend", evaluation_id=evaluation_id, reason="lease expired" if demanded is None else "demanded")
        latest = repos.evaluations.latest_summary_for(patient_ref)
        if latest is not None:
            _send_again(ctx, repos, jobs, latest.id, patient_ref)
        return
    waiting = repos.writeback_requests.newest_pending(patient_ref)
    if waiting is not None and waiting != evaluation_id:
        jobs.add(TASK_WRITEBACK, waiting)


def _send_again(ctx: MonitorContext, repos: Repositories, jobs: Jobs, evaluation_id: int, patient_ref: str) -> None:
    """An evaluation's write-back, pending again and on the queue after the commit."""
    repos.writeback_requests.reopen(evaluation_id, patient_ref, next_sweep_at=_now() + _writeback_lease(ctx))
    jobs.add(TASK_WRITEBACK, evaluation_id)


def writeback_error(error: BaseException) -> str:
    """What is recorded of a write-back's error: its type and HTTP status, never its text."""
    status = getattr(error, "status", None)
    return f"{type(error).__name__}: HTTP {status}" if isinstance(status, int) else type(error).__name__


def writeback_retrying(ctx: MonitorContext, evaluation_id: int, error: BaseException, countdown_s: float) -> None:
    """A transient failure the task retries in ``countdown_s``: still pending; the sweeper waits for the retry."""
    with unit_of_work(ctx.sessions, ctx.queue) as (session, _):
        Repositories(session).writeback_requests.finish(
            evaluation_id,
            WritebackStatus.PENDING,
            error=f"retrying: {writeback_error(error)}",
            next_sweep_at=_now() + timedelta(seconds=countdown_s) + _writeback_lease(ctx),
        )


def writeback_failed(ctx: MonitorContext, evaluation_id: int, error: BaseException, *, transient: bool) -> None:
    """The task gave up: failed, listed by ``events --failed`` and replayable; a transient failure is sent again by
    the sweeper after a backoff (up to ``CDS_WRITEBACK_SWEEPER_RETRIES`` times)."""
    with unit_of_work(ctx.sessions, ctx.queue) as (session, _):
        requests = Repositories(session).writeback_requests
        row = requests.get(evaluation_id)
        next_sweep_at = _now() + writeback_sweep_delay(ctx.settings, row.sweeps) if (transient and row is not None) else None
        requests.finish(evaluation_id, WritebackStatus.FAILED, error=writeback_error(error), transient=transient, next_sweep_at=next_sweep_at)
    WRITEBACKS.labels("failed").inc()  # the task's own task_failed line names it (evaluation id, error type)


def _flag_of(resource: dict[str, Any]) -> str:
    value = resource["identifier"][0]["value"]
    return next(f for f in FLAGS if value.endswith(f"-{f}"))


def _tier_of(resource: dict[str, Any]) -> str:
    if resource.get("status") == "amended":
        return "none"
    risk = resource.get("prediction", [{}])[0].get("qualitativeRisk", {})
    codings = risk.get("coding") or []
    return str(codings[0]["code"]) if codings else str(risk.get("text", "unknown"))


def _retracted(prior: Any, patient_ref: str, when: datetime) -> dict[str, Any]:
    return {
        "resourceType": "RiskAssessment",
        "identifier": [{"system": prior.identifier_system, "value": prior.identifier_value}],
        "status": "amended",
        "subject": {"reference": patient_ref},
        "occurrenceDateTime": when.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "prediction": [{"outcome": {"text": prior.flag}, "qualitativeRisk": {"text": "none (no longer flagged)"}}],
        "note": [{"text": "No longer flagged by calcinosis-cds; tiers are not validated probabilities."}],
    }


# --------------------------------------------------------------------------- maintenance


def sweep(ctx: MonitorContext) -> dict[str, int]:
    """Re-enqueue what was accepted but not finished; detect silent subscriptions."""
    stale = timedelta(seconds=ctx.settings.sweeper_stale_after_s)
    counts = {"events": 0, "patients": 0, "silent_subscriptions": 0, "writebacks": 0, "writebacks_given_up": 0, "writebacks_rechecked": 0}
    with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
        repos = Repositories(session)
        for event in repos.ledger.stale_unhandled(stale, limit=500):
            jobs.add(TASK_PROCESS_EVENT, event.id)
            counts["events"] += 1
        for patient_ref in repos.queue.stale_dirty(stale, limit=500):
            jobs.add(TASK_EVALUATE, patient_ref)
            counts["patients"] += 1
        for state in repos.subscriptions.list_all():  # rows recorded before keys were normalised: one row per subscription
            key = subscription_key(state.subscription, ctx.settings.fhir_base_url)
            if key != state.subscription and repos.subscriptions.merge_into(state.subscription, key):
                log.info("subscription_rekeyed", subscription=key)
        for state in repos.subscriptions.stale_heartbeats(timedelta(seconds=ctx.settings.heartbeat_timeout_s)):
            if state.subscription == POLL_SUBSCRIPTION:
                continue
            bucket = int(_now().timestamp() // ctx.settings.heartbeat_timeout_s)
            event, created = repos.ledger.create_if_absent(dedup_key=f"{state.subscription}#silent#{bucket}", kind="recovery",
                                                           subscription=state.subscription, status=EventStatus.QUEUED)
            if created:
                jobs.add(TASK_PROCESS_EVENT, event.id)
                counts["silent_subscriptions"] += 1
                log.warning("subscription_silent", subscription=state.subscription)
        if ctx.settings.writeback_enabled:
            _sweep_writebacks(ctx, repos, jobs, counts)
            _recheck_written_flags(ctx, repos, jobs, counts)
    return counts


#: Most patients whose written flags one sweep has checked again.
RECHECK_BATCH = 100


def _recheck_written_flags(ctx: MonitorContext, repos: Repositories, jobs: Jobs, counts: dict[str, int]) -> None:
    """Send again the newest write-back of each patient whose written flags' basis was last read more than
    ``CDS_WRITEBACK_RECHECK_H`` ago: its run reads the basis again (:func:`_basis_changed`), so a result deleted
    since (which an R4 server never notifies) corrects the flag; an unchanged basis writes nothing."""
    hours = ctx.settings.writeback_recheck_h
    if not hours or not ctx.settings.writeback_confirm_basis or ctx.fhir_client is None:
        return
    now = _now()
    checked_before = now - timedelta(hours=hours)
    for patient_ref in repos.writebacks.due_for_recheck(checked_before, limit=RECHECK_BATCH):
        # Claimed first, whatever follows: a patient skipped here must not stay at the head of the list for good.
        if not repos.writebacks.claim_recheck(patient_ref, checked_before, now=now):
            continue  # another sweep took it
        latest = repos.evaluations.latest_summary_for(patient_ref)
        request = repos.writeback_requests.get(latest.id) if latest is not None else None
        if latest is None or (request is not None and request.status != WritebackStatus.WRITTEN):
            continue  # on its way (pending: it reads the basis anyway), or failed and listed for an operator
        _send_again(ctx, repos, jobs, latest.id, patient_ref)
        counts["writebacks_rechecked"] += 1


def _sweep_writebacks(ctx: MonitorContext, repos: Repositories, jobs: Jobs, counts: dict[str, int]) -> None:
    """Send again the write-backs left pending past their time (a lost message, a killed worker, retries that
    outlived the broker) and those failed on a transient error whose backoff is over; after
    ``CDS_WRITEBACK_SWEEPER_RETRIES`` sendings one stays failed, for an operator (``events replay``)."""
    now = _now()
    requests = repos.writeback_requests
    for request in requests.due(now, limit=500):
        # Each sending and giving-up is claimed by a conditional update: of two sweeps at once, one acts.
        if request.sweeps >= ctx.settings.writeback_sweeper_retries:
            last = request.last_error or "not written"
            if requests.give_up(request.evaluation_id, f"{last} (sweeper gave up after {request.sweeps} retries)", now=now):
                counts["writebacks_given_up"] += 1
                log.warning("writeback_given_up", evaluation_id=request.evaluation_id, sweeps=request.sweeps)
            continue
        if requests.swept(request.evaluation_id, next_sweep_at=now + writeback_sweep_delay(ctx.settings, request.sweeps + 1), now=now):
            jobs.add(TASK_WRITEBACK, request.evaluation_id)
            counts["writebacks"] += 1


def reconcile(ctx: MonitorContext) -> int | None:
    """Scheduled ``_lastUpdated`` search since the last watermark: polling mode, and the net under subscriptions."""
    if ctx.fhir_client is None:
        return None
    bucket = int(_now().timestamp() // max(ctx.settings.reconcile_interval_s, 1))
    with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
        event, created = Repositories(session).ledger.create_if_absent(
            dedup_key=f"poll:{bucket}", kind="poll", subscription=POLL_SUBSCRIPTION, status=EventStatus.QUEUED
        )
        if created:
            jobs.add(TASK_PROCESS_EVENT, event.id)
    return event.id if created else None


@dataclass
class ReplayResult:
    replayed: list[int]  # reset to queued (committed)
    not_failed: dict[int, str] = field(default_factory=dict)  # asked for, but not failed: id → status ("" = no such event)
    enqueue_error: str | None = None  # the broker refused: the replayed events wait, queued, for the sweeper


def replay_failed(ctx: MonitorContext, event_ids: list[int] | None) -> ReplayResult:
    """Put failed events back to queued, then (after commit) on the queue. An unreachable broker does not undo the
    reset: the events stay queued and the sweeper enqueues them once it can, so nothing is lost or hidden."""
    return _replay(ctx, event_ids, TASK_PROCESS_EVENT, lambda repos: repos.ledger, "events")


def replay_failed_writebacks(ctx: MonitorContext, evaluation_ids: list[int] | None) -> ReplayResult:
    """Put failed write-backs (by evaluation id; None: all) back to pending, then (after commit) on the queue. As
    for events, an unreachable broker does not undo it: they wait, pending, for the sweeper."""
    return _replay(ctx, evaluation_ids, TASK_WRITEBACK, lambda repos: repos.writeback_requests, "writebacks",
                   next_sweep_at=_now() + _writeback_lease(ctx))


def _replay(ctx: MonitorContext, ids: list[int] | None, task: str, store: Callable[[Repositories], Any], what: str,
            **reset: Any) -> ReplayResult:
    """Reset the failed rows of ``store`` (the ledger or the write-back requests: ``replay_failed`` and ``statuses``)
    named by ``ids`` (None: all), enqueue ``task`` for each after the commit, and say what the others are."""
    result = ReplayResult([])
    try:
        with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
            rows = store(Repositories(session))
            result.replayed = rows.replay_failed(ids, all_failed=ids is None, **reset)
            for row_id in result.replayed:
                jobs.add(task, row_id)
            if ids is not None:
                others = set(ids) - set(result.replayed)
                statuses = rows.statuses(others)
                result.not_failed = {i: statuses.get(i, "") for i in sorted(others)}
    except NotSent as exc:
        result.enqueue_error = type(exc.__cause__).__name__
        log.warning("replay_enqueue_failed", **{what: len(result.replayed)}, error=result.enqueue_error)
    return result


def backfill(ctx: MonitorContext, resources: Iterable[dict[str, Any]], batch: int = 500) -> dict[str, int]:
    """Load resources (search paging, Bulk $export or NDJSON) through the same ledger and state as notifications:
    per chunk of ``batch`` resources one transaction with one ledger INSERT, one upsert of the new resources
    and one mark per patient."""
    counts = {"resources": 0, "new": 0, "duplicates": 0}
    iterator: Iterator[dict[str, Any]] = iter(resources)
    while True:
        chunk = [r for _, r in zip(range(batch), iterator, strict=False)]
        if not chunk:
            break
        entries: list[LedgerEntry] = []
        accepted: list[dict[str, Any]] = []
        for resource in chunk:
            rtype, rid = resource.get("resourceType"), resource.get("id")
            if not isinstance(rtype, str) or not isinstance(rid, str) or rtype not in MONITORED_TYPES:
                continue
            counts["resources"] += 1
            changed = ResourceChanged(resource_type=rtype, id=rid, version_id=version_of(resource),
                                      last_updated=(resource.get("meta") or {}).get("lastUpdated"), resource=resource)
            entries.append(LedgerEntry(dedup_key(changed), "backfill", EventStatus.HANDLED, resource_type=rtype, resource_id=rid,
                                       version_id=changed.version_id, patient_ref=patient_of(resource)))
            accepted.append(resource)
        if not entries:
            continue
        with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
            repos = Repositories(session)
            results = repos.ledger.create_many_if_absent(entries)
            new = [resource for resource, result in zip(accepted, results, strict=True) if result.created]
            counts["new"] += len(new)
            counts["duplicates"] += len(results) - len(new)
            apply_resources(repos, jobs, new, ctx.settings)
    return counts
