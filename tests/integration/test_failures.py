"""Failures the pipeline must survive: a worker SIGKILLed mid-task, Redis restarted mid-stream, a FHIR server
answering 503, a poison message (failed, visible with ``calcinosis-cds events --failed``, replayable), and an EHR
refusing write-backs for longer than the task retries."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from tests.fakes.fhir_server import FailureRule, FakeFhirServer
from tests.integration.support import (
    Stack,
    collection,
    high_risk,
    new_pid,
    redis_stopped,
    risk_of,
    run_cli,
    tier_of,
    wait_until,
)

pytestmark = pytest.mark.integration


def id_only_patient(fake: FakeFhirServer, pid: str) -> tuple[str, dict[str, object], str]:
    """Resources of a high-risk patient on the FHIR server and an id-only subscription with one event each;
    returns the subscription id, its notification Bundle and the phosphate result's id (event 4)."""
    sub = f"sub-{pid}"
    fake.add_subscription(sub, content="id-only")
    ids = []
    for resource in high_risk(pid):
        stored = fake.put(resource)
        ids.append(stored["id"])
        fake.record_event(sub, f"{stored['resourceType']}/{stored['id']}")
    return sub, fake.notification_bundle(sub), ids[3]


def event_for(stack: Stack, sub: str, number: int) -> dict[str, Any]:
    rows = stack.rows("SELECT * FROM inbound_events WHERE subscription LIKE :s AND event_number = :n",
                      s=f"%Subscription/{sub}", n=number)
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize("victim", ["pool-process", "whole-worker"])
def test_worker_sigkilled_mid_task_the_event_is_still_processed(worker_alive: Stack, fake_fhir: FakeFhirServer, victim: str) -> None:
    stack, pid = worker_alive, new_pid(f"kill-{victim}")
    sub, bundle, phosphate_id = id_only_patient(fake_fhir, pid)
    path = rf"/fhir/Observation/{phosphate_id}$"
    fake_fhir.add_rule(FailureRule(status=None, latency_s=8.0, times=1, path=path, method="GET"))  # a slow read

    assert stack.notify(bundle).status_code == 200
    wait_until(lambda: fake_fhir.count(path, "GET") >= 1, what="the worker to start reading the focus")
    assert event_for(stack, sub, 4)["status"] == "processing"
    worker = stack.workers[0]
    if victim == "pool-process":
        children = worker.children()
        assert children, "a prefork worker has a pool process"
        os.kill(children[0], signal.SIGKILL)  # acks_late + reject_on_worker_lost: the message goes back
    else:
        worker.kill()  # the whole worker: the message stays unacknowledged in Redis, the sweeper re-enqueues
        stack.workers.remove(worker)
        stack.start_worker()

    assessment = stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] == "high", timeout=40)
    assert assessment["metastatic_calcification"]["ca_x_p"]["value"] == 75.0
    event = wait_until(lambda: (e := event_for(stack, sub, 4))["status"] == "handled" and e, what="the event handled")
    assert event["attempts"] >= 2, "claimed again after the kill"
    assert fake_fhir.count(path, "GET") >= 2
    assert all(w.alive() for w in stack.workers)


def test_redis_restarted_mid_stream_loses_nothing(worker_alive: Stack) -> None:
    stack = worker_alive
    pids = [new_pid(f"redis{i}") for i in range(8)]
    bundles = {pid: collection(*high_risk(pid)) for pid in pids}

    for pid in pids[:4]:
        assert stack.notify(bundles[pid]).status_code == 200
    refused: list[str] = []
    with redis_stopped():
        for pid in pids[4:]:
            resp = stack.notify(bundles[pid])
            assert resp.status_code == 503, resp.text  # so the FHIR server retries
            assert resp.json()["resourceType"] == "OperationOutcome"
            refused.append(pid)
    for pid in refused:  # the FHIR server's retry
        resp = stack.notify(bundles[pid])
        assert resp.status_code == 200, resp.text

    for pid in pids:
        assessment = stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] == "high", timeout=60)
        assert assessment["patient"] == f"Patient/{pid}"
    assert all(w.alive() for w in stack.workers)
    assert stack.beat is not None and stack.beat.alive()


