"""A deletion notification names no version (HAPI's ``DELETE {endpoint}/{type}/{id}``, Medplum's header, a Bundle
``DELETE`` entry). The monitor applies it at once and asks the FHIR server: gone, the tombstone is recorded at the
deleted version, so a late update made BEFORE the deletion (a retried delivery) cannot revive the result, while a
re-creation (a newer version) still does; still there, its current version is applied; unreachable, the event stays
retryable and the tombstone applied on receipt stays."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import EventStatus
from service.db.repositories import Repositories
from service.db.session import session_scope
from service.fhir.errors import FhirTransientError
from service.fhir.notifications import ResourceChanged, ResourceDeleted
from service.queue import TASK_EVALUATE, MemoryQueue
from service.terminology.catalog import Catalog
from service.usecases import monitor
from service.usecases.monitor import MonitorContext
from tests.builders import CA, P, obs, patient
from tests.fakes.fhir_server import FakeFhirServer

PH = "ph1"


@pytest.fixture
def ctx(fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path) -> Iterator[MonitorContext]:
    settings = Settings(data_dir=tmp_path, fhir_base_url=fhir.base_url, fhir_max_retries=0)
    context = MonitorContext.from_settings(settings, catalog=catalog, sessions=db_session_factory, queue=MemoryQueue())
    yield context
    if context._client is not None:
        context._client.close()


def deliver(ctx: MonitorContext, resource: dict[str, Any]) -> None:
    """A full-resource notification of ``resource`` as the FHIR server stored it (versionId, lastUpdated)."""
    meta = resource["meta"]
    monitor.receive(ctx, [ResourceChanged(resource["resourceType"], resource["id"], meta["versionId"], meta["lastUpdated"], resource)], "r4-resource")


def delete(ctx: MonitorContext) -> int:
    summary = monitor.receive(ctx, [ResourceDeleted("Observation", PH)], "r4-resource")
    assert summary.accepted == 1
    return summary.events[0]


def state(ctx: MonitorContext) -> tuple[str | None, bool]:
    with session_scope(ctx.sessions) as session:
        row = Repositories(session).resources.get("Observation", PH)
        assert row is not None
        return row.version_id, bool(row.deleted)


def live_ids(ctx: MonitorContext) -> list[str]:
    with session_scope(ctx.sessions) as session:
        return [c["id"] for c in Repositories(session).resources.contents_for_patient("Patient/p1")]


@pytest.fixture
def history(fhir: FakeFhirServer, ctx: MonitorContext) -> dict[str, dict[str, Any]]:
    """p1 with a calcium and a phosphate (v1, delivered); phosphate v2 made, not yet delivered; then deleted (v3)."""
    for resource in (patient("p1"), obs(CA, 11.5, rid="ca1", days=0.5)):
        deliver(ctx, fhir.put(resource))
    v1 = fhir.put(obs(P, 5.0, rid=PH, days=0.5))
    deliver(ctx, v1)
    v2 = fhir.put(obs(P, 7.0, rid=PH, days=0.5))
    assert fhir.delete("Observation", PH)
    return {"v1": v1, "v2": v2}


def test_a_late_update_made_before_the_deletion_does_not_revive_it(
    fhir: FakeFhirServer, ctx: MonitorContext, history: dict[str, dict[str, Any]]
) -> None:
    assert monitor.process_event(ctx, delete(ctx)) == EventStatus.HANDLED
    assert state(ctx) == ("3", True)  # the version the server's history names for the deletion
    assert fhir.count(r"/fhir/Observation/ph1$", "GET") == 1

    deliver(ctx, history["v2"])  # HAPI's retry of v2's failed delivery, after the DELETE delivery

    assert state(ctx) == ("3", True)
    assert live_ids(ctx) == ["ca1", "p1"]
    deliver(ctx, fhir.put(obs(P, 4.0, rid=PH, days=0.1)))  # re-created after the deletion: v4
    assert state(ctx) == ("4", False)
    assert PH in live_ids(ctx)


def test_without_the_history_the_deletion_is_bounded_by_when_the_server_was_asked(
    fhir: FakeFhirServer, ctx: MonitorContext, history: dict[str, dict[str, Any]]
) -> None:
    fhir.fail_next(1, 404, path=r"/_history$")  # a server that keeps no history
    assert monitor.process_event(ctx, delete(ctx)) == EventStatus.HANDLED
    assert state(ctx) == (None, True)

    deliver(ctx, history["v2"])

    assert state(ctx) == (None, True)
    deliver(ctx, fhir.put(obs(P, 4.0, rid=PH, days=0.1)))  # updated after the deletion: a re-creation
    assert state(ctx) == ("4", False)


def test_the_deletion_applies_at_once_and_stays_retryable_while_the_server_is_unreachable(
    fhir: FakeFhirServer, ctx: MonitorContext, history: dict[str, dict[str, Any]]
) -> None:
    event_id = delete(ctx)
    fhir.fail_next(1, 503, path=r"/fhir/Observation/ph1$")
    with pytest.raises(FhirTransientError):
        monitor.process_event(ctx, event_id)
    assert state(ctx) == ("1", True)  # applied on receipt: the deleted result stops counting now
    assert isinstance(ctx.queue, MemoryQueue)
    assert "Patient/p1" in [args[0] for name, args, _ in ctx.queue.sent if name == TASK_EVALUATE]
    with session_scope(ctx.sessions) as session:  # what the task does before its retry
        Repositories(session).ledger.mark_status(event_id, EventStatus.QUEUED, error="retrying: FhirTransientError")

    deliver(ctx, history["v2"])  # meanwhile, the late update still gets in ...
    assert state(ctx) == ("2", False)
    assert monitor.process_event(ctx, event_id) == EventStatus.HANDLED  # ... until the retry confirms the deletion
    assert state(ctx) == ("3", True)
    assert live_ids(ctx) == ["ca1", "p1"]


def test_a_deletion_the_server_does_not_confirm_is_undone(fhir: FakeFhirServer, ctx: MonitorContext) -> None:
    deliver(ctx, fhir.put(patient("p1")))
    deliver(ctx, fhir.put(obs(P, 5.0, rid=PH, days=0.5)))
    assert monitor.process_event(ctx, delete(ctx)) == EventStatus.HANDLED  # the server still has v1
    assert state(ctx) == ("1", False)
    assert PH in live_ids(ctx)
