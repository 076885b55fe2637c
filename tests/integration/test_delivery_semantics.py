"""At-least-once, out-of-order and lossy delivery: duplicates, late older versions, entered-in-error corrections,
Backport event-number gaps and bursts for one patient, each checked on the real end state."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests import builders as b
from tests.fakes.fhir_server import FakeFhirServer
from tests.integration.support import (
    Stack,
    collection,
    esrd,
    high_risk,
    lab,
    new_pid,
    risk_of,
    tier_of,
    wait_until,
)

pytestmark = pytest.mark.integration


def settle(stack: Stack, pid: str, quiet_s: float = 1.5) -> None:
    """Wait until nothing is pending for the patient, then a little longer (a coalescing window) to be sure."""
    wait_until(lambda: stack.settled(pid) and stack.evaluations(pid) > 0, what=f"Patient/{pid} to settle")
    time.sleep(quiet_s)
    wait_until(lambda: stack.settled(pid), what=f"Patient/{pid} to settle")


def test_the_same_event_three_times_is_one_ledger_row_and_one_evaluation(worker_alive: Stack, fake_fhir: FakeFhirServer) -> None:
    stack, pid = worker_alive, new_pid("dup")
    sub = f"sub-{pid}"
    fake_fhir.add_subscription(sub, content="id-only")
    for resource in high_risk(pid):
        stored = fake_fhir.put(resource)
        fake_fhir.record_event(sub, f"{stored['resourceType']}/{stored['id']}")
    bundle = fake_fhir.notification_bundle(sub)

    answers = [stack.notify(bundle) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json() for a in answers] == [{"accepted": 5, "duplicates": 0}, *[{"accepted": 0, "duplicates": 5}] * 2]

    stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] == "high")
    settle(stack, pid)
    rows = stack.rows("SELECT * FROM inbound_events WHERE subscription LIKE :s", s=f"%Subscription/{sub}")
    assert sorted(r["event_number"] for r in rows) == [1, 2, 3, 4, 5]
    assert {r["status"] for r in rows} == {"handled"}
    assert stack.evaluations(pid) == 1
    written = wait_until(lambda: risk_of(fake_fhir, pid, "metastatic-calcification"))
    assert len(written) == 1
    assert len(fake_fhir.versions("RiskAssessment", written[0]["id"])) == 1, "written once"


def test_versions_out_of_order_the_newest_wins(worker_alive: Stack, fake_fhir: FakeFhirServer) -> None:
    stack, pid = worker_alive, new_pid("ooo")
    # The server holds what it notifies: the write-back reads its basis again.
    base = fake_fhir.put_all([b.patient(pid), esrd(pid), lab(pid, b.CA, 10.0), lab(pid, b.ALB, 4.1, "g/dL")])
    assert stack.notify(collection(*base)).status_code == 200
    phosphate = lab(pid, b.P, 7.5)
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    v1, v2, v3 = (
        fake_fhir.put({**phosphate, "valueQuantity": {**phosphate["valueQuantity"], "value": value}}, last_updated=t0 + timedelta(minutes=i))
        for i, value in enumerate((7.5, 7.2, 4.0))
    )
    assert [v["meta"]["versionId"] for v in (v1, v2, v3)] == ["1", "2", "3"]

    for version in (v3, v1, v2):
        resp = stack.notify(version, path=f"Observation/{phosphate['id']}", method="PUT")
        assert resp.status_code == 200, resp.text

    stack.wait_assessment(pid)
    settle(stack, pid)
    row = stack.stored("Observation", phosphate["id"])
    assert row is not None and row["version_id"] == "3"
    assert row["content"]["valueQuantity"]["value"] == 4.0
    assessment = stack.assessment(pid)
    assert assessment is not None
    assert assessment["metastatic_calcification"]["ca_x_p"]["value"] == 40.0
    assert assessment["metastatic_calcification"]["tier"] == "low"
    assert {"reference": f"Observation/{phosphate['id']}", "version": "3"} in assessment["inputs"]
    # Every version is in the ledger (each was accepted), but only v3 changed the state.
    versions = {e["version_id"] for e in stack.events(resource_type="Observation", resource_id=phosphate["id"])}
    assert versions == {"1", "2", "3"}


def test_entered_in_error_retracts_the_fact_and_updates_the_risk_assessment(worker_alive: Stack, fake_fhir: FakeFhirServer) -> None:
    stack, pid = worker_alive, new_pid("eie")
    resources = fake_fhir.put_all(high_risk(pid))  # the server notifies what it holds (version 1)
    phosphate = resources[3]
    assert phosphate["code"]["coding"][0]["code"] == b.P
    for r in resources:
        assert stack.notify(r, path=f"{r['resourceType']}/{r['id']}", method="PUT").status_code == 200
    stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] == "high")
    first = wait_until(lambda: [r for r in risk_of(fake_fhir, pid, "metastatic-calcification") if tier_of(r) == "high"])
    evaluations_before = stack.evaluations(pid)

    corrected = fake_fhir.put({**phosphate, "status": "entered-in-error"})  # version 2
    assert stack.notify(corrected, path=f"Observation/{phosphate['id']}", method="PUT").status_code == 200

    after = stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] != "high")
    assert after["metastatic_calcification"]["ca_x_p"] is None
    assert {"reference": f"Observation/{phosphate['id']}", "reason": "status entered-in-error"} in after["excluded"]
    assert stack.evaluations(pid) == evaluations_before + 1
    new_tier = after["metastatic_calcification"]["tier"]

    def updated() -> list[dict[str, Any]]:
        found = risk_of(fake_fhir, pid, "metastatic-calcification")
        return [r for r in found if tier_of(r) == new_tier]

    current = wait_until(updated, what="the RiskAssessment to be updated")
    assert len(risk_of(fake_fhir, pid, "metastatic-calcification")) == 1, "updated, not duplicated"
    assert current[0]["id"] == first[0]["id"]
    assert [v["meta"]["versionId"] for v in fake_fhir.versions("RiskAssessment", first[0]["id"]) if v] == ["1", "2"]
    assert f"Observation/{phosphate['id']}" not in {x["reference"] for x in current[0].get("basis", [])}
    for flag in ("calciphylaxis", "metastatic-calcification"):
        assert len(risk_of(fake_fhir, pid, flag)) == 1


def test_a_deletion_delivered_as_hapi_does_retracts_the_fact(worker_alive: Stack) -> None:
    stack, pid = worker_alive, new_pid("del")
    resources = high_risk(pid)
    phosphate = resources[3]
    assert stack.notify(collection(*resources)).status_code == 200
    stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] == "high")

    resp = stack.notify(None, path=f"Observation/{phosphate['id']}", method="DELETE")
    assert resp.status_code == 200, resp.text

    after = stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] != "high")
    assert after["metastatic_calcification"]["ca_x_p"] is None
    assert f"Observation/{phosphate['id']}" not in {i["reference"] for i in after["inputs"]}
    row = stack.stored("Observation", phosphate["id"])
    assert row is not None and row["deleted"] is True


def test_event_number_gap_is_recovered_with_events_operation(worker_alive: Stack, fake_fhir: FakeFhirServer) -> None:
    stack, pid = worker_alive, new_pid("gap")
    sub = f"sub-{pid}"
    fake_fhir.add_subscription(sub, content="id-only")
    patient, condition, calcium, phosphate, albumin = high_risk(pid)
    refs = []
    for resource in (patient, condition, calcium, phosphate, albumin):  # events 3 and 4 are the Ca and P results
        stored = fake_fhir.put(resource)
        refs.append(f"{stored['resourceType']}/{stored['id']}")
        fake_fhir.record_event(sub, refs[-1])
    fake_fhir.clear_requests()

    assert stack.notify(fake_fhir.notification_bundle(sub, [1, 2])).status_code == 200
    assert stack.notify(fake_fhir.notification_bundle(sub, [5])).status_code == 200  # 3 and 4 never delivered

    assessment = stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] == "high")
    assert assessment["metastatic_calcification"]["ca_x_p"]["value"] == 75.0
    calls = fake_fhir.requests_matching(rf"/Subscription/{sub}/\$events$")
    assert calls and calls[0].param("eventsSinceNumber") == "3" and calls[0].param("eventsUntilNumber") == "4"
    for ref in refs[2:4]:
        assert fake_fhir.count(rf"/fhir/{ref}$", "GET") >= 1
        rtype, rid = ref.split("/")
        assert stack.stored(rtype, rid) is not None
    rows = stack.rows("SELECT * FROM inbound_events WHERE subscription LIKE :s", s=f"%Subscription/{sub}")
    assert sorted(r["event_number"] for r in rows if r["kind"] == "backport-event") == [1, 2, 3, 4, 5]
    recovery = [r for r in rows if r["kind"] == "recovery"]
    assert len(recovery) == 1 and recovery[0]["payload"] == {"missing": [3, 4]}
    wait_until(lambda: stack.event(recovery[0]["id"])["status"] == "handled")


def test_heartbeat_reveals_missed_events(worker_alive: Stack, fake_fhir: FakeFhirServer) -> None:
    stack, pid = worker_alive, new_pid("hb")
    sub = f"sub-{pid}"
    fake_fhir.add_subscription(sub, content="full-resource")
    for resource in high_risk(pid):
        fake_fhir.record_event(sub, fake_fhir.put(resource))
    assert stack.notify(fake_fhir.notification_bundle(sub, [1, 2, 3])).status_code == 200
    heartbeat = fake_fhir.notification_bundle(sub, [])
    params = heartbeat["entry"][0]["resource"]["parameter"]
    next(p for p in params if p["name"] == "type")["valueCode"] = "heartbeat"
    assert stack.notify(heartbeat).status_code == 200  # events-since-subscription-start = 5: 4 and 5 were lost

    stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] == "high")
    assert fake_fhir.count(rf"/Subscription/{sub}/\$events$") >= 1


def test_a_panel_of_twenty_results_is_evaluated_once_or_twice(worker_alive: Stack) -> None:
    stack, pid = worker_alive, new_pid("panel")
    codes = [(b.CA, 9.0, "mg/dL"), (b.P, 4.5, "mg/dL"), (b.ALB, 4.0, "g/dL"), (b.PTH, 300, "pg/mL")]
    panel = [lab(pid, code, value, unit, days=1 + i / 10) for i in range(5) for code, value, unit in codes]
    assert len(panel) == 20

    def send(resource: dict[str, object]) -> int:
        return stack.notify(resource, path=f"Observation/{resource['id']}", method="PUT").status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        assert list(pool.map(send, panel)) == [200] * 20

    assessment = stack.wait_assessment(pid, lambda a: len(a["inputs"]) == 20)
    settle(stack, pid)
    assert 1 <= stack.evaluations(pid) <= 2
    assert {i["reference"] for i in assessment["inputs"]} == {f"Observation/{r['id']}" for r in panel}
    assert int(stack.scalar("SELECT count(*) FROM patient_resources WHERE patient_ref = :p", p=f"Patient/{pid}")) == 20
