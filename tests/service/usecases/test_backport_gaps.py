"""Backport event-number gaps are recovered whole, over real HTTP against the fake FHIR server: a gap longer than
one ``$events`` call asks for is also searched by ``_lastUpdated``; every notification's
``eventsSinceSubscriptionStart`` counts (the handshake's is the baseline)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import EventStatus, InboundEvent, SubscriptionState
from service.db.repositories import Repositories
from service.db.session import session_scope
from service.fhir.notifications import parse_notification
from service.queue import MemoryQueue
from service.terminology.catalog import Catalog
from service.usecases import monitor
from service.usecases.monitor import MonitorContext
from tests.builders import CA, P, obs, patient
from tests.fakes.fhir_server import FakeFhirServer
from tests.fakes.notifications import EventSpec, make_notification_bundle
from tests.service.usecases.support import drain

SUB_ID = "calc"


def context(fhir: FakeFhirServer, sessions: sessionmaker[Session], catalog: Catalog, tmp_path: Path) -> MonitorContext:
    settings = Settings(data_dir=tmp_path, fhir_base_url=fhir.base_url, fhir_max_retries=0, fhir_timeout_s=60)
    return MonitorContext.from_settings(settings, catalog=catalog, sessions=sessions, queue=MemoryQueue())


def receive(ctx: MonitorContext, bundle: dict[str, Any]) -> monitor.ReceiveSummary:
    return monitor.receive(ctx, parse_notification(json.dumps(bundle).encode(), {}), "backport")


def stored(ctx: MonitorContext) -> set[str]:
    with session_scope(ctx.sessions) as session:
        return {f"{r.resource_type}/{r.resource_id}" for r in Repositories(session).resources.list_for_patient("Patient/p1")}


def recoveries(ctx: MonitorContext) -> list[tuple[str, Any]]:
    with session_scope(ctx.sessions) as session:
        rows = session.scalars(select(InboundEvent).where(InboundEvent.kind == "recovery").order_by(InboundEvent.id))
        return [(r.dedup_key, r.payload) for r in rows]


def test_a_gap_longer_than_one_events_call_is_searched_too(
    db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path, fhir: FakeFhirServer
) -> None:
    """Events 2..10,003 are not delivered; 10,004 is. ``$events`` is asked for the first 10,000 of them (it names
    them all); the calcium and phosphate of events 10,002 and 10,003 come from the ``_lastUpdated`` search."""
    ctx = context(fhir, db_session_factory, catalog, tmp_path)
    fhir.add_subscription(SUB_ID, content="id-only")
    fhir.record_event(SUB_ID, fhir.put(patient()))  # 1
    assert receive(ctx, fhir.notification_bundle(SUB_ID, [1])).accepted == 1
    assert all(status == EventStatus.HANDLED for _, status in drain(ctx))
    for _ in range(10_000):  # 2 .. 10,001: other events (the fake records them without a resource)
        fhir.record_event(SUB_ID, "Encounter/e1")
    fhir.record_event(SUB_ID, fhir.put(obs(CA, 11.5, rid="ca1", subject="Patient/p1")))  # 10,002
    fhir.record_event(SUB_ID, fhir.put(obs(P, 7.0, rid="ph1", subject="Patient/p1")))  # 10,003
    last = fhir.record_event(SUB_ID, "Encounter/e1")  # 10,004, delivered
    fhir.clear_requests()

    assert receive(ctx, fhir.notification_bundle(SUB_ID, [last])).accepted == 2  # the event and its gap

    assert recoveries(ctx) == [(f"Subscription/{SUB_ID}#gap#2-10003", {"missing": [2, 10_003]})]
    assert all(status == EventStatus.HANDLED for _, status in drain(ctx))
    asked = [(r.query.get("eventsSinceNumber"), r.query.get("eventsUntilNumber")) for r in fhir.requests if "$events" in r.path]
    assert asked == [(["2"], ["10001"])]
    assert any("_lastUpdated" in r.query for r in fhir.requests)
    assert {"Observation/ca1", "Observation/ph1"} <= stored(ctx)


def test_events_missed_before_the_first_delivered_one_are_recovered_from_the_handshake_baseline(
    db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path, fhir: FakeFhirServer
) -> None:
    """The handshake says 0 events so far; events 1 and 2 never arrive; event 3 does: 1-2 are a gap (the first
    number seen used to be the baseline), recovered through ``$events``; the heartbeat saying 3 adds nothing."""
    ctx = context(fhir, db_session_factory, catalog, tmp_path)
    fhir.add_subscription(SUB_ID, content="full-resource")
    sub = f"{fhir.base_url}/Subscription/{SUB_ID}"
    handshake = make_notification_bundle(subscription=sub, type="handshake", status="requested", events_since_start=0, content="full-resource")
    assert receive(ctx, handshake).accepted == 0
    for resource in (patient(), obs(CA, 11.5, rid="ca1", subject="Patient/p1"), obs(P, 7.0, rid="ph1", subject="Patient/p1")):
        fhir.record_event(SUB_ID, fhir.put(resource))  # events 1, 2, 3

    assert receive(ctx, fhir.notification_bundle(SUB_ID, [3], content="full-resource")).accepted == 2  # event 3 and the gap
    assert [payload for _, payload in recoveries(ctx)] == [{"missing": [1, 2]}]
    heartbeat = make_notification_bundle(subscription=sub, type="heartbeat", events_since_start=3, content="full-resource")
    assert receive(ctx, heartbeat).accepted == 0

    assert all(status == EventStatus.HANDLED for _, status in drain(ctx))
    assert fhir.count(path=r"\$events") == 1
    assert stored(ctx) == {"Patient/p1", "Observation/ca1", "Observation/ph1"}


def test_a_notification_with_only_a_count_reports_the_events_it_did_not_list(
    db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path, fhir: FakeFhirServer
) -> None:
    """After event 1, an event-notification naming no event but ``eventsSinceSubscriptionStart`` 5: events 2-5
    are a gap (it used to be answered ``accepted: 0`` and the count ignored)."""
    ctx = context(fhir, db_session_factory, catalog, tmp_path)
    sub = f"{fhir.base_url}/Subscription/{SUB_ID}"
    assert receive(ctx, make_notification_bundle(subscription=sub, events=[EventSpec(1)], content="empty")).accepted == 1
    count_only = make_notification_bundle(subscription=sub, events=[], events_since_start=5, content="empty")
    assert receive(ctx, count_only).accepted == 1
    assert [payload for _, payload in recoveries(ctx)] == [{"missing": [2, 5]}]
    assert receive(ctx, count_only).accepted == 0  # the same count again: nothing new


def test_notifications_and_sweeper_use_one_key_and_fold_rows_recorded_under_the_absolute_url(
    db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path, fhir: FakeFhirServer
) -> None:
    """A notification naming its subscription by the absolute URL under ``CDS_FHIR_BASE_URL`` is recorded under
    ``Subscription/{id}`` (state, ledger keys); a row recorded under the URL before (event 7 seen) is folded into
    that key, so event 9 reports 8 as a gap; the sweeper folds such rows too instead of reporting them silent."""
    ctx = context(fhir, db_session_factory, catalog, tmp_path)
    absolute, key = f"{fhir.base_url}/Subscription/{SUB_ID}", f"Subscription/{SUB_ID}"
    other = f"{fhir.base_url}/Subscription/other"
    with session_scope(ctx.sessions) as session:
        repo = Repositories(session).subscriptions
        repo.observe_event_number(absolute, 7)
        repo.observe_event_number(other, 3)

    summary = receive(ctx, make_notification_bundle(subscription=absolute, events=[EventSpec(9)], content="empty"))

    assert summary.accepted == 2  # event 9 and the gap of event 8
    with session_scope(ctx.sessions) as session:
        keys = {e.dedup_key for e in session.scalars(select(InboundEvent))}
        assert keys == {f"{key}#9", f"{key}#gap#8-8"}
        repo = Repositories(session).subscriptions
        assert [s.subscription for s in repo.list_all()] == [key, other]
        state = repo.get(key)
        assert state is not None and state.last_event_number == 9
        day_ago = datetime.now(UTC) - timedelta(days=1)
        session.execute(update(SubscriptionState).values(created_at=day_ago, last_notification_at=day_ago))
        session.execute(update(SubscriptionState).where(SubscriptionState.subscription == key).values(last_notification_at=datetime.now(UTC)))

    counts = monitor.sweep(ctx)

    assert counts["silent_subscriptions"] == 1  # the other subscription, under its key: it has been silent for a day
    with session_scope(ctx.sessions) as session:
        assert [s.subscription for s in Repositories(session).subscriptions.list_all()] == [key, "Subscription/other"]
        silent = [e.dedup_key for e in session.scalars(select(InboundEvent).where(InboundEvent.kind == "recovery"))]
        assert [k.split("#silent#")[0] for k in silent if "#silent#" in k] == ["Subscription/other"]
