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

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.cds.cards import basis_hash
from service.cds.engine import evaluate_patient
from service.cds.fhirutil import last_updated_of, resource_ref, subject_reference, version_of
from service.cds.rules import REQUIRED_ANALYTES
from service.cds.thresholds import Thresholds
from service.config import Settings
from service.db.models import EventStatus
from service.db.repositories import Repositories
from service.fhir.client import FhirClient
from service.fhir.errors import FhirNotFound, FhirPermanentError
from service.fhir.notifications import (
    BackportNotification,
    EmptyPing,
    NotificationEvent,
    ResourceChanged,
    ResourceDeleted,
    dedup_key,
    parse_notification,
)
from service.logging import get_logger
from service.metrics import EVALUATIONS, NOTIFICATIONS, WRITEBACKS
from service.queue import TASK_EVALUATE, TASK_PROCESS_EVENT, TASK_WRITEBACK, Jobs, TaskQueue, unit_of_work
from service.terminology.catalog import Catalog

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

    def client(self) -> FhirClient:
        if self.fhir_client is None:
            raise PermanentEventError("no FHIR server configured (CDS_FHIR_BASE_URL)")
        return self.fhir_client()


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
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if not isinstance(rtype, str) or not isinstance(rid, str) or rtype not in MONITORED_TYPES:
        return False
    patient = patient_of(resource)
    changed = repos.resources.upsert(
        resource_type=rtype,
        resource_id=rid,
        patient_ref=patient or "",
        content=resource,
        version_id=version_of(resource),
        last_updated=last_updated_of(resource),
    )
    if changed and patient:
        mark_dirty(repos, jobs, patient, settings)
    return changed


def apply_deletion(repos: Repositories, jobs: Jobs, resource_type: str, resource_id: str, settings: Settings) -> bool:
    stored = repos.resources.get(resource_type, resource_id)
    patient = stored.patient_ref if stored is not None else None
    changed = repos.resources.mark_deleted(resource_type=resource_type, resource_id=resource_id, patient_ref=patient)
    if changed and patient:
        mark_dirty(repos, jobs, patient, settings)
    return changed


def mark_dirty(repos: Repositories, jobs: Jobs, patient_ref: str, settings: Settings) -> None:
    if repos.queue.mark_dirty(patient_ref):
        jobs.add(TASK_EVALUATE, patient_ref, countdown=settings.coalesce_window_s)


# --------------------------------------------------------------------------- receiving


