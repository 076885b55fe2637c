"""A RiskAssessment write-back that fails is never lost: recorded with the evaluation, failed when the task gives up
(counted in ``worker_tasks_total{result="failed"}``, listed by ``events --failed``), sent again by the sweeper after a
transient failure (bounded, with backoff) and replayable by an operator. The task is called directly (no eager
mode), against the FHIR server double over real HTTP."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import WritebackStatus
from service.db.repositories import Repositories, WritebackRequest
from service.db.session import session_scope
from service.fhir.errors import FhirTransientError
from service.queue import TASK_EVALUATE, TASK_WRITEBACK, MemoryQueue
from service.terminology.catalog import Catalog
from service.usecases import monitor
from service.usecases.monitor import MonitorContext
from tests import builders as b
from tests.fakes.fhir_server import FailureRule, FakeFhirServer
from workers import context, tasks

RISK_PUT = r"/fhir/RiskAssessment$"
STALE_S = 60


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(monitor, "_now", c)
    return c


@pytest.fixture
def ctx(fhir: FakeFhirServer, db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MonitorContext:
    settings = Settings(
        data_dir=tmp_path,
        fhir_base_url=fhir.base_url,
        fhir_max_retries=0,
        writeback_enabled=True,
        sweeper_stale_after_s=STALE_S,
        task_max_retries=2,
        writeback_sweeper_retries=2,
    )
    c = MonitorContext.from_settings(settings, catalog=catalog, sessions=db_session_factory, queue=MemoryQueue())
    monkeypatch.setattr(context, "get", lambda: c)  # the worker process's context
    return c


def evaluated(ctx: MonitorContext, fhir: FakeFhirServer) -> tuple[str, int]:
    """A high-risk patient (metastatic calcification: Ca x P 75) evaluated: returns its id and the evaluation id."""
    pid = f"wb-{uuid.uuid4().hex[:8]}"
    when = (datetime.now(UTC) - timedelta(days=1)).isoformat().replace("+00:00", "Z")
    resources = [
        b.patient(pid),
        b.condition("46177005", subject=f"Patient/{pid}", rid=f"c-{pid}"),
        b.obs(b.CA, 10.0, subject=f"Patient/{pid}", when=when, rid=f"ca-{pid}"),
        b.obs(b.P, 7.5, subject=f"Patient/{pid}", when=when, rid=f"p-{pid}"),
        b.obs(b.ALB, 4.1, "g/dL", subject=f"Patient/{pid}", when=when, rid=f"alb-{pid}"),
    ]
    monitor.backfill(ctx, fhir.put_all(resources))  # the EHR's copies: a write-back reads its basis again
    evaluation_id = monitor.evaluate_patient_state(ctx, f"Patient/{pid}")
    assert evaluation_id is not None
    assert (TASK_WRITEBACK, [evaluation_id], None) in sent(ctx)
    return pid, evaluation_id


def sent(ctx: MonitorContext) -> list[tuple[str, list[Any], float | None]]:
    assert isinstance(ctx.queue, MemoryQueue)
    return ctx.queue.sent


def run_task(evaluation_id: int, retries: int = 0) -> Any:
    """The Celery task as a worker runs it, at its ``retries``-th retry (called directly: a retry re-raises)."""
    tasks.write_back.push_request(retries=retries)
    try:
        return tasks.write_back.run(evaluation_id)
    finally:
        tasks.write_back.pop_request()


def request_of(ctx: MonitorContext, evaluation_id: int) -> WritebackRequest:
    with session_scope(ctx.sessions) as session:
        row = Repositories(session).writeback_requests.get(evaluation_id)
        assert row is not None
        session.expunge(row)
        return row


def failed_ids(ctx: MonitorContext) -> list[int]:
    with session_scope(ctx.sessions) as session:
        return [r.evaluation_id for r in Repositories(session).writeback_requests.list_failed()]


def task_failures() -> float:
    return REGISTRY.get_sample_value("worker_tasks_total", {"task": TASK_WRITEBACK, "result": "failed"}) or 0.0


def risk_assessments(fhir: FakeFhirServer, pid: str) -> list[dict[str, Any]]:
    return [r for r in fhir.resources("RiskAssessment") if (r.get("subject") or {}).get("reference") == f"Patient/{pid}"]


def all_written(results: dict[str, str] | None) -> bool:
    """Every flag raised was written (the metastatic calcification one among them)."""
    return results is not None and results.get("metastatic-calcification") == "written" and set(results.values()) == {"written"}


def resent_by_sweep(ctx: MonitorContext, counted_as: str = "writebacks") -> list[int]:
    """The write-backs one sweep sends; all of them counted under ``counted_as`` (a resend, or a daily recheck)."""
    before = len(sent(ctx))
    counts = monitor.sweep(ctx)
    ids = [args[0] for name, args, _ in sent(ctx)[before:] if name == TASK_WRITEBACK]
    assert counts[counted_as] == len(ids)
    return ids


def test_a_permanent_error_fails_the_write_back_counted_listed_and_replayable(ctx: MonitorContext, fhir: FakeFhirServer, clock: Clock) -> None:
    pid, evaluation_id = evaluated(ctx, fhir)
    assert request_of(ctx, evaluation_id).status == WritebackStatus.PENDING
    rule = fhir.add_rule(FailureRule(status=422, times=None, path=RISK_PUT, method="PUT"))
    failures = task_failures()

    assert run_task(evaluation_id) == {"failed": "FhirPermanentError"}

    row = request_of(ctx, evaluation_id)
    assert (row.status, row.transient, row.attempts) == ("failed", False, 1)
    assert row.last_error == "FhirPermanentError: HTTP 422"  # value-free: no patient, no tier
    assert task_failures() == failures + 1
    assert failed_ids(ctx) == [evaluation_id]
    clock.advance(timedelta(days=1))
    assert resent_by_sweep(ctx) == [], "a permanent error waits for an operator"

    rule.times = 0  # the EHR accepts RiskAssessments again
    result = monitor.replay_failed_writebacks(ctx, [evaluation_id, 999_999])
    assert result.replayed == [evaluation_id]
    assert result.not_failed == {999_999: ""}
    assert sent(ctx)[-1] == (TASK_WRITEBACK, [evaluation_id], None)
    assert all_written(run_task(evaluation_id))
    assert request_of(ctx, evaluation_id).status == WritebackStatus.WRITTEN
    assert {r["status"] for r in risk_assessments(fhir, pid)} == {"final"}
    assert failed_ids(ctx) == []


def test_a_write_back_whose_retries_ran_out_is_sent_again_by_the_sweeper_with_backoff(ctx: MonitorContext, fhir: FakeFhirServer, clock: Clock) -> None:
    """About a minute of EHR outage used to leave the stale tier in the EHR for good."""
    pid, evaluation_id = evaluated(ctx, fhir)
    rule = fhir.add_rule(FailureRule(status=503, times=None, path=RISK_PUT, method="PUT"))
    failures = task_failures()

    with pytest.raises(FhirTransientError):  # the task's own retry is scheduled (called directly, it re-raises)
        run_task(evaluation_id, retries=0)
    row = request_of(ctx, evaluation_id)
    assert (row.status, row.last_error) == ("pending", "retrying: FhirTransientError: HTTP 503")
    clock.advance(timedelta(seconds=STALE_S - 1))
    assert resent_by_sweep(ctx) == [], "the sweeper leaves a write-back alone while its task retry is due"

    assert run_task(evaluation_id, retries=ctx.settings.task_max_retries) == {"failed": "FhirTransientError"}
    row = request_of(ctx, evaluation_id)
    assert (row.status, row.transient, row.last_error) == ("failed", True, "FhirTransientError: HTTP 503")
    assert task_failures() == failures + 1
    assert failed_ids(ctx) == [evaluation_id], "visible while it waits"
    assert risk_assessments(fhir, pid) == []

    assert resent_by_sweep(ctx) == []
    clock.advance(timedelta(seconds=STALE_S + 1))
    assert resent_by_sweep(ctx) == [evaluation_id]
    assert resent_by_sweep(ctx) == [], "sent once, not at every sweep"
    assert run_task(evaluation_id, retries=ctx.settings.task_max_retries) == {"failed": "FhirTransientError"}  # still down
    clock.advance(timedelta(seconds=STALE_S + 1))
    assert resent_by_sweep(ctx) == [], "the wait doubles"
    clock.advance(timedelta(seconds=STALE_S))
    assert resent_by_sweep(ctx) == [evaluation_id]

    rule.times = 0  # the EHR is back
    assert all_written(run_task(evaluation_id))
    row = request_of(ctx, evaluation_id)
    assert (row.status, row.sweeps) == ("written", 2) and all_written(row.results)
    metastatic = [r for r in risk_assessments(fhir, pid) if r["identifier"][0]["value"].endswith("-metastatic-calcification")]
    assert [r["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] for r in metastatic] == ["high"]
    clock.advance(timedelta(hours=ctx.settings.writeback_recheck_h - 1))  # (its daily recheck aside)
    assert resent_by_sweep(ctx) == []


def test_the_sweeper_gives_up_after_its_retries_and_leaves_it_failed_for_an_operator(ctx: MonitorContext, fhir: FakeFhirServer, clock: Clock) -> None:
    _, evaluation_id = evaluated(ctx, fhir)
    fhir.add_rule(FailureRule(status=503, times=None, path=RISK_PUT, method="PUT"))
    for _ in range(ctx.settings.writeback_sweeper_retries):
        assert run_task(evaluation_id, retries=ctx.settings.task_max_retries) == {"failed": "FhirTransientError"}
        clock.advance(monitor.WRITEBACK_SWEEP_BACKOFF_MAX)
        assert resent_by_sweep(ctx) == [evaluation_id]
    assert run_task(evaluation_id, retries=ctx.settings.task_max_retries) == {"failed": "FhirTransientError"}
    clock.advance(monitor.WRITEBACK_SWEEP_BACKOFF_MAX)

    counts = monitor.sweep(ctx)

    assert (counts["writebacks"], counts["writebacks_given_up"]) == (0, 1)
    row = request_of(ctx, evaluation_id)
    assert (row.status, row.transient) == ("failed", False)
    assert row.last_error == "FhirTransientError: HTTP 503 (sweeper gave up after 2 retries)"
    assert failed_ids(ctx) == [evaluation_id]
    clock.advance(timedelta(days=7))
    assert resent_by_sweep(ctx) == []
    assert monitor.replay_failed_writebacks(ctx, None).replayed == [evaluation_id]


def test_a_write_back_whose_job_was_lost_is_sent_by_the_sweeper(ctx: MonitorContext, fhir: FakeFhirServer, clock: Clock) -> None:
    """The broker lost the job (or a worker died with it): the write-back is pending in the database."""
    pid, evaluation_id = evaluated(ctx, fhir)
    assert resent_by_sweep(ctx) == []
    clock.advance(timedelta(seconds=STALE_S + 1))
    assert resent_by_sweep(ctx) == [evaluation_id]
    assert all_written(run_task(evaluation_id))
    assert run_task(evaluation_id) == {"skipped": "already written or superseded"}  # the original job, late
    assert fhir.count(RISK_PUT, "PUT") == len(risk_assessments(fhir, pid)), "one write per flag, not two"


def test_a_newer_evaluation_supersedes_a_failed_write_back(ctx: MonitorContext, fhir: FakeFhirServer, clock: Clock) -> None:
    pid, first = evaluated(ctx, fhir)
    fhir.add_rule(FailureRule(status=422, times=1, path=RISK_PUT, method="PUT"))
    assert run_task(first) == {"failed": "FhirPermanentError"}
    monitor.backfill(ctx, fhir.put_all([b.obs(b.P, 8.0, subject=f"Patient/{pid}", when=b.ago(hours=1, now=datetime.now(UTC)), rid=f"p2-{pid}")]))

    second = monitor.evaluate_patient_state(ctx, f"Patient/{pid}")

    assert second is not None and second != first
    assert request_of(ctx, first).status == WritebackStatus.SUPERSEDED
    assert failed_ids(ctx) == []
    assert monitor.replay_failed_writebacks(ctx, [first]).not_failed == {first: "superseded"}
    assert all_written(run_task(second))


# --------------------------------------------------------------------------- one write-back per patient at a time


DEFERRED = {"skipped": "another write-back of the patient is in flight; it sends this one when it ends"}


def metastatic_tier(fhir: FakeFhirServer, pid: str) -> str:
    """The metastatic calcification tier the EHR holds ("none" once retracted)."""
    (resource,) = [r for r in risk_assessments(fhir, pid) if r["identifier"][0]["value"].endswith("-metastatic-calcification")]
    return monitor._tier_of(resource)


def phosphate_falls(ctx: MonitorContext, fhir: FakeFhirServer, pid: str) -> int:
    """A new phosphate of 3.5 mg/dL (Ca x P 35): no longer HIGH. Returns the new evaluation's id."""
    monitor.backfill(ctx, fhir.put_all([b.obs(b.P, 3.5, subject=f"Patient/{pid}", when=b.ago(hours=1, now=datetime.now(UTC)), rid=f"p2-{pid}")]))
    evaluation_id = monitor.evaluate_patient_state(ctx, f"Patient/{pid}")
    assert evaluation_id is not None
    return evaluation_id


