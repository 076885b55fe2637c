"""The write-back register of each evaluation: pending until written, superseded by a newer evaluation, failed
(listed, replayable; the sweeper retries a transient failure when it is due)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from service.db.models import WritebackStatus
from service.db.repositories import WritebackRequestRepository
from service.db.session import session_scope

P = "Patient/p1"


def test_a_newer_evaluation_supersedes_the_open_write_backs_of_its_patient(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        repo = WritebackRequestRepository(session)
        repo.add(1, P, next_sweep_at=t0, now=t0)
        repo.add(2, P, next_sweep_at=t0, now=t0)
        repo.finish(2, WritebackStatus.FAILED, error="FhirTransientError: HTTP 503", transient=True, now=t0)
        repo.add(3, "Patient/other", next_sweep_at=t0, now=t0)
        repo.add(4, P, next_sweep_at=t0, now=t0)
        repo.add(4, P, next_sweep_at=t0 + timedelta(days=1), now=t0)  # twice: one row, as it was
        assert repo.statuses([1, 2, 3, 4, 5]) == {1: "superseded", 2: "superseded", 3: "pending", 4: "pending"}
        row = repo.get(4)
        assert row is not None and row.next_sweep_at == t0 and row.attempts == 0


def test_begin_counts_attempts_of_open_write_backs_only(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        repo = WritebackRequestRepository(session)
        repo.add(1, P, next_sweep_at=t0, now=t0)
        assert repo.begin(1, P, lease_until=t0 + timedelta(minutes=2), now=t0)
        assert repo.begin(9, P, lease_until=t0 + timedelta(minutes=2), now=t0), "an evaluation from before the register gets its row"
        row = repo.get(1)
        assert row is not None and row.attempts == 1 and row.next_sweep_at == t0 + timedelta(minutes=2)
        repo.finish(1, WritebackStatus.WRITTEN, results={"calciphylaxis": "written"}, now=t0)
        assert not repo.begin(1, P, lease_until=t0, now=t0), "written: nothing to do"
        row = repo.get(1)
        assert row is not None and row.attempts == 1 and row.results == {"calciphylaxis": "written"} and row.finished_at == t0


def test_due_are_late_pending_and_transient_failures(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    later = t0 + timedelta(minutes=5)
    with session_scope(db_session_factory) as session:
        repo = WritebackRequestRepository(session)
        for evaluation_id, patient in enumerate(["Patient/a", "Patient/b", "Patient/c", "Patient/d", "Patient/e"], start=1):
            repo.add(evaluation_id, patient, next_sweep_at=t0, now=t0)
        repo.finish(2, WritebackStatus.FAILED, error="FhirTransientError", transient=True, next_sweep_at=t0, now=t0)
        repo.finish(3, WritebackStatus.FAILED, error="FhirPermanentError: HTTP 422", now=t0)  # only an operator replays it
        repo.finish(4, WritebackStatus.WRITTEN, now=t0)
        repo.finish(5, WritebackStatus.PENDING, error="retrying: FhirTransientError", next_sweep_at=later + timedelta(seconds=1), now=t0)
        assert [r.evaluation_id for r in repo.due(later)] == [1, 2]
        repo.swept(1, next_sweep_at=later + timedelta(minutes=2), now=later)
        assert [r.evaluation_id for r in repo.due(later)] == [2]
        row = repo.get(1)
        assert row is not None and row.sweeps == 1


def test_failed_write_backs_are_listed_and_replayed(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        repo = WritebackRequestRepository(session)
        for evaluation_id, patient in enumerate(["Patient/a", "Patient/b", "Patient/c"], start=1):
            repo.add(evaluation_id, patient, next_sweep_at=t0, now=t0)
        repo.swept(1, next_sweep_at=t0, now=t0)
        repo.finish(1, WritebackStatus.FAILED, error="FhirTransientError", transient=True, now=t0)
        repo.finish(2, WritebackStatus.FAILED, error="FhirPermanentError: HTTP 422", now=t0 + timedelta(seconds=1))
        assert [r.evaluation_id for r in repo.list_failed()] == [2, 1]
        assert repo.counts_by_status() == {"pending": 1, "written": 0, "failed": 2, "superseded": 0}

        assert repo.replay_failed([1, 3], next_sweep_at=t0 + timedelta(minutes=2), now=t0) == [1]
        assert repo.replay_failed(all_failed=True, next_sweep_at=t0, now=t0) == [2]
        row = repo.get(1)
        assert row is not None and (row.status, row.sweeps, row.transient, row.last_error) == ("pending", 0, False, "FhirTransientError")
        assert repo.replay_failed([], next_sweep_at=t0) == []


def test_of_two_sweeps_that_read_the_same_due_write_back_only_one_sends_it(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    """Both sweeps read it as due before either wrote; the second one's claim finds it no longer due."""
    later = t0 + timedelta(minutes=5)
    with session_scope(db_session_factory) as session:
        WritebackRequestRepository(session).add(1, P, next_sweep_at=t0, now=t0)
        WritebackRequestRepository(session).add(2, "Patient/given-up", next_sweep_at=t0, now=t0)
    with session_scope(db_session_factory) as first, session_scope(db_session_factory) as second:
        a, b = WritebackRequestRepository(first), WritebackRequestRepository(second)
        assert [r.evaluation_id for r in a.due(later)] == [r.evaluation_id for r in b.due(later)] == [1, 2]
        assert a.swept(1, next_sweep_at=later + timedelta(minutes=2), now=later)
        assert a.give_up(2, "FhirTransientError (sweeper gave up after 10 retries)", now=later)
        first.commit()
        assert not b.swept(1, next_sweep_at=later + timedelta(minutes=2), now=later), "taken by the other sweep"
        assert not b.give_up(2, "FhirTransientError (sweeper gave up after 10 retries)", now=later)
    with session_scope(db_session_factory) as session:
        repo = WritebackRequestRepository(session)
        row = repo.get(1)
        assert row is not None and row.sweeps == 1
        assert repo.statuses([1, 2]) == {1: "pending", 2: "failed"}


def test_a_write_back_written_meanwhile_is_not_swept(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    later = t0 + timedelta(minutes=5)
    with session_scope(db_session_factory) as session:
        repo = WritebackRequestRepository(session)
        repo.add(1, P, next_sweep_at=t0, now=t0)
        assert [r.evaluation_id for r in repo.due(later)] == [1]
        repo.finish(1, WritebackStatus.WRITTEN, now=later)  # the late task ended between the sweep's read and its claim
        assert not repo.swept(1, next_sweep_at=later + timedelta(minutes=2), now=later)
        assert not repo.give_up(1, "not written", now=later)
        assert repo.statuses([1]) == {1: "written"}


def test_newest_pending_and_reopen(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        repo = WritebackRequestRepository(session)
        assert repo.newest_pending(P) is None
        repo.add(1, P, next_sweep_at=t0, now=t0)
        repo.add(5, "Patient/other", next_sweep_at=t0, now=t0)
        assert repo.newest_pending(P) == 1
        repo.finish(1, WritebackStatus.WRITTEN, results={"calciphylaxis": "written"}, now=t0)
        assert repo.newest_pending(P) is None
        repo.reopen(1, P, next_sweep_at=t0 + timedelta(minutes=2), now=t0)
        row = repo.get(1)
        assert row is not None and (row.status, row.finished_at, row.next_sweep_at) == ("pending", None, t0 + timedelta(minutes=2))
        assert repo.newest_pending(P) == 1
        repo.reopen(7, P, next_sweep_at=t0, now=t0)  # an evaluation from before the register gets its row
        assert repo.newest_pending(P) == 7
