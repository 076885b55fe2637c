"""Deletions and re-codes on a FHIR server that notifies neither (R4 rest-hook, polling): each catch-up round reads
the type's ``_history`` since its watermark, tombstones the stored resources deleted there and applies versions the
code-filtered search did not return, so a result removed or re-coded in the EHR stops counting. The case that
matters most is such a result that had *lowered* a risk: it is in no flag's basis, so only this brings the higher
tier back."""

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
from service.fhir.client import FhirClient
from service.fhir.errors import FhirAuthError
from service.fhir.notifications import EmptyPing
from service.queue import TASK_EVALUATE, MemoryQueue
from service.terminology.catalog import Catalog
from service.usecases import monitor
from service.usecases.monitor import MonitorContext
from tests import builders as b
from tests.fakes.fhir_server import FailureRule, FakeFhirServer

SUB = "Subscription/del"
PID = "Patient/pd1"


@pytest.fixture
def ctx(fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path) -> Iterator[MonitorContext]:
    yield from _context(fhir, db_session_factory, catalog, tmp_path)


def _context(fhir: FakeFhirServer, sessions: sessionmaker[Session], catalog: Catalog, tmp_path: Path, **settings: Any) -> Iterator[MonitorContext]:
    values: dict[str, Any] = {"data_dir": tmp_path, "fhir_base_url": fhir.base_url, "fhir_max_retries": 0, "fhir_search_count": 10}
    values.update(settings)
    context = MonitorContext.from_settings(Settings(**values), catalog=catalog, sessions=sessions, queue=MemoryQueue())
    yield context
    if context._client is not None:
        context._client.close()


def poll_round(ctx: MonitorContext) -> None:
    """One catch-up round, as an R4 empty ping starts it."""
    ping = monitor.receive(ctx, [EmptyPing(SUB)], "r4-empty")
    assert ping.accepted == 1
    assert monitor.process_event(ctx, ping.events[0]) == EventStatus.HANDLED


def day(days_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).isoformat().replace("+00:00", "Z")


def kidney_failure_patient(fhir: FakeFhirServer) -> list[dict[str, Any]]:
    """End-stage kidney disease with Ca 10 x P 7.5 = 75 two days ago (HIGH metastatic calcification), and a newer
    phosphate of 3.5 yesterday (Ca x P 35), which lowers it. Returns the server's copies."""
    return fhir.put_all([
        b.patient("pd1"),
        b.condition("46177005", subject=PID, rid="c-pd1"),
        b.obs(b.CA, 10.0, subject=PID, when=day(2), rid="ca-pd1"),
        b.obs(b.P, 7.5, subject=PID, when=day(2), rid="p-pd1"),
        b.obs(b.ALB, 4.1, "g/dL", subject=PID, when=day(2), rid="alb-pd1"),
        b.obs(b.P, 3.5, subject=PID, when=day(1), rid="p2-pd1"),
    ])


def metastatic_tier(ctx: MonitorContext) -> str:
    evaluation_id = monitor.evaluate_patient_state(ctx, PID)
    assert evaluation_id is not None
    with session_scope(ctx.sessions) as session:
        evaluation = Repositories(session).evaluations.get(evaluation_id)
        assert evaluation is not None
        return evaluation.metastatic_tier


def stored(ctx: MonitorContext, rid: str) -> tuple[bool, str | None] | None:
    """(deleted, versionId) of the stored Observation, None when never stored."""
    with session_scope(ctx.sessions) as session:
        row = Repositories(session).resources.get("Observation", rid)
        return None if row is None else (bool(row.deleted), row.version_id)


def marked(ctx: MonitorContext) -> int:
    assert isinstance(ctx.queue, MemoryQueue)
    return sum(1 for name, args, _ in ctx.queue.sent if name == TASK_EVALUATE and args == [PID])


def history_count(rtype: str, result: str) -> float:
    return REGISTRY.get_sample_value("fhir_catch_up_history_total", {"resource_type": rtype, "result": result}) or 0.0


def history_reads(fhir: FakeFhirServer, rtype: str) -> list[Any]:
    return fhir.requests_matching(rf"/fhir/{rtype}/_history$", "GET")


def since_of(request: Any) -> datetime:
    return datetime.fromisoformat(request.param("_since").replace("Z", "+00:00"))


def history_mark(ctx: MonitorContext, rtype: str = "Observation") -> datetime | None:
    with session_scope(ctx.sessions) as session:
        return Repositories(session).subscriptions.history_watermarks(SUB).get(rtype)


def logged(capsys: pytest.CaptureFixture[str], event: str) -> list[str]:
    out = capsys.readouterr()
    return [line for line in (out.out + out.err).splitlines() if event in line]


