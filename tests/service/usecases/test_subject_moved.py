"""A result moved to another patient (its subject corrected in a newer version) is re-evaluated for BOTH patients:
the patient it left must not keep an assessment built on a result that is no longer theirs."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db.repositories import Repositories
from service.db.session import session_scope
from service.fhir.notifications import ResourceChanged
from service.queue import TASK_EVALUATE, MemoryQueue
from service.usecases.monitor import MonitorContext, evaluate_patient_state, receive
from tests.builders import CA, NOW, P, obs, patient
from tests.service.usecases.conftest import MakeMonitor


@pytest.fixture
def ctx(make_monitor: MakeMonitor) -> MonitorContext:
    return make_monitor(MemoryQueue())


def delivered(resource: dict[str, Any], version: str) -> ResourceChanged:
    resource = {**resource, "meta": {"versionId": version}}
    return ResourceChanged(resource["resourceType"], resource["id"], version, None, resource)


def evaluations_queued(ctx: MonitorContext) -> list[str]:
    assert isinstance(ctx.queue, MemoryQueue)
    return [args[0] for name, args, _ in ctx.queue.sent if name == TASK_EVALUATE]


def metastatic_tier(sessions: sessionmaker[Session], evaluation_id: int | None) -> str:
    assert evaluation_id is not None
    with session_scope(sessions) as session:
        row = Repositories(session).evaluations.get(evaluation_id)
        assert row is not None
        return str(row.metastatic_tier)


def test_a_result_moved_to_another_patient_re_evaluates_the_patient_it_left(ctx: MonitorContext) -> None:
    phosphate = obs(P, 7.0, rid="ph1", subject="Patient/p1", days=0.5)
    receive(ctx, [delivered(r, "1") for r in (patient("p1"), patient("p2"), obs(CA, 11.5, rid="ca1", days=0.5), phosphate)], "r4-resource")
    before = evaluate_patient_state(ctx, "Patient/p1", now=NOW)
    assert metastatic_tier(ctx.sessions, before) == "high"
    evaluate_patient_state(ctx, "Patient/p2", now=NOW)
    assert isinstance(ctx.queue, MemoryQueue)
    ctx.queue.sent.clear()

    receive(ctx, [delivered({**phosphate, "subject": {"reference": "Patient/p2"}}, "2")], "r4-resource")

    assert sorted(evaluations_queued(ctx)) == ["Patient/p1", "Patient/p2"]
    after = evaluate_patient_state(ctx, "Patient/p1", now=NOW)
    assert after is not None and after != before
    assert metastatic_tier(ctx.sessions, after) != "high"  # the phosphate no longer counts for p1