def test_fhir_server_503_then_200_is_retried_and_done(worker_alive: Stack, fake_fhir: FakeFhirServer) -> None:
    stack, pid = worker_alive, new_pid("retry")
    sub, bundle, phosphate_id = id_only_patient(fake_fhir, pid)
    path = rf"/fhir/Observation/{phosphate_id}$"
    # The client retries once by itself (CDS_FHIR_MAX_RETRIES=1): three 503s also need a task retry.
    fake_fhir.fail_next(3, status=503, path=path, method="GET")

    assert stack.notify(bundle).status_code == 200

    stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] == "high")
    event = wait_until(lambda: (e := event_for(stack, sub, 4))["status"] == "handled" and e)
    assert event["attempts"] == 2
    assert "FhirTransientError" in str(event["last_error"])
    assert fake_fhir.count(path, "GET") == 4


def test_poison_message_is_failed_visible_and_replayable(worker_alive: Stack, fake_fhir: FakeFhirServer) -> None:
    stack, pid = worker_alive, new_pid("poison")
    sub, bundle, phosphate_id = id_only_patient(fake_fhir, pid)
    path = rf"/fhir/Observation/{phosphate_id}$"
    rule = fake_fhir.add_rule(FailureRule(status=400, times=None, path=path, method="GET"))

    assert stack.notify(bundle).status_code == 200
    event = wait_until(lambda: (e := event_for(stack, sub, 4))["status"] == "failed" and e, what="the event to fail")
    assert event["attempts"] == 1, "a permanent error is not retried"
    assert "400" in str(event["last_error"])

    listed = run_cli(["events", "--failed"], stack.env)
    assert listed.returncode == 0, listed.stderr
    assert f"Observation/{phosphate_id}" in listed.stdout
    line = next(line for line in listed.stdout.splitlines() if f"Observation/{phosphate_id}" in line)
    assert str(event["id"]) in line.split()[:3]
    counts = run_cli(["events"], stack.env)
    assert counts.returncode == 0 and "failed" in counts.stdout

    # The other events were fine: the patient is evaluated without the phosphate (no Ca×P product).
    partial = stack.wait_assessment(pid)
    assert partial["metastatic_calcification"]["ca_x_p"] is None

    rule.times = 0  # the FHIR server is fixed
    replayed = run_cli(["events", "replay", str(event["id"])], stack.env)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == f"replayed 1 event(s): {event['id']}"

    wait_until(lambda: event_for(stack, sub, 4)["status"] == "handled", what="the replayed event handled")
    stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] == "high")
    after = run_cli(["events", "--failed"], stack.env)
    assert f"Observation/{phosphate_id}" not in after.stdout


def test_a_write_back_failing_longer_than_its_retries_is_visible_then_written_by_the_sweeper(worker_alive: Stack, fake_fhir: FakeFhirServer) -> None:
    """The EHR answers 503 to RiskAssessment writes past the task's retries: the write-back is failed (listed by
    ``events --failed``), and once the EHR is back the sweeper (beat) sends it again: no operator needed."""
    stack, pid = worker_alive, new_pid("wb-outage")
    rule = fake_fhir.add_rule(FailureRule(status=503, times=None, path=r"/fhir/RiskAssessment$", method="PUT"))
    try:
        assert stack.notify(collection(*fake_fhir.put_all(high_risk(pid)))).status_code == 200

        def failed() -> dict[str, Any] | None:
            rows = stack.rows("SELECT * FROM writeback_requests WHERE patient_ref = :p AND status = 'failed'", p=f"Patient/{pid}")
            return rows[0] if rows else None

        request = wait_until(failed, timeout=60, what="the write-back to fail after its retries")
        assert request["transient"] and request["last_error"] == "FhirTransientError: HTTP 503"
        listed = run_cli(["events", "--failed"], stack.env)
        assert listed.returncode == 0, listed.stderr
        assert f"Patient/{pid}" in listed.stdout
        assert risk_of(fake_fhir, pid, "metastatic-calcification") == []
    finally:
        rule.times = 0  # the EHR is back

    written = wait_until(lambda: risk_of(fake_fhir, pid, "metastatic-calcification"), timeout=60, what="the write-back sent again by the sweeper")
    assert tier_of(written[0]) == "high"
    row = wait_until(
        lambda: (r := stack.rows("SELECT * FROM writeback_requests WHERE evaluation_id = :e", e=request["evaluation_id"])[0])["status"] == "written" and r
    )
    assert row["sweeps"] >= 1