def vitals(fhir: FakeFhirServer, n: int, rid: str = "hr") -> None:
    """``n`` versions of a heart rate: a change the code-filtered Observation search never returns."""
    for i in range(n):
        fhir.put(b.obs("8867-4", 70 + i, "/min", subject="Patient/busy", when=day(1), rid=rid))


@pytest.mark.parametrize("form", ["spec", "hapi"])
@pytest.mark.parametrize("change", ["deleted", "re-coded"])
def test_a_result_that_lowered_the_risk_deleted_or_re_coded_stops_counting_and_the_high_tier_returns(
    ctx: MonitorContext, fhir: FakeFhirServer, change: str, form: str
) -> None:
    """Neither reaches the store any other way: no notification, and the search is filtered by the mapped codes.
    HAPI writes a deletion with its version in ``request.url`` and an etag, and no ``lastModified``."""
    fhir.history_deletion_form = form  # type: ignore[assignment]
    kidney_failure_patient(fhir)
    poll_round(ctx)  # the first round stores the patient and starts reading the history from here on
    assert metastatic_tier(ctx) == "low", "the newer phosphate of 3.5 lowers it"
    before, applied = marked(ctx), history_count("Observation", "tombstoned")

    if change == "deleted":
        fhir.delete("Observation", "p2-pd1")  # entered in error
    else:
        fhir.put(b.obs("8867-4", 72, "/min", subject=PID, when=day(1), rid="p2-pd1"))  # corrected: it was a heart rate
    poll_round(ctx)

    assert stored(ctx, "p2-pd1") == (change == "deleted", "2"), "at the version the history names"
    assert marked(ctx) == before + 1, "the patient is evaluated again"
    assert history_count("Observation", "tombstoned") == applied + (change == "deleted")
    assert metastatic_tier(ctx) == "high"
    reads = history_reads(fhir, "Observation")
    assert len(reads) == 1 and reads[0].param("_count") == "10"


