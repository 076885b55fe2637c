"""Every accepted notification form, end to end: receiver → ledger → Redis → worker process → stored assessment
→ RiskAssessment written to the FHIR server double (and the refusals: 401, 400, 413 with an OperationOutcome)."""

from __future__ import annotations

import time

import orjson
import pytest

from tests.fakes.fhir_server import FakeFhirServer
from tests.fakes.notifications import EventSpec, make_handshake, make_heartbeat, make_notification_bundle
from tests.integration.conftest import MAX_NOTIFICATION_BYTES
from tests.integration.support import (
    Stack,
    high_risk,
    medplum_signature,
    new_pid,
    risk_of,
    tier_of,
    wait_until,
)

pytestmark = pytest.mark.integration


def assert_high_and_written(stack: Stack, fake: FakeFhirServer, pid: str) -> None:
    """The stored assessment has metastatic calcification ``high`` and the RiskAssessment is on the FHIR server."""
    assessment = stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] == "high")
    assert assessment["patient"] == f"Patient/{pid}"
    assert assessment["renal_context"] == "R2"
    written = wait_until(lambda: risk_of(fake, pid, "metastatic-calcification"), what=f"the RiskAssessment of {pid}")
    assert len(written) == 1
    assert tier_of(written[0]) == "high"
    assert {"reference": f"Patient/{pid}"} == written[0]["subject"]
    assert written[0]["basis"], "basis references are written"


def test_r4_empty_ping_fetches_changes_since_the_watermark(worker_alive: Stack, fake_fhir: FakeFhirServer) -> None:
    stack, pid = worker_alive, new_pid("ping")
    for resource in high_risk(pid):
        fake_fhir.put(resource)
    fake_fhir.clear_requests()

    resp = stack.notify(None, content_type="application/fhir+json")
    assert resp.status_code == 200, resp.text

    assert_high_and_written(stack, fake_fhir, pid)
    observation_gets = fake_fhir.requests_matching(r"/fhir/Observation$", "GET")
    searches = [s for s in observation_gets if not s.param("_id")]  # _id: the write-back reads its basis again
    assert searches and all((s.param("_lastUpdated") or "").startswith("gt") for s in searches)
    assert len(searches) < len(observation_gets), "the basis was read again before the flag was written"
    assert stack.stored("Observation", high_risk_ids(fake_fhir, pid)[0]) is not None


def test_r4_empty_ping_after_a_fetch_ran_is_not_coalesced_into_it(worker_alive: Stack, fake_fhir: FakeFhirServer) -> None:
    """Pings within 5 s share one fetch only while it has not started: a later ping announces a later change."""
    stack, pid = worker_alive, new_pid("ping2")
    patient, condition, calcium, phosphate, albumin = high_risk(pid)
    if time.time() % 5 > 2:  # pings are bucketed by 5 s: start early in a bucket, so both pings share it
        time.sleep(5 - time.time() % 5 + 0.05)
    for resource in (patient, condition, calcium):
        fake_fhir.put(resource)
    assert stack.notify(None).status_code == 200
    wait_until(lambda: stack.stored("Observation", calcium["id"]), what="the first fetch")

    for resource in (phosphate, albumin):  # changed after the first fetch searched
        fake_fhir.put(resource)
    second = stack.notify(None)
    assert second.status_code == 200

    assessment = stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] == "high", timeout=15)
    assert assessment["metastatic_calcification"]["ca_x_p"]["value"] == 75.0


def high_risk_ids(fake: FakeFhirServer, pid: str) -> list[str]:
    return [r["id"] for r in fake.search("Observation", {"subject": f"Patient/{pid}"})]


def test_r4_payload_as_hapi_puts_it(worker_alive: Stack, fake_fhir: FakeFhirServer) -> None:
    stack, pid = worker_alive, new_pid("hapi")
    for resource in fake_fhir.put_all(high_risk(pid)):  # the server notifies what it holds
        resp = stack.notify(resource, path=f"{resource['resourceType']}/{resource['id']}", method="PUT")
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"accepted": 1, "duplicates": 0}
    assert_high_and_written(stack, fake_fhir, pid)


def test_backport_handshake_and_heartbeat_do_no_work(worker_alive: Stack) -> None:
    stack = worker_alive
    sub = new_pid("hs-sub")
    for bundle in (make_handshake(sub), make_heartbeat(sub, events_since_start=0)):
        resp = stack.notify(bundle)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"accepted": 0, "duplicates": 0}
    assert stack.scalar("SELECT count(*) FROM inbound_events WHERE subscription LIKE :s", s=f"%Subscription/{sub}") == 0
    state = stack.rows("SELECT * FROM subscription_state WHERE subscription LIKE :s", s=f"%Subscription/{sub}")
    assert state and state[0]["last_heartbeat_at"] is not None