def receive(ctx: MonitorContext, notifications: list[Any], form: str) -> ReceiveSummary:
    """Record every event in the ledger (one transaction), apply full resources, enqueue the rest after commit."""
    summary = ReceiveSummary()
    requeue: list[int] = []
    with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
        repos = Repositories(session)
        for n in notifications:
            if isinstance(n, ResourceChanged):
                _receive_resource(repos, jobs, n, summary, requeue, ctx.settings)
            elif isinstance(n, ResourceDeleted):
                _record(repos, jobs, summary, requeue, dedup_key=dedup_key(n), kind="deletion", resource_type=n.resource_type,
                        resource_id=n.id, subscription=n.subscription_id)
            elif isinstance(n, EmptyPing):
                bucket = int(_now().timestamp() // 5)  # pings within 5 s share one fetch
                _record(repos, jobs, summary, requeue, dedup_key=f"ping:{n.subscription_id or POLL_SUBSCRIPTION}:{bucket}",
                        kind="empty-ping", subscription=n.subscription_id or POLL_SUBSCRIPTION)
            elif isinstance(n, BackportNotification):
                _receive_backport(repos, jobs, n, summary, requeue, ctx.settings)
        for event_id in requeue:
            jobs.add(TASK_PROCESS_EVENT, event_id)
    NOTIFICATIONS.labels(form, "accepted").inc(summary.accepted)
    NOTIFICATIONS.labels(form, "duplicate").inc(summary.duplicates)
    return summary


def _record(repos: Repositories, jobs: Jobs, summary: ReceiveSummary, requeue: list[int], *, dedup_key: str, kind: str,
            status: str = EventStatus.QUEUED, **fields: Any) -> tuple[int, bool]:
    event, created = repos.ledger.create_if_absent(dedup_key=dedup_key, kind=kind, status=status, **fields)
    if created:
        summary.accepted += 1
        summary.events.append(event.id)
        if status == EventStatus.QUEUED:
            jobs.add(TASK_PROCESS_EVENT, event.id)
    else:
        summary.duplicates += 1
        # A redelivery of something still waiting (e.g. the broker was down when we first answered): send it again.
        if event.status in (EventStatus.QUEUED, EventStatus.RECEIVED):
            requeue.append(event.id)
    return event.id, created


def _receive_resource(repos: Repositories, jobs: Jobs, n: ResourceChanged, summary: ReceiveSummary, requeue: list[int],
                      settings: Settings, subscription: str | None = None) -> None:
    patient = patient_of(n.resource)
    _, created = _record(repos, jobs, summary, requeue, dedup_key=dedup_key(n), kind="resource", status=EventStatus.HANDLED,
                         subscription=subscription or n.subscription_id, resource_type=n.resource_type, resource_id=n.id,
                         version_id=n.version_id, patient_ref=patient)
    if created:
        apply_resource(repos, jobs, n.resource, settings)


def _receive_backport(repos: Repositories, jobs: Jobs, n: BackportNotification, summary: ReceiveSummary, requeue: list[int],
                      settings: Settings) -> None:
    sub = n.subscription
    repos.subscriptions.ensure(sub, topic=n.topic, status=n.status)
    repos.subscriptions.touch_heartbeat(sub)
    missing: list[int] = []
    if n.type in ("handshake", "heartbeat", "query-status"):
        if n.events_since_start is not None and n.type != "handshake":
            missing = repos.subscriptions.observe_events_since_start(sub, n.events_since_start)
    for ev in n.events:
        missing.extend(repos.subscriptions.observe_event_number(sub, ev.event_number))
        key = f"{sub}#{ev.event_number}"
        if ev.resource is not None:
            changed = ResourceChanged(
                resource_type=str(ev.resource.get("resourceType")),
                id=str(ev.resource.get("id")),
                version_id=version_of(ev.resource),
                last_updated=(ev.resource.get("meta") or {}).get("lastUpdated"),
                resource=ev.resource,
            )
            _, created = _record(repos, jobs, summary, requeue, dedup_key=key, kind="backport-event", status=EventStatus.HANDLED,
                                 subscription=sub, event_number=ev.event_number, resource_type=changed.resource_type,
                                 resource_id=changed.id, version_id=changed.version_id, patient_ref=patient_of(ev.resource))
            if created:
                apply_resource(repos, jobs, ev.resource, settings)
        else:
            _record(repos, jobs, summary, requeue, dedup_key=key, kind="backport-event", subscription=sub,
                    event_number=ev.event_number, resource_type=ev.focus_type, resource_id=ev.focus_id,
                    payload={"focus": ev.focus_reference} if ev.focus_reference else None)
    missing = sorted(set(missing) - {ev.event_number for ev in n.events})
    if missing:
        log.warning("event_gap", subscription=sub, missing=len(missing), first=missing[0], last=missing[-1])
        _record(repos, jobs, summary, requeue, dedup_key=f"{sub}#gap#{missing[0]}-{missing[-1]}", kind="recovery",
                subscription=sub, payload={"missing": [missing[0], missing[-1]]})


# --------------------------------------------------------------------------- worker: one ledger event


def process_event(ctx: MonitorContext, event_id: int) -> str:
    """Do the work of one queued ledger event. Returns its final status. Safe to run twice."""
    with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
        repos = Repositories(session)
        if not repos.ledger.claim_for_processing(event_id, stale_after=timedelta(seconds=ctx.settings.sweeper_stale_after_s)):
            event = repos.ledger.get(event_id)
            return event.status if event is not None else "missing"
    with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
        repos = Repositories(session)
        event = repos.ledger.get(event_id)
        if event is None:
            return "missing"
        if event.kind == "deletion":
            apply_deletion(repos, jobs, str(event.resource_type), str(event.resource_id), ctx.settings)
        elif event.kind == "backport-event" and event.resource_type and event.resource_id:
            _fetch_focus(ctx, repos, jobs, event.resource_type, event.resource_id)
        elif event.kind == "backport-event":  # an ``empty`` payload only says "event n happened": find out what
            number = event.event_number
            _recover_gap(ctx, repos, jobs, event.subscription or POLL_SUBSCRIPTION, [number, number] if number is not None else [])
        elif event.kind in ("empty-ping", "poll"):
            fetch_changes_since_watermark(ctx, repos, jobs, event.subscription or POLL_SUBSCRIPTION)
        elif event.kind == "recovery":
            _recover_gap(ctx, repos, jobs, event.subscription or POLL_SUBSCRIPTION, (event.payload or {}).get("missing") or [])
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


def _fetch_focus(ctx: MonitorContext, repos: Repositories, jobs: Jobs, rtype: str | None, rid: str | None) -> None:
    if not rtype or not rid:
        raise PermanentEventError("event has no usable focus reference")
    if rtype not in MONITORED_TYPES:
        return
    with ctx.client() as client:
        try:
            resource = client.read(rtype, rid)
        except FhirNotFound:
            apply_deletion(repos, jobs, rtype, rid, ctx.settings)
            return
        except FhirPermanentError as exc:
            raise PermanentEventError(str(exc)) from exc
    apply_resource(repos, jobs, resource, ctx.settings)


def _search_params(ctx: MonitorContext, rtype: str) -> list[tuple[str, str]]:
    if rtype != "Observation":
        return []
    codes = sorted({f"{s}|{c}" for a in REQUIRED_ANALYTES for s, c in ctx.catalog.codes_for_analyte(a)})
    return [("code", ",".join(codes))]


def fetch_changes_since_watermark(ctx: MonitorContext, repos: Repositories, jobs: Jobs, subscription: str) -> int:
    """``_lastUpdated`` search per monitored type since the subscription's watermark (R4 empty pings, polling, recovery)."""
    repos.subscriptions.ensure(subscription)
    watermark = repos.subscriptions.get_watermark(subscription) or (_now() - timedelta(hours=ctx.settings.poll_initial_lookback_h))
    newest = watermark
    count = 0
    with ctx.client() as client:
        for rtype in MONITORED_TYPES:
            for resource in client.history_since(rtype, watermark, _search_params(ctx, rtype)):
                apply_resource(repos, jobs, resource, ctx.settings)
                count += 1
                updated = last_updated_of(resource)
                if updated is not None and updated > newest:
                    newest = updated
    if newest > watermark:
        repos.subscriptions.set_watermark(subscription, newest)
    log.info("fetched_changes", subscription=subscription, resources=count)
    return count


def _recover_gap(ctx: MonitorContext, repos: Repositories, jobs: Jobs, subscription: str, span: list[int]) -> None:
    """Missing Backport events (or events sent with an ``empty`` payload): ask ``$events`` for them with their
    focus; if the server cannot, or does not name every focus, search ``_lastUpdated``."""
    sub_id = subscription.rstrip("/").split("/")[-1]
    if span and sub_id:
        try:
            with ctx.client() as client:
                bundle = client.operation(
                    "events", resource_type="Subscription", resource_id=sub_id,
                    params=[("eventsSinceNumber", str(span[0])), ("eventsUntilNumber", str(span[-1])), ("content", "id-only")],
                )
            from orjson import dumps

            unresolved = set(range(span[0], span[-1] + 1))
            for n in parse_notification(dumps(bundle)):
                if isinstance(n, BackportNotification):
                    for ev in n.events:
                        if ev.resource is None and not (ev.focus_type and ev.focus_id):
                            continue  # still no focus: left to the search below
                        _apply_event(ctx, repos, jobs, ev)
                        unresolved.discard(ev.event_number)
            if not unresolved:
                return
            log.info("events_operation_incomplete", subscription=subscription, unresolved=len(unresolved))
        except (FhirPermanentError, FhirNotFound, ValueError) as exc:
            log.info("events_operation_unavailable", subscription=subscription, error=type(exc).__name__)
    fetch_changes_since_watermark(ctx, repos, jobs, subscription)


def _apply_event(ctx: MonitorContext, repos: Repositories, jobs: Jobs, ev: NotificationEvent) -> None:
    repos.ledger.create_if_absent(dedup_key=f"{ev.subscription}#{ev.event_number}", kind="backport-event",
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
        rows = repos.resources.list_for_patient(patient_ref)
        resources = [r.content for r in rows if r.content is not None]
        evaluation = evaluate_patient(
            resources, patient_ref=patient_ref, catalog=ctx.catalog, thresholds=ctx.thresholds, now=now,
            topic_system=ctx.settings.topic_system,
        )
        a = evaluation.assessment
        latest = repos.evaluations.latest_for(patient_ref)
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
            row = repos.evaluations.record(
                patient_ref=patient_ref, evaluated_at=now, inputs_hash=a.inputs_hash, inputs=[dict(i) for i in a.inputs],
                rules_version=a.rules_version, mappings_version=a.mappings_version,
                calciphylaxis_tier=a.calciphylaxis.tier, metastatic_tier=a.metastatic_calcification.tier,
                renal_context=a.renal_context, assessment=document,
            )
            session.flush()
            evaluation_id = row.id
            EVALUATIONS.labels("monitor").inc()
            if ctx.settings.writeback_enabled:
                jobs.add(TASK_WRITEBACK, evaluation_id)
        if repos.queue.finish(patient_ref, generation):
            jobs.add(TASK_EVALUATE, patient_ref, countdown=ctx.settings.coalesce_window_s)
    return evaluation_id


# --------------------------------------------------------------------------- worker: write-back


FLAGS = ("calciphylaxis", "metastatic-calcification")


def write_back(ctx: MonitorContext, evaluation_id: int) -> dict[str, str]:
    """Write one RiskAssessment per flag, idempotent by identifier (conditional update), only when the tier or
    its basis changed; a flag that is no longer raised updates the earlier resource (status amended)."""
    with unit_of_work(ctx.sessions, ctx.queue) as (session, _):
        repos = Repositories(session)
        row = repos.evaluations.get(evaluation_id)
        if row is None:
            return {}
        latest = repos.evaluations.latest_for(row.patient_ref)
        if latest is not None and latest.id != row.id:
            return {"skipped": "superseded by a newer evaluation"}
        patient_ref = row.patient_ref
        planned = {_flag_of(r): r for r in row.assessment.get("risk_assessments", [])}
        previous = {flag: repos.writebacks.get(patient_ref, flag) for flag in FLAGS}
    results: dict[str, str] = {}
    with ctx.client() as client:
        for flag in FLAGS:
            resource = planned.get(flag)
            prior = previous[flag]
            if resource is None:
                if prior is None or prior.tier == "none":
                    continue
                resource = _retracted(prior, patient_ref, row.evaluated_at)
            bhash = basis_hash(resource)
            tier = _tier_of(resource)
            if prior is not None and prior.basis_hash == bhash and prior.tier == tier:
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
    counts = {"events": 0, "patients": 0, "silent_subscriptions": 0}
    with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
        repos = Repositories(session)
        for event in repos.ledger.stale_unhandled(stale, limit=500):
            jobs.add(TASK_PROCESS_EVENT, event.id)
            counts["events"] += 1
        for patient_ref in repos.queue.stale_dirty(stale, limit=500):
            jobs.add(TASK_EVALUATE, patient_ref)
            counts["patients"] += 1
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
    return counts


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


def replay_failed(ctx: MonitorContext, event_ids: list[int] | None) -> list[int]:
    with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
        ids = Repositories(session).ledger.replay_failed(event_ids, all_failed=event_ids is None)
        for event_id in ids:
            jobs.add(TASK_PROCESS_EVENT, event_id)
    return ids


def backfill(ctx: MonitorContext, resources: Iterable[dict[str, Any]], batch: int = 500) -> dict[str, int]:
    """Load resources (search paging, Bulk $export or NDJSON) through the same ledger and state as notifications."""
    counts = {"resources": 0, "new": 0, "duplicates": 0}
    iterator: Iterator[dict[str, Any]] = iter(resources)
    while True:
        chunk = [r for _, r in zip(range(batch), iterator, strict=False)]
        if not chunk:
            break
        with unit_of_work(ctx.sessions, ctx.queue) as (session, jobs):
            repos = Repositories(session)
            for resource in chunk:
                rtype, rid = resource.get("resourceType"), resource.get("id")
                if not isinstance(rtype, str) or not isinstance(rid, str) or rtype not in MONITORED_TYPES:
                    continue
                counts["resources"] += 1
                changed = ResourceChanged(resource_type=rtype, id=rid, version_id=version_of(resource),
                                          last_updated=(resource.get("meta") or {}).get("lastUpdated"), resource=resource)
                _, created = repos.ledger.create_if_absent(
                    dedup_key=dedup_key(changed), kind="backfill", status=EventStatus.HANDLED, resource_type=rtype,
                    resource_id=rid, version_id=changed.version_id, patient_ref=patient_of(resource),
                )
                if created:
                    counts["new"] += 1
                    apply_resource(repos, jobs, resource, ctx.settings)
                else:
                    counts["duplicates"] += 1
    return counts
