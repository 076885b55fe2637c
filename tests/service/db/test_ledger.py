"""The inbound-event ledger: idempotent insert, atomic claim, sweeper and replay queries."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import EventStatus
from service.db.repositories import MAX_ERROR_LEN, InboundEventRepository
from service.db.session import session_scope


def _create(factory: sessionmaker[Session], key: str, **kw: object) -> tuple[int, bool]:
    with session_scope(factory) as session:
        event, created = InboundEventRepository(session).create_if_absent(dedup_key=key, kind="resource", **kw)  # type: ignore[arg-type]
        return event.id, created


def test_create_if_absent_stores_once(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    payload = {"resourceType": "Observation", "id": "o1", "meta": {"versionId": "3"}}
    with session_scope(db_session_factory) as session:
        ledger = InboundEventRepository(session)
        event, created = ledger.create_if_absent(
            dedup_key="sub/1#7",
            kind="resource",
            subscription="Subscription/1",
            event_number=7,
            resource_type="Observation",
            resource_id="o1",
            version_id="3",
            patient_ref="Patient/p1",
            payload=payload,
            now=t0,
        )
        assert created
        again, created_again = ledger.create_if_absent(dedup_key="sub/1#7", kind="resource", now=t0 + timedelta(1))
        assert not created_again
        assert again.id == event.id
    with session_scope(db_session_factory) as session:
        stored = InboundEventRepository(session).get(event.id)
        assert stored is not None
        assert stored.payload == payload
        assert stored.status == EventStatus.RECEIVED
        assert stored.attempts == 0
        assert stored.event_number == 7
        assert stored.patient_ref == "Patient/p1"
        assert stored.received_at == t0 == stored.updated_at
        assert stored.handled_at is None


def test_create_if_absent_validates(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        ledger = InboundEventRepository(session)
        with pytest.raises(ValueError):
            ledger.create_if_absent(dedup_key="x" * 513, kind="resource")
        with pytest.raises(ValueError):
            ledger.create_if_absent(dedup_key="", kind="resource")
        with pytest.raises(ValueError):
            ledger.create_if_absent(dedup_key="k", kind="resource", status="bogus")
        event, _ = ledger.create_if_absent(dedup_key="x" * 512, kind="poll", status="queued", payload=None)
        assert event.status == "queued"
        assert event.payload is None


def test_concurrent_create_if_absent_creates_exactly_one(db_session_factory: sessionmaker[Session]) -> None:
    workers = 6
    barrier = threading.Barrier(workers)

    def attempt(_: int) -> tuple[int, bool]:
        barrier.wait()
        return _create(db_session_factory, "same-key")

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(attempt, range(workers)))
    assert sum(created for _, created in results) == 1
    assert len({event_id for event_id, _ in results}) == 1


def test_create_if_absent_waits_for_an_uncommitted_duplicate(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as first:
        event, created = InboundEventRepository(first).create_if_absent(dedup_key="pending", kind="resource")
        assert created
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(_create, db_session_factory, "pending")
            time.sleep(0.3)
            assert not second.done()  # blocked by the first transaction (row lock / SQLite write lock)
            first.commit()
            assert second.result(timeout=30) == (event.id, False)


def test_claim_for_processing_moves_claimable_states_once(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    event_id, _ = _create(db_session_factory, "c1", now=t0)
    with session_scope(db_session_factory) as session:
        ledger = InboundEventRepository(session)
        assert ledger.claim_for_processing(event_id, now=t0 + timedelta(seconds=1))
        assert not ledger.claim_for_processing(event_id, now=t0 + timedelta(seconds=2))
        event = ledger.get(event_id)
        assert event is not None
        assert event.status == EventStatus.PROCESSING
        assert event.attempts == 1
        assert event.updated_at == t0 + timedelta(seconds=1)
        assert not ledger.claim_for_processing(999_999)


def test_a_stale_processing_event_can_be_reclaimed(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    event_id, _ = _create(db_session_factory, "killed-worker", now=t0)
    with session_scope(db_session_factory) as session:
        assert InboundEventRepository(session).claim_for_processing(event_id, now=t0)
    with session_scope(db_session_factory) as session:
        ledger = InboundEventRepository(session)
        later = t0 + timedelta(minutes=5)
        assert not ledger.claim_for_processing(event_id, stale_after=timedelta(minutes=10), now=later)
        much_later = t0 + timedelta(minutes=11)
        assert ledger.claim_for_processing(event_id, stale_after=timedelta(minutes=10), now=much_later)
        event = ledger.get(event_id)
        assert event is not None and event.attempts == 2


@pytest.mark.parametrize("status", ["handled", "ignored", "failed"])
def test_terminal_states_are_not_claimed(db_session_factory: sessionmaker[Session], status: str, t0: datetime) -> None:
    event_id, _ = _create(db_session_factory, f"terminal-{status}", now=t0)
    with session_scope(db_session_factory) as session:
        ledger = InboundEventRepository(session)
        ledger.mark_status(event_id, status, now=t0)
        assert not ledger.claim_for_processing(event_id, now=t0 + timedelta(days=1))
        assert ledger.claim_for_processing(event_id, allow_failed=True, now=t0) is (status == "failed")


def test_concurrent_claims_let_exactly_one_session_win(db_session_factory: sessionmaker[Session]) -> None:
    event_id, _ = _create(db_session_factory, "contended")
    workers = 6
    barrier = threading.Barrier(workers)

    def claim(_: int) -> bool:
        barrier.wait()
        with session_scope(db_session_factory) as session:
            return InboundEventRepository(session).claim_for_processing(event_id)

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(claim, range(workers)))
    assert results.count(True) == 1


def test_a_claim_blocked_by_an_uncommitted_claim_loses(db_session_factory: sessionmaker[Session]) -> None:
    event_id, _ = _create(db_session_factory, "blocked")

    def claim() -> bool:
        with session_scope(db_session_factory) as session:
            return InboundEventRepository(session).claim_for_processing(event_id)

    with session_scope(db_session_factory) as first:
        assert InboundEventRepository(first).claim_for_processing(event_id)
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(claim)
            time.sleep(0.3)
            assert not second.done()
            first.commit()
            assert second.result(timeout=30) is False


def test_mark_status_stamps_handled_and_truncates_errors(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    event_id, _ = _create(db_session_factory, "status", now=t0)
    with session_scope(db_session_factory) as session:
        ledger = InboundEventRepository(session)
        assert ledger.mark_status(event_id, "failed", "x" * (MAX_ERROR_LEN + 50), now=t0 + timedelta(seconds=1))
        event = ledger.get(event_id)
        assert event is not None
        assert event.status == "failed"
        assert event.last_error is not None and len(event.last_error) == MAX_ERROR_LEN
        assert event.handled_at is None
        assert ledger.mark_status(event_id, EventStatus.HANDLED, now=t0 + timedelta(seconds=2))
        event = ledger.get(event_id)
        assert event is not None
        assert event.handled_at == t0 + timedelta(seconds=2)
        assert ledger.mark_status(event_id, "failed", KeyError("Patient/secret-name"))
        event = ledger.get(event_id)
        assert event is not None and event.last_error == "KeyError"  # exception text (may hold PHI) not stored
        assert not ledger.mark_status(424242, "handled")
        with pytest.raises(ValueError):
            ledger.mark_status(event_id, "done")


def test_stale_unhandled_lists_old_unfinished_events(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    ids = {}
    for key, status in [("r", "received"), ("q", "queued"), ("p", "processing"), ("h", "handled"), ("f", "failed")]:
        ids[key], _ = _create(db_session_factory, key, status=status, now=t0)
    fresh, _ = _create(db_session_factory, "fresh", now=t0 + timedelta(minutes=10))
    with session_scope(db_session_factory) as session:
        ledger = InboundEventRepository(session)
        stale = ledger.stale_unhandled(t0 + timedelta(minutes=5))
        assert sorted(e.id for e in stale) == sorted([ids["r"], ids["q"], ids["p"]])
        relative = ledger.stale_unhandled(timedelta(minutes=5), now=t0 + timedelta(minutes=12))
        assert fresh not in {e.id for e in relative}
        assert sorted(e.id for e in relative) == sorted([ids["r"], ids["q"], ids["p"]])
        assert len(ledger.stale_unhandled(t0 + timedelta(minutes=5), limit=2)) == 2


def test_failed_events_are_listed_and_replayed(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    failed = [_create(db_session_factory, f"f{i}", now=t0)[0] for i in range(3)]
    handled, _ = _create(db_session_factory, "ok", now=t0)
    with session_scope(db_session_factory) as session:
        ledger = InboundEventRepository(session)
        for i, event_id in enumerate(failed):
            ledger.claim_for_processing(event_id, now=t0)
            ledger.mark_status(event_id, "failed", "TimeoutError", now=t0 + timedelta(seconds=i))
        ledger.mark_status(handled, "handled", now=t0)
    with session_scope(db_session_factory) as session:
        ledger = InboundEventRepository(session)
        assert [e.id for e in ledger.list_failed()] == list(reversed(failed))
        assert ledger.reset_for_replay([failed[0], handled]) == 1  # only failed events are replayed
        with pytest.raises(ValueError):
            ledger.reset_for_replay()
        assert ledger.reset_for_replay([]) == 0
        assert ledger.replay_failed(all_failed=True) == sorted(failed[1:])
        for event_id in failed:
            event = ledger.get(event_id)
            assert event is not None
            assert (event.status, event.attempts, event.last_error) == ("queued", 0, "TimeoutError")
        assert ledger.list_failed() == []
        assert ledger.claim_for_processing(failed[0])


def test_counts_by_status(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        assert InboundEventRepository(session).counts_by_status() == {s.value: 0 for s in EventStatus}
    for i in range(3):
        _create(db_session_factory, f"n{i}")
    _create(db_session_factory, "q", status="queued")
    with session_scope(db_session_factory) as session:
        counts = InboundEventRepository(session).counts_by_status()
    assert counts["received"] == 3
    assert counts["queued"] == 1
    assert sum(counts.values()) == 4