def test_the_history_has_a_mark_of_its_own_that_moves_with_changes_the_search_never_sees(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    """Only heart rates change: the Observation search mark stays, and the history read must not re-read an ever
    longer window. Each read starts at the newest entry the one before read, less the overlap."""
    kidney_failure_patient(fhir)
    poll_round(ctx)
    first = history_mark(ctx)
    assert first is not None
    with session_scope(ctx.sessions) as session:
        search_mark = Repositories(session).subscriptions.type_watermarks(SUB)["Observation"]
    overlap = timedelta(seconds=ctx.settings.poll_overlap_s)

    vitals(fhir, 3)
    poll_round(ctx)
    newest_vital = datetime.fromisoformat(fhir.get("Observation", "hr")["meta"]["lastUpdated"].replace("Z", "+00:00"))
    vitals(fhir, 2)
    poll_round(ctx)

    reads = history_reads(fhir, "Observation")
    assert [since_of(r) for r in reads] == [first - overlap, newest_vital - overlap]
    with session_scope(ctx.sessions) as session:
        assert Repositories(session).subscriptions.type_watermarks(SUB)["Observation"] == search_mark, "the search saw nothing"
    assert stored(ctx, "hr") is None, "a version of a resource never stored is not stored"


def test_a_resource_re_created_after_its_deletion_stays_and_one_never_stored_gets_no_row(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    kidney_failure_patient(fhir)
    poll_round(ctx)
    fhir.delete("Observation", "p2-pd1")
    fhir.put(b.obs(b.P, 3.6, subject=PID, when=day(1), rid="p2-pd1"))  # corrected: version 3
    other = fhir.put(b.obs(b.P, 9.0, subject="Patient/elsewhere", when=day(1), rid="never-seen"))
    fhir.delete("Observation", other["id"])  # created and deleted between two rounds: never stored here

    poll_round(ctx)

    assert stored(ctx, "p2-pd1") == (False, "3")
    assert stored(ctx, "never-seen") is None, "a deletion of a resource never stored leaves no tombstone"


def test_a_server_without_type_history_is_skipped_for_the_life_of_the_process(
    ctx: MonitorContext, fhir: FakeFhirServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Many EHR servers offer no type-level ``_history``: the round still fetches every change, and the refusal is
    logged once per type, not asked again every round."""
    refused = fhir.add_rule(FailureRule(status=405, times=None, path=r"/_history$", method="GET"))
    kidney_failure_patient(fhir)

    for _ in range(3):
        poll_round(ctx)

    assert stored(ctx, "p2-pd1") == (False, "1")
    assert len(history_reads(fhir, "Observation")) == 1 and len(history_reads(fhir, "Condition")) == 1
    assert refused.hits == len(monitor.MONITORED_TYPES)
    lines = logged(capsys, "type_history_unavailable")
    assert len(lines) == len(monitor.MONITORED_TYPES)
    assert all("405" in line and SUB in line for line in lines)


@pytest.mark.parametrize("status", [401, 500])
def test_a_history_read_that_fails_otherwise_keeps_its_mark_and_the_rounds_other_results_land(
    ctx: MonitorContext, fhir: FakeFhirServer, capsys: pytest.CaptureFixture[str], status: int
) -> None:
    """A 401 (a token problem) or a 5xx is not a refusal of history. The round is not failed for it: the searches'
    results land; the history mark stays, so the next round reads the same window again and misses nothing."""
    kidney_failure_patient(fhir)
    poll_round(ctx)
    mark, failed = history_mark(ctx), history_count("Observation", "failed")
    fhir.delete("Observation", "p2-pd1")
    fhir.put(b.obs(b.P, 6.0, subject=PID, when=day(0.5), rid="p3-pd1"))
    fhir.add_rule(FailureRule(status=status, times=1, path=r"/Observation/_history$", method="GET"))

    poll_round(ctx)

    assert stored(ctx, "p3-pd1") == (False, "1"), "the search's new result landed"
    assert stored(ctx, "p2-pd1") == (False, "1")
    assert history_mark(ctx) == mark
    assert "Observation" not in ctx.no_type_history
    assert history_count("Observation", "failed") == failed + 1
    assert any(str(status) in line and "Observation" in line for line in logged(capsys, "type_history_failed"))

    poll_round(ctx)

    assert stored(ctx, "p2-pd1") == (True, "2")
    assert since_of(history_reads(fhir, "Observation")[-1]) == mark - timedelta(seconds=ctx.settings.poll_overlap_s)


def test_a_cut_history_read_applies_what_it_read_and_keeps_its_mark_so_nothing_older_is_lost(
    fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Newest first: a read cut at ten times ``CDS_FHIR_MAX_PAGES`` pages has not read the oldest entries of its
    window. It applies the newest, keeps the mark, and says so every round until the page bound is raised; then
    the older deletion is applied too."""
    for ctx in _context(fhir, db_session_factory, catalog, tmp_path, fhir_max_pages=1, fhir_search_count=2):
        monitor.backfill(ctx, kidney_failure_patient(fhir))  # stored at once: these searches take 2 a round
        poll_round(ctx)
        mark = history_mark(ctx)
        fhir.delete("Observation", "p-pd1")  # the oldest entry of the window
        vitals(fhir, 25)  # 13 pages of 2 > 10 pages
        fhir.delete("Observation", "p2-pd1")  # the newest: on the first page
        cut = history_count("Observation", "truncated")

        poll_round(ctx)

        assert stored(ctx, "p2-pd1") == (True, "2") and stored(ctx, "p-pd1") == (False, "1")
        assert history_mark(ctx) == mark
        assert history_count("Observation", "truncated") == cut + 1
        assert any("Observation" in line for line in logged(capsys, "history_truncated"))

    for ctx in _context(fhir, db_session_factory, catalog, tmp_path, fhir_max_pages=2, fhir_search_count=2):
        poll_round(ctx)
        assert stored(ctx, "p-pd1") == (True, "2"), "read in the next round with the bound raised"
        assert history_mark(ctx) > mark  # type: ignore[operator]


def test_the_history_is_not_read_when_turned_off(
    fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path
) -> None:
    for ctx in _context(fhir, db_session_factory, catalog, tmp_path, poll_deletions=False):
        kidney_failure_patient(fhir)
        poll_round(ctx)
        fhir.delete("Observation", "p2-pd1")
        poll_round(ctx)
        assert not fhir.requests_matching(r"/_history$", "GET")
        assert stored(ctx, "p2-pd1") == (False, "1")
        assert history_mark(ctx) is None


class _RefusedRefresh:
    """A refreshable token provider (as SMART backend auth) whose token endpoint refuses the next refresh with a 400
    (``invalid_grant``: clock skew, a rotated key), as :class:`service.fhir.smart.SmartBackendAuth` raises it."""

    refreshable = True

    def __init__(self) -> None:
        self.refuse_next = False

    def get_token(self) -> str:
        if self.refuse_next:
            self.refuse_next = False
            raise FhirAuthError("SMART token request refused: POST /auth/token -> 400", status=400, url="https://auth.example/token")
        return "token"

    def invalidate(self, token: str | None = None) -> None:
        self.refuse_next = True


def test_a_token_refused_during_the_history_read_is_not_taken_for_a_refusal_of_history(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    """A 401 on the history read makes the client refresh its token; the token endpoint refusing that (a 400, 403 or
    404 of another URL) is a token problem: the history is read again next round, not turned off."""
    auth = _RefusedRefresh()
    ctx.fhir_client = lambda: FhirClient(fhir.base_url, auth=auth, max_retries=0)
    kidney_failure_patient(fhir)
    poll_round(ctx)
    fhir.delete("Observation", "p2-pd1")
    fhir.add_rule(FailureRule(status=401, times=1, path=r"/Observation/_history$", method="GET"))  # the token expired

    poll_round(ctx)

    assert "Observation" not in ctx.no_type_history
    assert stored(ctx, "p2-pd1") == (False, "1")
    poll_round(ctx)
    assert stored(ctx, "p2-pd1") == (True, "2")


@pytest.mark.parametrize("case", ["upgraded", "turned-on", "backfilled", "clock-ahead"])
def test_a_deletion_before_a_types_first_history_round_is_not_lost(
    fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, case: str,
) -> None:
    """The first round of a type's history mark searches only the changes since the type's search mark, which
    names no deletion: the history mark must start no later than that search mark (server time), not at this
    round's start by our clock, or a deletion made between the two is never read.

    upgraded: a deployment from before migration 0005 (type marks, no history marks); turned-on: CDS_POLL_DELETIONS
    turned on after rounds without it; backfilled: resources loaded by backfill before the first round;
    clock-ahead: our clock runs ahead of the FHIR server's by more than CDS_POLL_OVERLAP_S."""
    from sqlalchemy import update

    from service.db.models import SubscriptionWatermark

    for ctx in _context(fhir, db_session_factory, catalog, tmp_path, poll_deletions=case != "turned-on"):
        # Written an hour ago and deleted half an hour ago (server time): both well beyond CDS_POLL_OVERLAP_S.
        # clock-ahead: written now, deleted after the first round.
        if case != "clock-ahead":
            original_put = fhir.put
            monkeypatch.setattr(fhir, "put", lambda r, put=original_put, **kw: put(r, last_updated=datetime.now(UTC) - timedelta(hours=1)))
        if case == "backfilled":
            monitor.backfill(ctx, kidney_failure_patient(fhir))
        else:
            kidney_failure_patient(fhir)
            if case == "clock-ahead":
                real = monitor._now
                monkeypatch.setattr(monitor, "_now", lambda now=real: now() + timedelta(minutes=5))
            poll_round(ctx)
        if case == "upgraded":  # as migration 0005 leaves an existing row
            with session_scope(ctx.sessions) as session:
                session.execute(update(SubscriptionWatermark).values(history_watermark=None))
        fhir.delete("Observation", "p2-pd1")
        if case != "clock-ahead":
            fhir._store[("Observation", "p2-pd1")].deleted_at[2] = (datetime.now(UTC) - timedelta(minutes=30)).isoformat().replace("+00:00", "Z")

    for ctx in _context(fhir, db_session_factory, catalog, tmp_path):
        poll_round(ctx)
        poll_round(ctx)
        assert stored(ctx, "p2-pd1") == (True, "2")


def test_an_entry_stamped_in_the_future_does_not_move_the_mark_past_later_deletions(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    """Any Observation version moves the history mark (a vital too, which is never stored): one stamped a day ahead
    (a server node whose clock runs ahead, an import that keeps its lastUpdated) must not hide the deletions of
    that day."""
    kidney_failure_patient(fhir)
    poll_round(ctx)
    poll_round(ctx)
    fhir.put(b.obs("8867-4", 70, "/min", subject="Patient/busy", when=day(1), rid="hr"), last_updated=datetime.now(UTC) + timedelta(days=1))
    poll_round(ctx)
    fhir.delete("Observation", "p2-pd1")

    poll_round(ctx)

    assert stored(ctx, "p2-pd1") == (True, "2")


def test_a_new_installs_first_history_read_goes_back_an_hour_not_the_whole_initial_look_back(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    """The first search looks back CDS_POLL_INITIAL_LOOKBACK_H (24 h); a day of a busy server's history would not fit
    one read, and a cut read keeps its mark, so the first history read starts at most an hour back."""
    kidney_failure_patient(fhir)
    before = datetime.now(UTC)
    poll_round(ctx)
    poll_round(ctx)
    since = since_of(history_reads(fhir, "Observation")[0])
    overlap = timedelta(seconds=ctx.settings.poll_overlap_s)
    assert before - monitor.HISTORY_FIRST_WINDOW - overlap - timedelta(seconds=1) <= since <= datetime.now(UTC) - monitor.HISTORY_FIRST_WINDOW - overlap
