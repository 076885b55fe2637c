"""The ``_lastUpdated`` catch-up search (R4 empty pings, polling, gap and silent-subscription recovery) skips
nothing: a search cut at ``CDS_FHIR_MAX_PAGES`` keeps the watermark where every type was completely fetched and
queues another round; the cut is logged (type, subscription) and counted; ``_count`` is sent."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import EventStatus
from service.db.repositories import Repositories
from service.db.session import session_scope
from service.fhir.notifications import EmptyPing
from service.queue import TASK_PROCESS_EVENT, MemoryQueue
from service.terminology.catalog import Catalog
from service.usecases import monitor
from service.usecases.monitor import MonitorContext
from tests.builders import P, condition, obs, patient
from tests.fakes.fhir_server import FakeFhirServer

SUB = "Subscription/s1"
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)  # within the first search's look-back


@pytest.fixture
def fhir() -> Iterator[FakeFhirServer]:
    with FakeFhirServer(default_page_size=20) as srv:  # HAPI's page size without _count
        yield srv
        assert not srv.errors, srv.errors


def context(fhir: FakeFhirServer, sessions: sessionmaker[Session], catalog: Catalog, tmp_path: Path, **settings: Any) -> MonitorContext:
    values: dict[str, Any] = {"data_dir": tmp_path, "fhir_base_url": fhir.base_url, "fhir_max_pages": 2, "fhir_search_count": 10, "fhir_max_retries": 0}
    values.update(settings)
    return MonitorContext.from_settings(Settings(**values), catalog=catalog, sessions=sessions, queue=MemoryQueue())


def phosphate(i: int) -> dict[str, Any]:
    return obs(P, 4.0, rid=f"o{i:03d}", subject="Patient/p1", when=(T0 - timedelta(hours=i)).isoformat().replace("+00:00", "Z"))


def a_condition() -> dict[str, Any]:
    return condition("44054006", rid="c1", subject="Patient/p1")


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def drain(ctx: MonitorContext) -> list[tuple[int, str]]:
    """Run every queued ledger event (and the ones they queue) as a worker would; returns (event id, status)."""
    queue = ctx.queue
    assert isinstance(queue, MemoryQueue)
    done: list[tuple[int, str]] = []
    while True:
        pending = [args[0] for name, args, _ in queue.sent if name == TASK_PROCESS_EVENT and args[0] not in {e for e, _ in done}]
        if not pending:
            return done
        for event_id in pending:
            try:
                status = monitor.process_event(ctx, event_id)
            except monitor.PermanentEventError as exc:
                monitor.mark_failed(ctx, event_id, exc)
                status = EventStatus.FAILED
            done.append((event_id, status))


def stored(ctx: MonitorContext, rtype: str) -> set[str]:
    with session_scope(ctx.sessions) as session:
        return {r.resource_id for r in Repositories(session).resources.list_for_patient("Patient/p1", resource_types=[rtype])}


def watermark(ctx: MonitorContext, subscription: str) -> datetime | None:
    with session_scope(ctx.sessions) as session:
        return Repositories(session).subscriptions.get_watermark(subscription)


def truncations(rtype: str) -> float:
    return REGISTRY.get_sample_value("fhir_catch_up_truncated_total", {"resource_type": rtype}) or 0.0


def test_a_cut_search_keeps_the_watermark_and_fetches_the_rest_in_another_round(
    fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reviewer's drill: more Observations than pages x page size, then a newer Condition. The Condition must
    not move the watermark past Observations never fetched."""
    fhir.put(patient("p1"), last_updated=at(0))
    for i in range(45):
        fhir.put(phosphate(i), last_updated=at(1 + i))
    fhir.put(a_condition(), last_updated=at(100))
    ctx = context(fhir, db_session_factory, catalog, tmp_path)
    before = truncations("Observation")

    first = monitor.receive(ctx, [EmptyPing(SUB)], "r4-empty")
    assert first.accepted == 1
    assert monitor.process_event(ctx, first.events[0]) == EventStatus.HANDLED
    # One round: 2 pages of 10 Observations. The watermark stays below the first Observation not fetched.
    assert len(stored(ctx, "Observation")) == 20
    mark = watermark(ctx, SUB)
    assert mark is not None and mark < datetime.fromisoformat(at(21))
    assert truncations("Observation") == before + 1
    captured = capsys.readouterr()
    line = next(line for line in (captured.out + captured.err).splitlines() if "catch_up_truncated" in line)
    assert "Observation" in line and SUB in line
    assert "4.0" not in line and "Patient/p1" not in line  # ids and counts only

    rounds = drain(ctx)

    assert stored(ctx, "Observation") == {f"o{i:03d}" for i in range(45)}
    assert stored(ctx, "Condition") == {"c1"}
    assert len(rounds) >= 2, "the rest was fetched by queued catch-up rounds"
    assert all(status == EventStatus.HANDLED for _, status in rounds)
    assert watermark(ctx, SUB) == datetime.fromisoformat(at(100))
    searches = fhir.requests_matching(r"/fhir/Observation$", "GET")
    assert searches and all(r.param("_count") == "10" for r in searches)
    assert all(r.param("_sort") == "_lastUpdated" for r in searches)


