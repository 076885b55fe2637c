"""The batch forms of the write path give exactly what the one-at-a-time methods give."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import EventStatus
from service.db.repositories import (
    EvaluationQueueRepository,
    EvaluationRepository,
    InboundEventRepository,
    LedgerEntry,
    PatientResourceRepository,
    ResourceVersion,
    Upserted,
)
from service.db.session import session_scope

P = "Patient/p1"


def _obs(rid: str, version: str | None) -> ResourceVersion:
    content = {"resourceType": "Observation", "id": rid, "meta": {"versionId": version}}
    return ResourceVersion("Observation", rid, P, content, version)


def test_create_many_matches_successive_creates(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        ledger = InboundEventRepository(session)
        existing, _ = ledger.create_if_absent(dedup_key="k0", kind="resource", status=EventStatus.QUEUED, now=t0)
        results = ledger.create_many_if_absent(
            [
                LedgerEntry("k1", "resource", EventStatus.HANDLED, resource_type="Observation", resource_id="o1", patient_ref=P),
                LedgerEntry("k0", "resource"),
                LedgerEntry("k2", "poll", payload={"a": 1}),
                LedgerEntry("k1", "resource"),
            ],
            now=t0,
        )
        assert [(r.created, r.status) for r in results] == [
            (True, "handled"),
            (False, "queued"),
            (True, "received"),
            (False, "handled"),
        ]
        assert results[1].id == existing.id
        assert results[3].id == results[0].id
        stored = ledger.get_by_dedup_key("k2")
        assert stored is not None and stored.payload == {"a": 1} and stored.received_at == t0 and stored.attempts == 0
        assert ledger.create_many_if_absent([]) == []
        with pytest.raises(ValueError):
            ledger.create_many_if_absent([LedgerEntry("x" * 513, "resource")])
        with pytest.raises(ValueError):
            ledger.create_many_if_absent([LedgerEntry("k9", "resource", status="bogus")])


def test_concurrent_create_many_creates_each_key_once(db_session_factory: sessionmaker[Session]) -> None:
    workers = 6
    barrier = threading.Barrier(workers)
    keys = [f"race-{i}" for i in range(20)]

    def attempt(n: int) -> list[bool]:
        barrier.wait()
        order = keys[n:] + keys[:n]
        with session_scope(db_session_factory) as session:
            results = InboundEventRepository(session).create_many_if_absent([LedgerEntry(k, "resource") for k in order])
            return [r.created for r in results]

    with ThreadPoolExecutor(workers) as pool:
        created = sum(sum(flags) for flags in pool.map(attempt, range(workers)))
    assert created == len(keys)


def test_upsert_many_equals_successive_upserts(db_session_factory: sessionmaker[Session]) -> None:
    batch = [_obs("a", "2"), _obs("a", "1"), _obs("b", "1"), _obs("a", "3"), _obs("b", "1"), _obs("c", None), _obs("c", None)]
    with session_scope(db_session_factory) as session:
        repo = PatientResourceRepository(session)
        assert repo.upsert(resource_type="Observation", resource_id="b", patient_ref=P, content={"v": 0}, version_id="0")
        assert repo.upsert_many(batch) == [True, False, True, True, False, True, True]
        assert repo.upsert_many([]) == []
    with session_scope(db_session_factory) as session:
        repo = PatientResourceRepository(session)
        a, b = repo.get("Observation", "a"), repo.get("Observation", "b")
        assert a is not None and a.version_id == "3" and a.version_num == 3 and not a.deleted
        assert b is not None and b.version_id == "1"
        assert repo.contents_for_patient(P) == [r.content for r in repo.list_for_patient(P)]
        repo.mark_deleted(resource_type="Observation", resource_id="c")
        assert [c["id"] for c in repo.contents_for_patient(P)] == ["a", "b"]


def test_upsert_many_tracked_names_the_patient_a_resource_left(db_session_factory: sessionmaker[Session]) -> None:
    """A newer version filed on another subject reports the patient the live stored version belonged to (that
    patient lost an input); an older or repeated version, a new resource, a same-patient update and a tombstone
    report none. Two versions in one batch: the second reports the first's patient."""
    p2, p3 = "Patient/p2", "Patient/p3"

    def version(rid: str, v: str, patient: str) -> ResourceVersion:
        return ResourceVersion("Observation", rid, patient, {"resourceType": "Observation", "id": rid}, v)

    with session_scope(db_session_factory) as session:
        repo = PatientResourceRepository(session)
        assert repo.upsert_many([version("m", "1", P), version("s", "1", P), version("t", "1", P), version("w", "1", P)]) == [True] * 4
        repo.mark_deleted(resource_type="Observation", resource_id="t")
    with session_scope(db_session_factory) as session:
        repo = PatientResourceRepository(session)
        batch = [
            version("m", "2", p2),  # moved
            version("s", "2", P),  # same patient
            version("t", "2", p2),  # over a tombstone: nothing of P's was live
            version("n", "1", p2),  # new
            version("w", "0", p2),  # older: not written
            version("w", "2", p2),  # moved ...
            version("w", "3", p3),  # ... and moved again in the same batch
        ]
        assert repo.upsert_many_tracked(batch) == [
            Upserted(True, P), Upserted(True, None), Upserted(True, None), Upserted(True, None),
            Upserted(False, None), Upserted(True, P), Upserted(True, p2),
        ]
        assert repo.upsert_many_tracked([version("m", "2", p2)]) == [Upserted(False, None)]
        assert repo.upsert_many_tracked([]) == []
    with session_scope(db_session_factory) as session:
        repo = PatientResourceRepository(session)
        assert [r.resource_id for r in repo.list_for_patient(P)] == ["s"]
        assert [r.resource_id for r in repo.list_for_patient(p3)] == ["w"]