@pytest.mark.parametrize("content", ["full-resource", "id-only", "empty"])
def test_backport_event_notification(worker_alive: Stack, fake_fhir: FakeFhirServer, content: str) -> None:
    stack, pid = worker_alive, new_pid(f"bp-{content}")
    sub = f"sub-{pid}"
    fake_fhir.add_subscription(sub, content=content)  # type: ignore[arg-type]
    focus_paths = []
    for resource in high_risk(pid):
        stored = fake_fhir.put(resource)
        focus_paths.append(f"/fhir/{stored['resourceType']}/{stored['id']}")
        fake_fhir.record_event(sub, stored if content == "full-resource" else f"{stored['resourceType']}/{stored['id']}")
    bundle = fake_fhir.notification_bundle(sub)
    fake_fhir.clear_requests()

    resp = stack.notify(bundle)
    assert resp.status_code == 200, resp.text
    assert resp.json()["accepted"] == 5

    assert_high_and_written(stack, fake_fhir, pid)
    events = stack.rows("SELECT * FROM inbound_events WHERE subscription LIKE :s ORDER BY event_number", s=f"%Subscription/{sub}")
    assert [e["event_number"] for e in events if e["kind"] == "backport-event"] == [1, 2, 3, 4, 5]
    wait_until(lambda: all(e["status"] == "handled" for e in stack.events(subscription=events[0]["subscription"])),
               what="every event handled")
    reads = [r.path for r in fake_fhir.requests_matching(method="GET") if r.path in focus_paths]
    if content == "full-resource":
        assert reads == [], "a full-resource payload needs no read"
    else:
        assert sorted(set(reads)) == sorted(focus_paths), "the worker read every focus from the FHIR server"
    if content == "empty":
        assert fake_fhir.count(rf"/Subscription/{sub}/\$events$", "GET") >= 1, "asked $events what the events were"


def test_medplum_signed_resources(worker_alive: Stack, fake_fhir: FakeFhirServer) -> None:
    stack, pid = worker_alive, new_pid("medplum")
    for resource in fake_fhir.put_all(high_risk(pid)):  # the server notifies what it holds
        body = orjson.dumps(resource)
        headers = {"X-Medplum-Subscription": "medplum-sub-1", "X-Medplum-Interaction": "update", "X-Signature": medplum_signature(body)}
        resp = stack.notify(body, headers=headers, auth=False, content_type="application/json")
        assert resp.status_code == 200, resp.text
    assert_high_and_written(stack, fake_fhir, pid)


def _outcome(resp: object) -> dict[str, object]:
    body = resp.json()  # type: ignore[attr-defined]
    assert body["resourceType"] == "OperationOutcome"
    return body


def test_refusals(worker_alive: Stack) -> None:
    stack, pid = worker_alive, new_pid("refused")
    before = stack.scalar("SELECT count(*) FROM inbound_events")
    resource = high_risk(pid)[2]
    body = orjson.dumps(resource)

    bad_hmac = stack.notify(body, auth=False, headers={"X-Medplum-Subscription": "s", "X-Signature": "0" * 64})
    assert bad_hmac.status_code == 401
    _outcome(bad_hmac)
    tampered = stack.notify(body + b" ", auth=False, headers={"X-Signature": medplum_signature(body)})
    assert tampered.status_code == 401

    wrong_secret = stack.notify(body, auth=False, headers={"Authorization": "Bearer not-the-secret"})
    assert wrong_secret.status_code == 401
    _outcome(wrong_secret)
    missing = stack.notify(body, auth=False)
    assert missing.status_code == 401

    malformed = stack.notify(b'{"resourceType": "Observation", "id": ', )
    assert malformed.status_code == 400
    _outcome(malformed)
    not_a_notification = stack.notify(make_notification_bundle(subscription="x", events=[EventSpec(1)])
                                      | {"type": "searchset"})
    assert not_a_notification.status_code == 400

    oversized = stack.notify(b" " * (MAX_NOTIFICATION_BYTES + 1))
    assert oversized.status_code == 413
    assert _outcome(oversized)["issue"][0]["code"] == "too-costly"  # type: ignore[index]

    assert stack.scalar("SELECT count(*) FROM inbound_events") == before, "nothing refused reaches the ledger"
    assert stack.assessment(pid) is None
