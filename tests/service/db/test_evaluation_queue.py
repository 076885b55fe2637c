"""Coalescing of evaluations: one enqueue per dirty period, re-run when marked during an evaluation."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from service.db.repositories import EvaluationQueueRepository
from service.db.session import session_scope

P = "Patient/p1"


def test_mark_dirty_returns_true_once_while_dirty(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        queue = EvaluationQueueRepository(session)
        assert queue.mark_dirty(P, now=t0) is True
        assert queue.mark_dirty(P, now=t0 + timedelta(seconds=1)) is False
        assert queue.mark_dirty(P, now=t0 + timedelta(seconds=2)) is False
        row = queue.get(P)
        assert row is not None
        assert row.generation == 3
        assert row.dirty_since == t0
        assert row.requested_at == t0 + timedelta(seconds=2)


def test_claim_and_finish_clear_dirty(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        queue = EvaluationQueueRepository(session)
        assert queue.claim(P) is None  # unknown patient
        queue.mark_dirty(P, now=t0)
        generation = queue.claim(P, now=t0 + timedelta(seconds=1))
        assert generation == 1
        assert queue.finish(P, generation, now=t0 + timedelta(seconds=2)) is False
        row = queue.get(P)
        assert row is not None
        assert row.dirty_since is None
        assert row.last_started_at == t0 + timedelta(seconds=1)
        assert row.last_finished_at == t0 + timedelta(seconds=2)
        assert queue.claim(P) is None  # nothing left to do (a duplicate task)
        assert queue.mark_dirty(P, now=t0 + timedelta(seconds=3)) is True  # clean again: enqueue
        assert queue.get(P).generation == 2  # type: ignore[union-attr]


def test_a_mark_during_evaluation_requires_a_rerun(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        queue = EvaluationQueueRepository(session)
        queue.mark_dirty(P)
        generation = queue.claim(P)
        assert generation is not None
        assert queue.mark_dirty(P) is False  # already scheduled: the running evaluation will re-run
        assert queue.finish(P, generation) is True  # outdated generation: run again
        row = queue.get(P)
        assert row is not None and row.dirty_since is not None
        second = queue.claim(P)
        assert second == generation + 1
        assert queue.finish(P, second) is False
        assert queue.get(P).dirty_since is None  # type: ignore[union-attr]


def test_an_outdated_finish_after_a_newer_one_reports_nothing(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        queue = EvaluationQueueRepository(session)
        queue.mark_dirty(P)
        first = queue.claim(P)
        queue.mark_dirty(P)
        second = queue.claim(P)  # a duplicate task (e.g. re-enqueued by the sweeper) covered the new mark
        assert first is not None and second is not None and second > first
        assert queue.finish(P, second) is False
        assert queue.finish(P, first) is False  # already clean: no re-run needed


def test_concurrent_marks_enqueue_once(db_session_factory: sessionmaker[Session]) -> None:
    workers = 6
    barrier = threading.Barrier(workers)

    def mark(_: int) -> bool:
        barrier.wait()
        with session_scope(db_session_factory) as session:
            return EvaluationQueueRepository(session).mark_dirty(P)

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(mark, range(workers)))
    assert results.count(True) == 1
    with session_scope(db_session_factory) as session:
        assert EvaluationQueueRepository(session).get(P).generation == workers  # type: ignore[union-attr]


def test_stale_dirty_finds_lost_or_killed_evaluations(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        queue = EvaluationQueueRepository(session)
        queue.mark_dirty("Patient/never-started", now=t0)
        queue.mark_dirty("Patient/killed", now=t0)
        queue.claim("Patient/killed", now=t0 + timedelta(seconds=5))
        queue.mark_dirty("Patient/running", now=t0)
        queue.claim("Patient/running", now=t0 + timedelta(minutes=9))
        queue.mark_dirty("Patient/recent", now=t0 + timedelta(minutes=9))
        queue.mark_dirty("Patient/done", now=t0)
        queue.finish("Patient/done", queue.claim("Patient/done", now=t0) or 0, now=t0)
    with session_scope(db_session_factory) as session:
        queue = EvaluationQueueRepository(session)
        assert queue.stale_dirty(timedelta(minutes=5), now=t0 + timedelta(minutes=10)) == [
            "Patient/killed",
            "Patient/never-started",
        ]
        assert len(queue.stale_dirty(t0 + timedelta(minutes=5), limit=1)) == 1
