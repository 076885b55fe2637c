"""Receiving: deletions keyed by the version deleted (delete → recreate → delete is two events), redeliveries,
and the FHIR client the monitor's tasks share."""

from __future__ import annotations

import pytest

from service.db.repositories import Repositories
from service.db.session import session_scope
from service.fhir.client import FhirClient
from service.fhir.notifications import ResourceDeleted
from service.queue import MemoryQueue
from service.usecases.monitor import MonitorContext, PermanentEventError, process_event, receive
from tests.builders import changed
from tests.service.usecases.conftest import MakeMonitor


@pytest.fixture
def ctx(make_monitor: MakeMonitor) -> MonitorContext:
    return make_monitor(MemoryQueue())


def deleted_state(ctx: MonitorContext) -> bool:
    with session_scope(ctx.sessions) as session:
        row = Repositories(session).resources.get("Observation", "o-del")
        assert row is not None
        return bool(row.deleted)


def test_delete_recreate_delete(ctx: MonitorContext) -> None:
    receive(ctx, [changed("o-del", version="1")], "r4-resource")
    first = receive(ctx, [ResourceDeleted("Observation", "o-del")], "r4-resource")
    assert first.accepted == 1
    process_event(ctx, first.events[0])
    assert deleted_state(ctx)
    receive(ctx, [changed("o-del", version="2")], "r4-resource")
    assert not deleted_state(ctx)
    second = receive(ctx, [ResourceDeleted("Observation", "o-del")], "r4-resource")
    assert second.accepted == 1 and second.duplicates == 0  # not mistaken for the first deletion
    process_event(ctx, second.events[0])
    assert deleted_state(ctx)


def test_redelivered_deletion_of_an_unknown_resource_is_a_duplicate(ctx: MonitorContext) -> None:
    """Processing the first deletion writes a tombstone; the redelivery must still map to the same event."""
    first = receive(ctx, [ResourceDeleted("Observation", "o-del")], "r4-resource")
    assert first.accepted == 1
    process_event(ctx, first.events[0])
    assert deleted_state(ctx)
    again = receive(ctx, [ResourceDeleted("Observation", "o-del")], "r4-resource")
    assert (again.accepted, again.duplicates) == (0, 1)


def test_redelivered_event_is_a_duplicate(ctx: MonitorContext) -> None:
    assert receive(ctx, [changed("o-del", version="1")], "r4-resource").accepted == 1
    again = receive(ctx, [changed("o-del", version="1")], "r4-resource")
    assert (again.accepted, again.duplicates) == (0, 1)


def test_tasks_share_one_fhir_client(ctx: MonitorContext) -> None:
    built: list[FhirClient] = []

    def factory() -> FhirClient:
        built.append(FhirClient("https://ehr.example.org/fhir"))
        return built[-1]

    with pytest.raises(PermanentEventError):
        ctx.shared_client()  # no FHIR server configured
    ctx.fhir_client = factory
    first = ctx.shared_client()
    try:
        second = ctx.shared_client()
        assert second is first and not second._http.is_closed and len(built) == 1  # one client, left open for the next task
    finally:
        first.close()