def test_mark_dirty_many_counts_every_change(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    other = f"Patient/{uuid.uuid4().hex}"
    with session_scope(db_session_factory) as session:
        queue = EvaluationQueueRepository(session)
        assert queue.mark_dirty(P, now=t0)
        generation = queue.claim(P, now=t0)
        assert generation == 1
        assert queue.finish(P, generation, now=t0) is False  # clean again
        assert queue.mark_dirty_many({P: 3, other: 2, "Patient/none": 0}, now=t0 + timedelta(seconds=1)) == [P, other]
        assert queue.mark_dirty_many({P: 1, other: 1}) == []
        row, row2 = queue.get(P), queue.get(other)
        assert row is not None and row.generation == 5 and row.dirty_since == t0 + timedelta(seconds=1)
        assert row2 is not None and row2.generation == 3
        assert queue.get("Patient/none") is None


def test_queue_objects_in_the_session_see_the_changes(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        queue = EvaluationQueueRepository(session)
        queue.mark_dirty(P, now=t0)
        loaded = queue.get(P)
        assert loaded is not None and loaded.generation == 1
        queue.mark_dirty(P, now=t0)
        assert loaded.generation == 2
        generation = queue.claim(P, now=t0 + timedelta(seconds=1))
        assert loaded.last_started_at == t0 + timedelta(seconds=1)
        assert generation is not None and queue.finish(P, generation, now=t0 + timedelta(seconds=2)) is False
        assert loaded.dirty_since is None and loaded.last_finished_at == t0 + timedelta(seconds=2)


def test_evaluation_add_and_latest_summary(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    fields: dict[str, Any] = {
        "patient_ref": P,
        "inputs": [{"reference": "Observation/a", "version": "1"}],
        "rules_version": "r1",
        "mappings_version": "m1",
        "calciphylaxis_tier": "low",
        "metastatic_tier": "low",
        "renal_context": None,
        "assessment": {"cards": []},
    }
    with session_scope(db_session_factory) as session:
        repo = EvaluationRepository(session)
        assert repo.latest_summary_for(P) is None
        first = repo.add(evaluated_at=t0, inputs_hash="h1", **fields)
        second = repo.add(evaluated_at=t0 + timedelta(minutes=1), inputs_hash="h2", **fields)
        assert second != first
    with session_scope(db_session_factory) as session:
        repo = EvaluationRepository(session)
        summary = repo.latest_summary_for(P)
        latest = repo.latest_for(P)
        assert summary is not None and latest is not None
        assert summary == (latest.id, latest.evaluated_at, latest.inputs_hash, latest.rules_version, latest.mappings_version)
        assert summary.id == second and summary.evaluated_at == t0 + timedelta(minutes=1)
        stored = repo.get(first)
        assert stored is not None and stored.inputs == fields["inputs"] and stored.assessment == {"cards": []}


def test_no_mark_is_lost_while_evaluations_run(db_session_factory: sessionmaker[Session]) -> None:
    """Markers (one patient or several per call) and an evaluator race; every mark that finds a patient clean
    enqueues it, every finish that finds a newer mark re-enqueues: when the tasks are drained, all are clean."""
    run = uuid.uuid4().hex
    patients = [f"Patient/{run}-{i}" for i in range(4)]
    tasks: list[str] = []
    lock = threading.Lock()
    marking = threading.Event()
    marking.set()
    history: list[tuple[object, ...]] = []
    marks = dict.fromkeys(patients, 0)

    def mark(worker: int) -> None:
        for i in range(15):
            chosen = {p: 1 + (i % 2) for k, p in enumerate(patients) if (i + worker + k) % 3 != 0}
            with session_scope(db_session_factory) as session:
                became_dirty = EvaluationQueueRepository(session).mark_dirty_many(chosen)
            history.append(("mark", tuple(chosen), tuple(became_dirty)))
            with lock:  # enqueue after the commit, as unit_of_work does
                tasks.extend(became_dirty)
                for p, n in chosen.items():
                    marks[p] += n

    def evaluate() -> None:
        while True:
            with lock:
                patient = tasks.pop() if tasks else None
            if patient is None:
                if not marking.is_set():
                    with lock:
                        if not tasks:
                            return
                time.sleep(0.001)
                continue
            with session_scope(db_session_factory) as session:
                generation = EvaluationQueueRepository(session).claim(patient)
            history.append(("claim", patient, generation))
            if generation is None:
                continue
            with session_scope(db_session_factory) as session:
                rerun = EvaluationQueueRepository(session).finish(patient, generation)
            history.append(("finish", patient, generation, rerun))
            if rerun:
                with lock:
                    tasks.append(patient)

    evaluator = threading.Thread(target=evaluate, daemon=True)
    evaluator.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(mark, range(4)))
    finally:
        marking.clear()
        evaluator.join(60)
    assert not evaluator.is_alive()
    with session_scope(db_session_factory) as session:
        queue = EvaluationQueueRepository(session)
        for p in patients:
            row = queue.get(p)
            assert row is not None and row.generation == marks[p]
            assert row.dirty_since is None, [h for h in history if p in h or (h[0] == "mark" and p in h[1])][-10:]  # type: ignore[operator]
