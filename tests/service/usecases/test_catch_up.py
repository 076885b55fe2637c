"""The ``_lastUpdated`` catch-up search (R4 empty pings, polling, gap and silent-subscription recovery) skips
nothing: a search cut at ``CDS_FHIR_MAX_PAGES`` keeps the watermark where every type was completely fetched and
queues another round; the cut is logged (type, subscription) and counted; ``_count`` is sent."""

from __future__ import annotations

import re
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
from service.fhir.client import FhirClient
from service.fhir.notifications import EmptyPing
from service.queue import TASK_EVALUATE, TASK_PROCESS_EVENT, MemoryQueue
from service.terminology.catalog import Catalog
from service.usecases import monitor
from service.usecases.monitor import MonitorContext
from tests.builders import P, condition, obs, patient
from tests.fakes.fhir_server import FakeFhirServer
from tests.service.usecases.support import drain

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


def stored(ctx: MonitorContext, rtype: str) -> set[str]:
    with session_scope(ctx.sessions) as session:
        return {r.resource_id for r in Repositories(session).resources.list_for_patient("Patient/p1", resource_types=[rtype])}


def watermark(ctx: MonitorContext, subscription: str) -> datetime | None:
    with session_scope(ctx.sessions) as session:
        return Repositories(session).subscriptions.get_watermark(subscription)