def in_flight(ctx: MonitorContext, fhir: FakeFhirServer, evaluation_id: int, status: int | None = None) -> tuple[threading.Thread, dict[str, Any]]:
    """Start the evaluation's write-back in a worker thread; return once its first PUT reached the EHR, which
    answers it (stores it, or refuses it with ``status``) only 1.5 s later. Later PUTs are answered at once."""
    slow = fhir.add_rule(FailureRule(status=status, times=None, latency_s=1.5, path=RISK_PUT, method="PUT"))
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome.update(monitor.write_back(ctx, evaluation_id))
        except Exception as exc:  # the test reads it
            outcome["raised"] = type(exc).__name__

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    while fhir.count(RISK_PUT, "PUT") == 0:
        assert time.monotonic() < deadline, "the write-back never sent its PUT"
        time.sleep(0.01)
    slow.times = slow.hits
    return thread, outcome


def test_an_older_write_back_in_flight_never_lands_after_a_newer_one(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    """The older evaluation's slow PUT used to land last: the EHR kept a HIGH tier the newest data no longer had,
    and nothing wrote the newer one again."""
    pid, first = evaluated(ctx, fhir)
    thread, outcome = in_flight(ctx, fhir, first)
    second = phosphate_falls(ctx, fhir, pid)

    assert run_task(second) == DEFERRED
    assert request_of(ctx, second).status == WritebackStatus.PENDING

    thread.join(10)
    assert all_written(outcome)
    assert sent(ctx)[-1] == (TASK_WRITEBACK, [second], None), "the holder sends the waiting write-back when it ends"
    assert metastatic_tier(fhir, pid) == "high"
    assert run_task(second)["metastatic-calcification"] == "written"
    assert metastatic_tier(fhir, pid) != "high", "the newest evaluation is what the EHR shows"
    assert request_of(ctx, second).status == WritebackStatus.WRITTEN


def test_a_write_back_that_outlived_its_lease_has_the_newest_evaluation_written_again(ctx: MonitorContext, fhir: FakeFhirServer, clock: Clock) -> None:
    """A run slower than its lease (a worker paused, a server far slower than its timeouts) can still land after the
    newer evaluation that took the lease over: the newest one is then written again."""
    pid, first = evaluated(ctx, fhir)
    thread, outcome = in_flight(ctx, fhir, first)
    clock.advance(monitor._patient_lease(ctx.settings) + timedelta(seconds=1))
    second = phosphate_falls(ctx, fhir, pid)

    assert run_task(second)["metastatic-calcification"] == "written"  # the lease had expired: taken over
    thread.join(10)
    assert all_written(outcome)
    assert metastatic_tier(fhir, pid) == "high", "the older PUT landed last"
    assert sent(ctx)[-1] == (TASK_WRITEBACK, [second], None)
    assert request_of(ctx, second).status == WritebackStatus.PENDING

    assert run_task(second)["metastatic-calcification"] == "written"
    assert metastatic_tier(fhir, pid) != "high"
    assert run_task(second) == {"skipped": "already written or superseded"}


def test_a_demanded_resend_writes_every_flag_again_once(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    """The record of the last write may name the newest evaluation while the EHR holds an older one's resource
    (the late PUT's record was written first): a demanded resend writes every flag, unchanged or not."""
    pid, evaluation_id = evaluated(ctx, fhir)
    first = run_task(evaluation_id)
    assert all_written(first)
    puts = fhir.count(RISK_PUT, "PUT")

    def reopened() -> None:
        with session_scope(ctx.sessions) as session:
            Repositories(session).writeback_requests.reopen(evaluation_id, f"Patient/{pid}", next_sweep_at=datetime.now(UTC))

    reopened()
    assert set(run_task(evaluation_id).values()) == {"unchanged"}
    with session_scope(ctx.sessions) as session:
        Repositories(session).writeback_leases.demand_resend(f"Patient/{pid}")
    reopened()
    assert run_task(evaluation_id) == first
    assert fhir.count(RISK_PUT, "PUT") == 2 * puts
    reopened()
    assert set(run_task(evaluation_id).values()) == {"unchanged"}, "the demand is used once"


def test_a_failed_write_back_frees_its_patient_for_the_waiting_one(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    pid, first = evaluated(ctx, fhir)
    thread, outcome = in_flight(ctx, fhir, first, status=422)
    second = phosphate_falls(ctx, fhir, pid)
    assert run_task(second) == DEFERRED

    thread.join(10)
    assert outcome == {"raised": "FhirPermanentError"}
    assert sent(ctx)[-1] == (TASK_WRITEBACK, [second], None), "the failed run sends the waiting write-back"
    assert run_task(second)["metastatic-calcification"] == "written"


# --------------------------------------------------------------------------- the basis is read again before a write


BASIS_CHANGED = {"skipped": "results it rests on changed on the FHIR server; the patient is evaluated again"}


def metastatic_tiers(fhir: FakeFhirServer, pid: str) -> list[str]:
    return [monitor._tier_of(r) for r in risk_assessments(fhir, pid) if r["identifier"][0]["value"].endswith("-metastatic-calcification")]


def evaluated_again(ctx: MonitorContext, pid: str) -> int:
    assert any(name == TASK_EVALUATE and args == [f"Patient/{pid}"] for name, args, _ in sent(ctx)), "the change marked the patient"
    evaluation_id = monitor.evaluate_patient_state(ctx, f"Patient/{pid}")
    assert evaluation_id is not None
    return evaluation_id


@pytest.mark.parametrize("change", ["deleted", "re-coded"])
def test_a_result_deleted_or_re_coded_on_an_r4_server_never_raises_a_flag(ctx: MonitorContext, fhir: FakeFhirServer, change: str) -> None:
    """R4 servers notify no deletion, and the catch-up search (filtered by the mapped codes) never sees a result
    re-coded out of them: the stored phosphate of 7.5 used to be written as a HIGH metastatic calcification flag
    after the EHR had removed it."""
    pid, evaluation_id = evaluated(ctx, fhir)
    if change == "deleted":
        assert fhir.delete("Observation", f"p-{pid}")
    else:
        fhir.put(b.obs("8867-4", 72, "/min", subject=f"Patient/{pid}", rid=f"p-{pid}"))  # corrected: it was a heart rate

    assert run_task(evaluation_id) == BASIS_CHANGED
    assert risk_assessments(fhir, pid) == []
    assert request_of(ctx, evaluation_id).status == WritebackStatus.PENDING, "kept until a newer evaluation supersedes it"

    newer = evaluated_again(ctx, pid)
    assert request_of(ctx, evaluation_id).status == WritebackStatus.SUPERSEDED
    run_task(newer)
    assert "high" not in metastatic_tiers(fhir, pid)
    assert request_of(ctx, newer).status == WritebackStatus.WRITTEN


def test_the_basis_is_read_one_search_per_type_and_an_unchanged_one_is_written(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    _, evaluation_id = evaluated(ctx, fhir)
    fhir.clear_requests()
    assert all_written(run_task(evaluation_id))
    searches = [r for r in fhir.requests if r.method == "GET"]
    assert searches and all(r.param("_id") for r in searches), "only _id searches"
    assert len({r.path for r in searches}) == len(searches), "one per resource type"


def test_a_server_without_id_search_has_the_basis_read_one_by_one(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    pid, evaluation_id = evaluated(ctx, fhir)
    fhir.add_rule(FailureRule(status=400, times=None, path=r"/fhir/(Observation|Condition)$", method="GET"))
    fhir.clear_requests()
    assert all_written(run_task(evaluation_id))
    assert any(r.method == "GET" and r.path == f"/fhir/Observation/p-{pid}" for r in fhir.requests)


def test_confirming_the_basis_can_be_turned_off(ctx: MonitorContext, fhir: FakeFhirServer, monkeypatch: pytest.MonkeyPatch) -> None:
    pid, evaluation_id = evaluated(ctx, fhir)
    monkeypatch.setattr(ctx, "settings", ctx.settings.model_copy(update={"writeback_confirm_basis": False}))
    assert fhir.delete("Observation", f"p-{pid}")
    fhir.clear_requests()
    assert all_written(run_task(evaluation_id)), "written as evaluated"
    assert fhir.requests and {r.method for r in fhir.requests} == {"PUT"}, "nothing read"


def rechecked_by_sweep(ctx: MonitorContext) -> list[int]:
    return resent_by_sweep(ctx, "writebacks_rechecked")


def test_a_written_flag_is_checked_again_daily_and_corrected_when_its_basis_was_deleted(ctx: MonitorContext, fhir: FakeFhirServer, clock: Clock) -> None:
    """Nothing else would ever look again: the patient's data did not change, and the R4 server notifies no deletion."""
    pid, evaluation_id = evaluated(ctx, fhir)
    assert all_written(run_task(evaluation_id))
    clock.advance(timedelta(hours=ctx.settings.writeback_recheck_h - 1))
    assert rechecked_by_sweep(ctx) == []

    clock.advance(timedelta(hours=2))
    assert rechecked_by_sweep(ctx) == [evaluation_id]
    assert rechecked_by_sweep(ctx) == [], "claimed: once per period"
    fhir.clear_requests()
    assert set(run_task(evaluation_id).values()) == {"unchanged"}, "nothing changed: nothing written"
    assert {r.method for r in fhir.requests} == {"GET"}

    assert fhir.delete("Observation", f"p-{pid}")
    clock.advance(timedelta(hours=ctx.settings.writeback_recheck_h + 1))
    assert rechecked_by_sweep(ctx) == [evaluation_id]
    assert run_task(evaluation_id) == BASIS_CHANGED
    run_task(evaluated_again(ctx, pid))
    assert metastatic_tiers(fhir, pid) != ["high"], "the flag the deleted result raised is corrected"


def test_no_recheck_for_a_write_back_on_its_way_or_failed(ctx: MonitorContext, fhir: FakeFhirServer, clock: Clock) -> None:
    pid, first = evaluated(ctx, fhir)
    assert all_written(run_task(first))
    fhir.add_rule(FailureRule(status=422, times=None, path=RISK_PUT, method="PUT"))
    second = phosphate_falls(ctx, fhir, pid)
    assert run_task(second) == {"failed": "FhirPermanentError"}
    clock.advance(timedelta(hours=ctx.settings.writeback_recheck_h + 1))
    assert rechecked_by_sweep(ctx) == [], "failed: it waits for an operator, not for the sweeper"
    assert request_of(ctx, second).status == WritebackStatus.FAILED


# --------------------------------------------------------------------------- review findings (session 11)


def older_landed_last(ctx: MonitorContext, fhir: FakeFhirServer) -> tuple[str, int]:
    """The case a demanded resend exists for: the record of the last write names the newest evaluation, while the
    EHR holds the older evaluation's HIGH resource (its PUT landed last, its record was written first); then what
    :func:`monitor._release` does about it."""
    pid, first = evaluated(ctx, fhir)
    assert all_written(run_task(first))
    second = phosphate_falls(ctx, fhir, pid)
    assert run_task(second)["metastatic-calcification"] == "written"
    with session_scope(ctx.sessions) as session:
        row = Repositories(session).evaluations.get(first)
        assert row is not None
        older = row.assessment["risk_assessments"]
    for resource in older:
        ident = resource["identifier"][0]
        ctx.shared_client().conditional_update("RiskAssessment", ident["system"], ident["value"], resource)
    assert metastatic_tier(fhir, pid) == "high"
    with session_scope(ctx.sessions) as session:
        repos = Repositories(session)
        repos.writeback_leases.demand_resend(f"Patient/{pid}")
        repos.writeback_requests.reopen(second, f"Patient/{pid}", next_sweep_at=datetime.now(UTC))
    return pid, second


def test_a_forced_resend_that_meets_a_transient_error_is_forced_again_on_its_retry(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    """The demand was used up when the lease was taken: the retry found every flag 'unchanged' and the EHR kept
    the older HIGH for good (found by the session 11 review)."""
    pid, second = older_landed_last(ctx, fhir)
    fhir.add_rule(FailureRule(status=503, times=1, path=RISK_PUT, method="PUT"))
    with pytest.raises(FhirTransientError):
        run_task(second, retries=0)
    assert run_task(second, retries=1)["metastatic-calcification"] == "written"
    assert metastatic_tier(fhir, pid) != "high"


def test_a_forced_resend_whose_basis_changed_passes_the_demand_to_the_newer_evaluation(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    pid, second = older_landed_last(ctx, fhir)
    when = (datetime.now(UTC) - timedelta(days=1)).isoformat().replace("+00:00", "Z")
    fhir.put(b.obs(b.CA, 10.0, subject=f"Patient/{pid}", when=when, rid=f"ca-{pid}"))  # a new version, same value
    assert run_task(second) == BASIS_CHANGED
    newer = evaluated_again(ctx, pid)
    assert run_task(newer)["metastatic-calcification"] == "written"
    assert metastatic_tier(fhir, pid) != "high"


def test_patients_whose_newest_write_back_failed_do_not_starve_the_recheck(
    ctx: MonitorContext, fhir: FakeFhirServer, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipped without being claimed, they stayed at the head of the list, and no other flag was checked again."""
    monkeypatch.setattr(monitor, "RECHECK_BATCH", 2)
    rule = fhir.add_rule(FailureRule(status=422, times=0, path=RISK_PUT, method="PUT"))
    for _ in range(2):
        pid, first = evaluated(ctx, fhir)
        assert all_written(run_task(first))
        second = phosphate_falls(ctx, fhir, pid)
        rule.times, rule.hits = None, 0
        assert run_task(second) == {"failed": "FhirPermanentError"}
        rule.times = 0
    clock.advance(timedelta(minutes=1))
    pid, healthy = evaluated(ctx, fhir)
    assert all_written(run_task(healthy))
    rechecked: list[int] = []
    for _ in range(2):
        clock.advance(timedelta(hours=ctx.settings.writeback_recheck_h + 1))
        rechecked += rechecked_by_sweep(ctx)
    assert healthy in rechecked


def test_a_run_whose_basis_read_outlasted_its_lease_writes_nothing_once_another_took_over(
    ctx: MonitorContext, fhir: FakeFhirServer, clock: Clock
) -> None:
    """The lease covered the PUTs but not the reads before them: the older run went on to PUT after the newer one."""
    pid, first = evaluated(ctx, fhir)
    slow = fhir.add_rule(FailureRule(status=None, times=None, latency_s=1.5, path=r"/fhir/Observation$", method="GET"))
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(monitor.write_back(ctx, first)))
    thread.start()
    deadline = time.monotonic() + 10
    while slow.hits == 0:
        assert time.monotonic() < deadline, "the basis was never read"
        time.sleep(0.01)
    slow.times = slow.hits
    clock.advance(monitor._patient_lease(ctx.settings) + timedelta(seconds=1))
    second = phosphate_falls(ctx, fhir, pid)
    assert run_task(second)["metastatic-calcification"] == "written"
    thread.join(10)
    assert outcome == {"skipped": "another write-back of the patient took over before this one wrote; it stays pending"}
    assert metastatic_tier(fhir, pid) != "high"
    assert fhir.count(RISK_PUT, "PUT") == 2, "the newer evaluation's flags only"


def test_a_basis_result_the_server_never_had_is_left_in_the_record_and_the_flag_written(ctx: MonitorContext, fhir: FakeFhirServer) -> None:
    """A record loaded by a backfill of files the server does not hold: 404 with no deletion in its history is not
    a deletion (the integration backfill's cohort lost its data to the first version of the check)."""
    pid, _ = evaluated(ctx, fhir)
    extra = b.obs(b.P, 7.9, subject=f"Patient/{pid}", when=b.ago(hours=2, now=datetime.now(UTC)), rid=f"file-{pid}")
    monitor.backfill(ctx, [extra])  # from a file: never on the server
    newer = monitor.evaluate_patient_state(ctx, f"Patient/{pid}")
    assert newer is not None
    assert all_written(run_task(newer))
    with session_scope(ctx.sessions) as session:
        row = Repositories(session).resources.get("Observation", f"file-{pid}")
        assert row is not None and not row.deleted
    assert metastatic_tier(fhir, pid) == "high"
