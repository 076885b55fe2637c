"""Stored evaluations (audit and CDS Hooks reuse) and the write-back register."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.db.repositories import EvaluationRepository, WritebackRepository
from service.db.session import session_scope

P = "Patient/p1"


def _record(repo: EvaluationRepository, at: datetime, inputs_hash: str = "h1", **kw: Any) -> int:
    fields: dict[str, Any] = {
        "patient_ref": P,
        "evaluated_at": at,
        "inputs_hash": inputs_hash,
        "inputs": [{"reference": "Observation/o1", "version": "2"}, {"reference": "Patient/p1", "version": None}],
        "rules_version": "r1",
        "mappings_version": "m1",
        "calciphylaxis_tier": "moderate",
        "metastatic_tier": "none",
        "renal_context": "R2",
        "assessment": {"patient": P, "calciphylaxis": {"tier": "moderate"}, "cards": []},
    }
    fields.update(kw)
    return repo.add(**fields)


def test_record_and_latest(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        repo = EvaluationRepository(session)
        assert repo.latest_for(P) is None
        assert repo.count_for(P) == 0
        first = _record(repo, t0)
        second = _record(repo, t0 + timedelta(minutes=1), inputs_hash="h2", calciphylaxis_tier="high")
        _record(repo, t0 + timedelta(minutes=2), patient_ref="Patient/other")
    with session_scope(db_session_factory) as session:
        repo = EvaluationRepository(session)
        latest = repo.latest_for(P)
        assert latest is not None and latest.id == second
        assert latest.calciphylaxis_tier == "high"
        assert latest.inputs[1] == {"reference": "Patient/p1", "version": None}
        assert latest.assessment["calciphylaxis"] == {"tier": "moderate"}
        assert latest.evaluated_at == t0 + timedelta(minutes=1)
        assert repo.count_for(P) == 2
        assert [e.id for e in repo.list_for(P)] == [second, first]
        assert repo.get(first) is not None


def test_find_fresh_matches_inputs_rules_mappings_and_age(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        repo = EvaluationRepository(session)
        older = _record(repo, t0)
        newer = _record(repo, t0 + timedelta(minutes=30))
        _record(repo, t0 + timedelta(minutes=40), rules_version="r2")
        found = repo.find_fresh(P, "h1", "r1", "m1", newer_than=t0 - timedelta(hours=1))
        assert found is not None and found.id == newer
        found = repo.find_fresh(P, "h1", "r1", "m1", newer_than=t0)
        assert found is not None and found.id == newer
        assert repo.find_fresh(P, "h1", "r1", "m1", newer_than=t0 + timedelta(hours=1)) is None
        assert repo.find_fresh(P, "other-hash", "r1", "m1", newer_than=t0 - timedelta(hours=1)) is None
        assert repo.find_fresh(P, "h1", "r1", "m2", newer_than=t0 - timedelta(hours=1)) is None
        assert repo.find_fresh("Patient/x", "h1", "r1", "m1", newer_than=t0 - timedelta(hours=1)) is None
        assert older != newer


def test_writeback_upsert_and_get(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        repo = WritebackRepository(session)
        assert repo.get(P, "calciphylaxis") is None
        written = repo.upsert(
            patient_ref=P,
            flag="calciphylaxis",
            identifier_system="urn:cds",
            identifier_value="p1-calciphylaxis",
            basis_hash="b1",
            tier="moderate",
            fhir_id="ra-1",
            fhir_version="1",
            written_at=t0,
        )
        assert (written.basis_hash, written.fhir_version, written.written_at) == ("b1", "1", t0)
    with session_scope(db_session_factory) as session:
        repo = WritebackRepository(session)
        updated = repo.upsert(
            patient_ref=P,
            flag="calciphylaxis",
            identifier_system="urn:cds",
            identifier_value="p1-calciphylaxis",
            basis_hash="b2",
            tier="high",
            fhir_id="ra-1",
            fhir_version="2",
            written_at=t0 + timedelta(hours=1),
        )
        assert updated.id == written.id
        assert (updated.basis_hash, updated.tier, updated.fhir_version) == ("b2", "high", "2")
        repo.upsert(
            patient_ref=P,
            flag="metastatic",
            identifier_system="urn:cds",
            identifier_value="p1-metastatic",
            basis_hash="b3",
            tier="low",
        )
    with session_scope(db_session_factory) as session:
        repo = WritebackRepository(session)
        stored = repo.get(P, "calciphylaxis")
        assert stored is not None and stored.tier == "high" and stored.written_at == t0 + timedelta(hours=1)
        other = repo.get(P, "metastatic")
        assert other is not None and other.fhir_id is None
