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


def deletions(rtype: str, result: str) -> float:
    return REGISTRY.get_sample_value("fhir_catch_up_deletions_total", {"resource_type": rtype, "result": result}) or 0.0


def history_reads(fhir: FakeFhirServer, rtype: str) -> list[Any]:
    return fhir.requests_matching(rf"/fhir/{rtype}/_history$", "GET")


@pytest.mark.parametrize("change", ["deleted", "re-coded"])
def test_a_result_that_lowered_the_risk_deleted_or_re_coded_stops_counting_and_the_high_tier_returns(
    ctx: MonitorContext, fhir: FakeFhirServer, change: str
) -> None:
    """Neither reaches the store any other way: no notification, and the search is filtered by the mapped codes."""
    kidney_failure_patient(fhir)
    poll_round(ctx)
    assert metastatic_tier(ctx) == "low", "the newer phosphate of 3.5 lowers it"
    before, applied = marked(ctx), deletions("Observation", "applied")

    if change == "deleted":
        fhir.delete("Observation", "p2-pd1")  # entered in error
    else:
        fhir.put(b.obs("8867-4", 72, "/min", subject=PID, when=day(1), rid="p2-pd1"))  # corrected: it was a heart rate
    poll_round(ctx)

    assert stored(ctx, "p2-pd1") == (change == "deleted", "2"), "at the version the history names"
    assert marked(ctx) == before + 1, "the patient is evaluated again"
    assert deletions("Observation", "applied") == applied + (change == "deleted")
    assert metastatic_tier(ctx) == "high"
    reads = history_reads(fhir, "Observation")
    assert reads and all(r.param("_count") == "10" and r.param("_since") for r in reads)


def test_a_round_reads_the_history_from_the_types_mark_less_the_overlap(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    kidney_failure_patient(fhir)
    poll_round(ctx)
    with session_scope(ctx.sessions) as session:
        mark = Repositories(session).subscriptions.type_watermarks(SUB)["Observation"]

    poll_round(ctx)

    since = datetime.fromisoformat(history_reads(fhir, "Observation")[-1].param("_since").replace("Z", "+00:00"))
    assert since == mark - timedelta(seconds=ctx.settings.poll_overlap_s)


def test_a_resource_re_created_after_its_deletion_stays_and_one_never_stored_gets_no_row(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    kidney_failure_patient(fhir)
    poll_round(ctx)
    unknown = deletions("Observation", "unknown")
    fhir.delete("Observation", "p2-pd1")
    fhir.put(b.obs(b.P, 3.6, subject=PID, when=day(1), rid="p2-pd1"))  # corrected: version 3
    other = fhir.put(b.obs(b.P, 9.0, subject="Patient/elsewhere", when=day(1), rid="never-seen"))
    fhir.delete("Observation", other["id"])  # created and deleted between two rounds: never stored here

    poll_round(ctx)

    assert stored(ctx, "p2-pd1") == (False, "3")
    assert stored(ctx, "never-seen") is None, "a deletion of a resource never stored leaves no tombstone"
    assert deletions("Observation", "unknown") == unknown + 1


def test_a_server_without_type_history_is_skipped_for_the_life_of_the_process(
    ctx: MonitorContext, fhir: FakeFhirServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Epic and others offer no type-level ``_history``: the round still fetches every change, and the refusal is
    logged once per type, not asked again every round."""
    refused = fhir.add_rule(FailureRule(status=405, times=None, path=r"/_history$", method="GET"))
    kidney_failure_patient(fhir)

    poll_round(ctx)
    poll_round(ctx)

    assert stored(ctx, "p2-pd1") == (False, "1")
    assert len(history_reads(fhir, "Observation")) == 1 and len(history_reads(fhir, "Condition")) == 1
    assert refused.hits == len(monitor.MONITORED_TYPES)
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "type_history_unavailable" in line]
    assert len(lines) == len(monitor.MONITORED_TYPES)
    assert all("405" in line and SUB in line for line in lines)


def test_a_history_read_that_fails_for_another_reason_fails_the_round(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    """A 401 (a token problem) or a 5xx is not a refusal of history: the round fails, visible and retryable, and
    the next one reads the history again."""
    kidney_failure_patient(fhir)
    poll_round(ctx)
    fhir.delete("Observation", "p2-pd1")
    fhir.add_rule(FailureRule(status=401, times=1, path=r"/Observation/_history$", method="GET"))
    ping = monitor.receive(ctx, [EmptyPing(SUB)], "r4-empty")
    with pytest.raises(FhirAuthError):
        monitor.process_event(ctx, ping.events[0])
    assert "Observation" not in ctx.no_type_history
    assert stored(ctx, "p2-pd1") == (False, "1")

    poll_round(ctx)

    assert stored(ctx, "p2-pd1") == (True, "2")


def test_a_history_longer_than_the_page_bound_is_counted_as_cut(
    fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Newest first: a read cut at ten times ``CDS_FHIR_MAX_PAGES`` pages has applied the newest deletions and
    missed the oldest; that is logged and counted, and the round is not failed (every other change still lands)."""
    for ctx in _context(fhir, db_session_factory, catalog, tmp_path, fhir_max_pages=1, fhir_search_count=2):
        monitor.backfill(ctx, kidney_failure_patient(fhir))  # stored at once: these searches take 2 a round
        for i in range(25):  # 25 versions of another result: 13 pages of 2 > 10 pages
            fhir.put(b.obs(b.P, 4.0 + i / 10, subject="Patient/busy", when=day(1), rid="busy"))
        fhir.delete("Observation", "p2-pd1")  # newest: on the first page
        cut = deletions("Observation", "truncated")

        poll_round(ctx)

        assert stored(ctx, "p2-pd1") == (True, "2")
        assert deletions("Observation", "truncated") == cut + 1
        out = capsys.readouterr()
        assert any("deletions_truncated" in line and "Observation" in line for line in (out.out + out.err).splitlines())


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


def test_a_token_refused_during_the_history_read_fails_the_round_and_is_not_taken_for_a_refusal_of_history(
    ctx: MonitorContext, fhir: FakeFhirServer
) -> None:
    """A 401 on the history read makes the client refresh its token; the token endpoint refusing that (a 400, 403 or
    404 of another URL) is a token problem: the round fails and is retried, the type's history is read again."""
    auth = _RefusedRefresh()
    ctx.fhir_client = lambda: FhirClient(fhir.base_url, auth=auth, max_retries=0)
    kidney_failure_patient(fhir)
    poll_round(ctx)
    fhir.delete("Observation", "p2-pd1")
    fhir.add_rule(FailureRule(status=401, times=1, path=r"/Observation/_history$", method="GET"))  # the token expired
    ping = monitor.receive(ctx, [EmptyPing(SUB)], "r4-empty")
    with pytest.raises(FhirAuthError):
        monitor.process_event(ctx, ping.events[0])
    assert "Observation" not in ctx.no_type_history

    poll_round(ctx)

    assert stored(ctx, "p2-pd1") == (True, "2")