def type_mark(ctx: MonitorContext, subscription: str, rtype: str) -> datetime | None:
    with session_scope(ctx.sessions) as session:
        return Repositories(session).subscriptions.type_watermarks(subscription).get(rtype)


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
    mark = type_mark(ctx, SUB, "Observation")
    assert mark is not None and mark < datetime.fromisoformat(at(21))
    assert type_mark(ctx, SUB, "Condition") == datetime.fromisoformat(at(100))
    assert truncations("Observation") == before + 1
    captured = capsys.readouterr()
    line = next(line for line in (captured.out + captured.err).splitlines() if "catch_up_truncated" in line)
    assert "Observation" in line and SUB in line
    unstamped = re.sub(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?Z?", "", line)  # "...:03:54.034000Z" holds "4.0"
    assert "4.0" not in unstamped and "Patient/p1" not in line  # ids and counts only

    rounds = drain(ctx)

    assert stored(ctx, "Observation") == {f"o{i:03d}" for i in range(45)}
    assert stored(ctx, "Condition") == {"c1"}
    assert len(rounds) >= 2, "the rest was fetched by queued catch-up rounds"
    assert all(status == EventStatus.HANDLED for _, status in rounds)
    assert type_mark(ctx, SUB, "Observation") == datetime.fromisoformat(at(44 + 1))
    summary = watermark(ctx, SUB)  # where every type is complete: no later than any type's own mark
    assert summary is not None and summary <= datetime.fromisoformat(at(0))
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
    assert type_mark(ctx, SUB, "Observation") == datetime.fromisoformat(at(20))


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


def _changes_during_the_round(fhir: FakeFhirServer, monkeypatch: pytest.MonkeyPatch, before_type: str, *changes: tuple[dict[str, Any], str]) -> None:
    """The FHIR server receives ``changes`` (resource, lastUpdated) just before the first search of ``before_type``:
    changes made while a catch-up round is between two types' searches."""
    original = FhirClient.history_since_pages
    pending = list(changes)

    def searching(self: FhirClient, resource_type: str, *args: Any, **kwargs: Any) -> Any:
        if resource_type == before_type and pending:
            for resource, when in pending:
                fhir.put(resource, last_updated=when)
            pending.clear()
        return original(self, resource_type, *args, **kwargs)

    monkeypatch.setattr(FhirClient, "history_since_pages", searching)


def ping(ctx: MonitorContext) -> str:
    """An R4 empty ping, handled as a worker would; returns the event's status."""
    received = monitor.receive(ctx, [EmptyPing(SUB)], "r4-empty")
    assert received.accepted == 1
    return monitor.process_event(ctx, received.events[0])


def test_a_change_to_one_type_made_while_another_is_searched_is_not_skipped(
    fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The on-call drill: Observations are searched before Conditions. A phosphate stored after the Observation
    search, then a Condition, both before the Condition search: the Condition's lastUpdated must not become the
    Observations' watermark, or the next round searches past the phosphate and never fetches it."""
    fhir.put(patient("p1"), last_updated=at(0))
    _changes_during_the_round(fhir, monkeypatch, "Condition", (phosphate(1), at(10)), (a_condition(), at(20)))
    ctx = context(fhir, db_session_factory, catalog, tmp_path, poll_overlap_s=0)  # the overlap is not what saves it

    assert ping(ctx) == EventStatus.HANDLED
    assert stored(ctx, "Observation") == set() and stored(ctx, "Condition") == {"c1"}

    assert ping(ctx) == EventStatus.HANDLED  # the next ping, or poll

    assert stored(ctx, "Observation") == {"o001"}
    assert type_mark(ctx, SUB, "Observation") == datetime.fromisoformat(at(10))
    assert type_mark(ctx, SUB, "Condition") == datetime.fromisoformat(at(20))


def test_a_change_committed_after_a_later_one_is_fetched_within_the_overlap(
    fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path
) -> None:
    """A server stamps lastUpdated before it commits: a phosphate stamped at 30 s becomes visible only after one
    stamped at 50 s was fetched. The next search starts CDS_POLL_OVERLAP_S before the watermark and fetches it; the
    phosphate fetched again is an unchanged version, stored once and not evaluated again."""
    fhir.put(patient("p1"), last_updated=at(0))
    fhir.put(phosphate(2), last_updated=at(50))
    ctx = context(fhir, db_session_factory, catalog, tmp_path)
    assert ping(ctx) == EventStatus.HANDLED
    assert stored(ctx, "Observation") == {"o002"}
    queue = ctx.queue
    assert isinstance(queue, MemoryQueue)
    evaluations = len([1 for name, _, _ in queue.sent if name == TASK_EVALUATE])

    fhir.put(phosphate(1), last_updated=at(30))  # the late commit
    assert ping(ctx) == EventStatus.HANDLED

    assert stored(ctx, "Observation") == {"o001", "o002"}
    assert type_mark(ctx, SUB, "Observation") == datetime.fromisoformat(at(50))
    windows = [r.query["_lastUpdated"] for r in fhir.requests_matching(r"/fhir/Observation$", "GET")]
    assert ["gt" + at(50 - 60), "le" + at(50)] in windows  # the overlap, read again as a search of its own
    assert len([1 for name, _, _ in queue.sent if name == TASK_EVALUATE]) == evaluations  # p1 is still marked: one evaluation


def test_without_the_overlap_a_late_commit_is_behind_the_watermark(
    fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path
) -> None:
    """CDS_POLL_OVERLAP_S=0 searches strictly after the watermark (what the overlap is for)."""
    fhir.put(patient("p1"), last_updated=at(0))
    fhir.put(phosphate(2), last_updated=at(50))
    ctx = context(fhir, db_session_factory, catalog, tmp_path, poll_overlap_s=0)
    assert ping(ctx) == EventStatus.HANDLED
    fhir.put(phosphate(1), last_updated=at(30))
    assert ping(ctx) == EventStatus.HANDLED
    assert stored(ctx, "Observation") == {"o002"}


def test_a_burst_of_changes_inside_the_overlap_does_not_stall_the_search(
    fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path
) -> None:
    """The reviewer's drill, scaled down: more changes within one overlap window than ten rounds of pages hold.
    Reading the overlap again must not count against the search past the watermark, or every round (and every
    later ping) fails as "cannot advance" and the newest results are never fetched."""
    fhir.put(patient("p1"), last_updated=at(0))
    for i in range(152):
        fhir.put(phosphate(i), last_updated=at(1 + i * 0.2))  # 152 changes in 30 s
    ctx = context(fhir, db_session_factory, catalog, tmp_path, fhir_max_pages=1)

    assert ping(ctx) == EventStatus.HANDLED
    rounds = drain(ctx)

    assert all(status == EventStatus.HANDLED for _, status in rounds), rounds
    assert stored(ctx, "Observation") == {f"o{i:03d}" for i in range(152)}
    fhir.put(a_condition(), last_updated=at(40))
    assert ping(ctx) == EventStatus.HANDLED
    assert stored(ctx, "Condition") == {"c1"}