def test_the_default_page_size_is_sent_so_a_small_server_default_does_not_cut(
    fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path
) -> None:
    """HAPI answers 20 per page without _count: 5 pages would stop at 100 resources."""
    fhir.put(patient("p1"), last_updated=at(0))
    for i in range(120):
        fhir.put(phosphate(i), last_updated=at(1 + i))
    settings = Settings(data_dir=tmp_path)
    ctx = context(fhir, db_session_factory, catalog, tmp_path, fhir_max_pages=settings.fhir_max_pages, fhir_search_count=settings.fhir_search_count)
    before = truncations("Observation")

    ping = monitor.receive(ctx, [EmptyPing(SUB)], "r4-empty")
    assert monitor.process_event(ctx, ping.events[0]) == EventStatus.HANDLED

    assert len(stored(ctx, "Observation")) == 120
    assert truncations("Observation") == before
    assert fhir.requests_matching(r"/fhir/Observation$", "GET")[0].param("_count") == str(settings.fhir_search_count)


def test_resources_sharing_one_last_updated_across_the_cut_are_all_fetched(
    fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path
) -> None:
    """A transaction gives all its resources one lastUpdated: a watermark at that instant would skip those on
    the pages not fetched, so the search goes on until the instant changes (within a bound)."""
    fhir.put(patient("p1"), last_updated=at(0))
    for i in range(45):
        fhir.put(phosphate(i), last_updated=at(10))  # one transaction, more than 2 pages (of 10, or of the server's 20)
    fhir.put(phosphate(99), last_updated=at(20))
    ctx = context(fhir, db_session_factory, catalog, tmp_path)

    ping = monitor.receive(ctx, [EmptyPing(SUB)], "r4-empty")
    assert monitor.process_event(ctx, ping.events[0]) == EventStatus.HANDLED
    drain(ctx)

    assert stored(ctx, "Observation") == {f"o{i:03d}" for i in [*range(45), 99]}
    assert watermark(ctx, SUB) == datetime.fromisoformat(at(20))


def test_a_search_that_cannot_advance_fails_visibly_instead_of_skipping(
    fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path
) -> None:
    """More resources share one lastUpdated than the bound allows: the event fails (listed, replayable) and the
    watermark stays where it was; nothing is marked handled past resources never fetched."""
    fhir.put(patient("p1"), last_updated=at(0))
    for i in range(monitor.CATCH_UP_STUCK_FACTOR * 2 * 2 + 1):
        fhir.put(phosphate(i), last_updated=at(10))
    ctx = context(fhir, db_session_factory, catalog, tmp_path, fhir_search_count=2)

    ping = monitor.receive(ctx, [EmptyPing(SUB)], "r4-empty")
    with pytest.raises(monitor.PermanentEventError, match="Observation"):
        monitor.process_event(ctx, ping.events[0])

    assert watermark(ctx, SUB) is None
    assert stored(ctx, "Observation") == set()  # rolled back: a replay (settings raised) starts over


def test_a_catch_up_round_run_twice_changes_nothing(fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path) -> None:
    fhir.put(patient("p1"), last_updated=at(0))
    for i in range(25):
        fhir.put(phosphate(i), last_updated=at(1 + i))
    ctx = context(fhir, db_session_factory, catalog, tmp_path)
    ping = monitor.receive(ctx, [EmptyPing(SUB)], "r4-empty")
    monitor.process_event(ctx, ping.events[0])
    queue = ctx.queue
    assert isinstance(queue, MemoryQueue)
    follow_ups = [args[0] for name, args, _ in queue.sent if name == TASK_PROCESS_EVENT and args[0] != ping.events[0]]
    assert len(follow_ups) == 1

    assert monitor.process_event(ctx, follow_ups[0]) == EventStatus.HANDLED
    assert monitor.process_event(ctx, follow_ups[0]) == EventStatus.HANDLED  # a redelivery: claimed once, no more work
    assert monitor.process_event(ctx, ping.events[0]) == EventStatus.HANDLED

    assert len(stored(ctx, "Observation")) == 25
    assert len([1 for name, _, _ in queue.sent if name == TASK_PROCESS_EVENT]) == 2
