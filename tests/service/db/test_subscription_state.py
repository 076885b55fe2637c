"""Subscription bookkeeping: event-number gaps, heartbeats, the polling watermark."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from service.db.repositories import Repositories, SubscriptionStateRepository
from service.db.session import session_scope

SUB = "Subscription/s1"


def _observe(factory: sessionmaker[Session], n: int) -> list[int]:
    with session_scope(factory) as session:
        return list(SubscriptionStateRepository(session).observe_event_number(SUB, n))


def test_gap_detection(db_session_factory: sessionmaker[Session]) -> None:
    assert _observe(db_session_factory, 1) == []
    assert _observe(db_session_factory, 2) == []
    assert _observe(db_session_factory, 5) == [3, 4]
    assert _observe(db_session_factory, 3) == []  # late arrival: reported already
    assert _observe(db_session_factory, 5) == []  # repeated
    assert _observe(db_session_factory, 6) == []
    with session_scope(db_session_factory) as session:
        state = SubscriptionStateRepository(session).get(SUB)
        assert state is not None and state.last_event_number == 6 and state.last_notification_at is not None


def test_events_since_start_reports_unseen_events(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        repo = SubscriptionStateRepository(session)
        assert list(repo.observe_events_since_start(SUB, 0)) == []  # handshake: baseline
        assert list(repo.observe_event_number(SUB, 2)) == [1]
        assert list(repo.observe_events_since_start(SUB, 4)) == [3, 4]  # heartbeat: events 3 and 4 never arrived
        assert list(repo.observe_events_since_start(SUB, 4)) == []
        assert list(repo.observe_event_number(SUB, 4)) == []


def test_a_huge_gap_is_reported_whole(db_session_factory: sessionmaker[Session]) -> None:
    """A gap over 10,000 numbers is reported from its first to its last number (it used to be cut at 10,000 while
    the state moved past all of them, so the numbers after the cut were never recovered)."""
    assert _observe(db_session_factory, 1) == []
    with session_scope(db_session_factory) as session:
        missing = SubscriptionStateRepository(session).observe_event_number(SUB, 100_000)
    assert (missing[0], missing[-1], len(missing)) == (2, 99_999, 99_998)
    with session_scope(db_session_factory) as session:
        counted = SubscriptionStateRepository(session).observe_events_since_start(SUB, 250_000)
    assert (counted[0], counted[-1]) == (100_001, 250_000)


def test_concurrent_observations_report_each_gap_once(db_session_factory: sessionmaker[Session]) -> None:
    assert _observe(db_session_factory, 1) == []
    numbers = [10, 7, 12, 4]
    barrier = threading.Barrier(len(numbers))

    def observe(n: int) -> list[int]:
        barrier.wait()
        return _observe(db_session_factory, n)

    with ThreadPoolExecutor(len(numbers)) as pool:
        reported = [m for result in pool.map(observe, numbers) for m in result]
    assert len(reported) == len(set(reported))  # nothing reported twice
    # Never-seen numbers are each reported once; a seen number only if its gap was reported first.
    assert set(range(2, 12)) - {4, 7, 10} <= set(reported) <= set(range(2, 12))
    with session_scope(db_session_factory) as session:
        assert SubscriptionStateRepository(session).get(SUB).last_event_number == 12  # type: ignore[union-attr]


def test_heartbeats_and_staleness(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        repo = SubscriptionStateRepository(session)
        repo.ensure("Subscription/quiet", topic="http://example.org/topic", status="active", now=t0)
        repo.ensure("Subscription/beating", criteria="Observation?code=x", now=t0)
        repo.touch_heartbeat("Subscription/beating", now=t0 + timedelta(minutes=20))
        repo.ensure("Subscription/busy", now=t0)
        repo.observe_event_number("Subscription/busy", 1, now=t0 + timedelta(minutes=20))
        repo.ensure("Subscription/off", status="off", now=t0)
        repo.touch_heartbeat("Subscription/new", now=t0 + timedelta(minutes=25))
    with session_scope(db_session_factory) as session:
        repo = SubscriptionStateRepository(session)
        stale = repo.stale_heartbeats(timedelta(minutes=15), now=t0 + timedelta(minutes=30))
        assert [s.subscription for s in stale] == ["Subscription/quiet"]
        quiet = repo.get("Subscription/quiet")
        assert quiet is not None and quiet.topic == "http://example.org/topic" and quiet.status == "active"
        beating = repo.get("Subscription/beating")
        assert beating is not None and beating.last_heartbeat_at == t0 + timedelta(minutes=20)
        assert beating.criteria == "Observation?code=x"
        repo.set_status("Subscription/quiet", "error")
        assert repo.get("Subscription/quiet").status == "error"  # type: ignore[union-attr]
        assert len(repo.list_all()) == 5


def test_watermark_only_moves_forward(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        repo = SubscriptionStateRepository(session)
        assert repo.get_watermark(SUB) is None
        assert repo.set_watermark(SUB, t0)
        assert not repo.set_watermark(SUB, t0 - timedelta(minutes=1))
        assert not repo.set_watermark(SUB, t0)
        assert repo.set_watermark(SUB, t0 + timedelta(minutes=1))
        assert repo.get_watermark(SUB) == t0 + timedelta(minutes=1)


def test_type_watermarks_move_forward_each_on_its_own_and_the_subscription_mark_is_the_oldest(
    db_session_factory: sessionmaker[Session], t0: datetime
) -> None:
    with session_scope(db_session_factory) as session:
        repo = Repositories(session).subscriptions
        assert repo.type_watermarks(SUB) == {}
        repo.set_type_watermarks(SUB, {"Observation": t0, "Condition": t0 + timedelta(minutes=5)})
        repo.set_type_watermarks(SUB, {"Observation": t0 - timedelta(minutes=1), "Condition": t0 + timedelta(minutes=9)})
        assert repo.type_watermarks(SUB) == {"Observation": t0, "Condition": t0 + timedelta(minutes=9)}
        assert repo.get_watermark(SUB) == t0  # every type is fetched up to here
        assert repo.type_watermarks("Subscription/other") == {}


def test_a_types_history_mark_moves_forward_on_its_own(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        repo = Repositories(session).subscriptions
        repo.set_type_watermarks(SUB, {"Observation": t0})
        assert repo.history_watermarks(SUB) == {}
        repo.set_history_watermark(SUB, "Observation", t0 + timedelta(minutes=5))
        repo.set_history_watermark(SUB, "Observation", t0 + timedelta(minutes=1))  # never back
        repo.set_history_watermark(SUB, "Condition", t0 - timedelta(minutes=1))  # no row yet: one is made
        assert repo.history_watermarks(SUB) == {"Observation": t0 + timedelta(minutes=5), "Condition": t0 - timedelta(minutes=1)}
        assert repo.type_watermarks(SUB) == {"Observation": t0, "Condition": t0 - timedelta(minutes=1)}, "search marks untouched"
        repo.set_type_watermarks(SUB, {"Observation": t0 + timedelta(minutes=2)})
        assert repo.history_watermarks(SUB)["Observation"] == t0 + timedelta(minutes=5), "a search mark leaves it"


def test_a_row_under_another_form_of_the_reference_is_folded_into_the_key(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    legacy = "https://fhir.example.org/r4/Subscription/s1"
    with session_scope(db_session_factory) as session:
        repo = SubscriptionStateRepository(session)
        repo.ensure(legacy, topic="http://example.org/topic", status="active", now=t0 - timedelta(days=1))
        repo.observe_event_number(legacy, 7, now=t0)
        repo.set_type_watermarks(legacy, {"Observation": t0, "Condition": t0 - timedelta(minutes=5)})
        repo.set_history_watermark(legacy, "Observation", t0 + timedelta(minutes=3))
        repo.touch_heartbeat(SUB, now=t0 + timedelta(minutes=1))
        repo.set_type_watermarks(SUB, {"Observation": t0 - timedelta(minutes=9)})
    with session_scope(db_session_factory) as session:
        repo = SubscriptionStateRepository(session)
        assert repo.merge_into(legacy, SUB)
        assert not repo.merge_into(legacy, SUB)  # nothing left to fold
    with session_scope(db_session_factory) as session:
        repo = SubscriptionStateRepository(session)
        assert [s.subscription for s in repo.list_all()] == [SUB]
        state = repo.get(SUB)
        assert state is not None
        assert (state.last_event_number, state.topic, state.status) == (7, "http://example.org/topic", "active")
        assert state.last_heartbeat_at == t0 + timedelta(minutes=1) and state.last_notification_at == t0
        assert state.created_at == t0 - timedelta(days=1)
        assert repo.type_watermarks(SUB) == {"Observation": t0, "Condition": t0 - timedelta(minutes=5)}
        assert repo.type_watermarks(legacy) == {}
        assert repo.history_watermarks(SUB) == {"Observation": t0 + timedelta(minutes=3)}
