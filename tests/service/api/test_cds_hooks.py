"""The CDS Hooks routes driven the way an EHR (or the CDS Hooks Sandbox) drives them.

Most calls go through FastAPI's TestClient; the prefetch fallback goes over real HTTP to a fake FHIR
server, since that is where the service's own HTTP client (timeouts, headers, failures) is exercised.
"""

from __future__ import annotations

import io
import sys
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient

from service.cds.discovery import MAX_TEMPLATE_LENGTH
from tests import builders as b
from tests.fakes.fhir_server import FailureRule, FakeFhirServer
from tests.integration.support import metric_samples
from tests.pki import Pki
from tests.schema import assert_valid
from tests.service.api.conftest import FHIR_TOKEN, TESTSERVER
from tests.service.api.support import (
    CALCIUM_ACETATE,
    ENCOUNTER,
    ORDER_SELECT,
    ORDER_SIGN,
    RISK,
    SEVELAMER,
    WARFARIN,
    Issuer,
    PatientData,
    closed_port_url,
    draft_order,
    empty_elements,
    high_risk_dialysis_patient,
    hook_request,
    non_renal_patient,
    sandbox_draft_orders,
    serve_in_thread,
    shifted,
    topics,
)

EXPECTED_SERVICES = {
    "calcinosis-risk": "patient-view",
    "calcinosis-encounter": "encounter-start",
    "calcinosis-order-select": "order-select",
    "calcinosis-order-sign": "order-sign",
}
REQUIRED = ("observations", "conditions", "medicationRequests")


def call(client: TestClient, service: str, body: Any, **kwargs: Any) -> httpx.Response:
    return client.post(f"/cds-services/{service}", json=body, **kwargs)


def ok_cards(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert_valid(document, "CDSResponse")
    assert empty_elements(document) == [], "responses never carry null, empty arrays or empty strings"
    return document


def assert_operation_outcome(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    document = response.json()
    assert document["resourceType"] == "OperationOutcome"
    assert document["issue"] and document["issue"][0]["severity"] in ("error", "fatal")
    return document


def fake_holds(srv: FakeFhirServer, data: PatientData) -> None:
    srv.put_all(data.resources())


# --- discovery ----------------------------------------------------------------------------------
def test_discovery_lists_the_four_services_with_short_prefetch_templates(signed_client: TestClient) -> None:
    response = signed_client.get("/cds-services")
    assert response.status_code == 200
    document = response.json()
    assert_valid(document, "DiscoveryResponse")
    assert {s["id"]: s["hook"] for s in document["services"]} == EXPECTED_SERVICES
    for service in document["services"]:
        assert service["description"] and service["title"]
        assert service["usageRequirements"]
        prefetch = service["prefetch"]
        assert set(REQUIRED) <= prefetch.keys()
        for key, template in prefetch.items():
            assert len(template) < MAX_TEMPLATE_LENGTH, key
            assert "{{context.patientId}}" in template
    assert empty_elements(document) == []


def test_discovery_accepts_the_sandbox_jwt_and_a_preflight(signed_client: TestClient, issuer: Issuer) -> None:
    # The Sandbox sends a JWT and an Origin on discovery too; discovery is public, so both are fine.
    headers = {"Origin": "https://sandbox.cds-hooks.org", **issuer.bearer(f"{TESTSERVER}/cds-services")}
    response = signed_client.get("/cds-services", headers=headers)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "https://sandbox.cds-hooks.org")


# --- full prefetch ------------------------------------------------------------------------------
def test_full_prefetch_high_risk_dialysis_patient_gets_a_calciphylaxis_warning(dev_client: TestClient) -> None:
    patient = high_risk_dialysis_patient()
    document = ok_cards(call(dev_client, RISK, hook_request(RISK, patient.pid, prefetch=patient.prefetch())))
    cards = {c["source"]["topic"]["code"]: c for c in document["cards"]}
    assert "calciphylaxis-risk" in cards
    card = cards["calciphylaxis-risk"]
    assert card["indicator"] == "warning"
    assert "HIGH" in card["summary"].upper()
    assert card["uuid"] and card["overrideReasons"]
    assert "M1" in card["detail"] and "M3" in card["detail"]


def logged_calls(
    monkeypatch: pytest.MonkeyPatch, client: TestClient, *calls: dict[str, Any]
) -> tuple[list[httpx.Response], list[dict[str, Any]]]:
    """Each call's response and its ``cds_hook`` log line (logging writes to the standard error of the moment)."""
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    responses = [call(client, RISK, **kwargs) for kwargs in calls]
    lines = [orjson.loads(line) for line in captured.getvalue().splitlines() if line.startswith("{")]
    return responses, [line for line in lines if line.get("event") == "cds_hook"]


def hook_log_lines(monkeypatch: pytest.MonkeyPatch, client: TestClient, *calls: dict[str, Any]) -> list[dict[str, Any]]:
    return logged_calls(monkeypatch, client, *calls)[1]


def test_only_an_accepted_unsigned_call_is_logged_as_one(
    monkeypatch: pytest.MonkeyPatch, dev_client: TestClient, signed_client: TestClient
) -> None:
    patient = high_risk_dialysis_patient()
    body = hook_request(RISK, patient.pid, prefetch=patient.prefetch())
    [accepted, refused] = hook_log_lines(monkeypatch, dev_client, {"body": body}, {"body": body, "headers": {"Authorization": "Bearer not-a-jwt"}})
    assert (accepted["status"], refused["status"]) == (200, 401)
    assert accepted["dev_mode"] == "UNAUTHENTICATED CALL ACCEPTED (development mode)"
    assert "dev_mode" not in refused, "a refused call was not accepted"
    [production] = hook_log_lines(monkeypatch, signed_client, {"body": body})
    assert production["status"] == 401 and "dev_mode" not in production


def test_full_prefetch_at_encounter_start(dev_client: TestClient) -> None:
    patient = high_risk_dialysis_patient()
    body = hook_request(ENCOUNTER, patient.pid, prefetch=patient.prefetch(), encounterId="enc-1")
    document = ok_cards(call(dev_client, ENCOUNTER, body))
    assert "calciphylaxis-risk" in topics(document)


def test_full_prefetch_low_risk_patient_gets_no_card(dev_client: TestClient) -> None:
    patient = non_renal_patient()
    document = ok_cards(call(dev_client, RISK, hook_request(RISK, patient.pid, prefetch=patient.prefetch())))
    assert document == {"cards": []}


def esrd_patient_without_labs(pid: str = "p3") -> PatientData:
    """ESRD and no recent calcium or phosphate: the calciphylaxis and metastatic cards both suggest a renal panel."""
    esrd = {**shifted(b.esrd()), "subject": {"reference": f"Patient/{pid}"}}
    return PatientData(pid=pid, patient=b.patient(pid), observations=[], conditions=[esrd], medication_requests=[])


def all_uuids(document: dict[str, Any]) -> list[str]:
    """The uuids of a response's cards, then of their suggestions."""
    return [c["uuid"] for c in document["cards"]] + [s["uuid"] for c in document["cards"] for s in c.get("suggestions", [])]


def without_uuids(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**c, "uuid": None, "suggestions": [{**s, "uuid": None} for s in c.get("suggestions", [])]} for c in document["cards"]]


def test_card_uuids_are_those_of_the_call(dev_client: TestClient) -> None:
    """The same request again (a retry) has the same uuids; another call (its own hookInstance, another user) gets
    the same cards under uuids of their own, cards and suggestions, so each call's feedback is its own."""
    patient = esrd_patient_without_labs()  # cards with suggestions
    body = hook_request(RISK, patient.pid, prefetch=patient.prefetch())
    first = ok_cards(call(dev_client, RISK, body))
    assert any("suggestions" in c for c in first["cards"])
    assert ok_cards(call(dev_client, RISK, body)) == first
    other = {**body, "hookInstance": str(uuid.uuid4()), "context": {**body["context"], "userId": "Practitioner/pr2"}}
    second = ok_cards(call(dev_client, RISK, other))
    assert not set(all_uuids(first)) & set(all_uuids(second))
    assert without_uuids(first) == without_uuids(second)


# --- prefetch fallback over real HTTP -----------------------------------------------------------
def test_partial_prefetch_fetches_the_missing_keys_with_the_ehr_token(dev_client: TestClient, fhir: FakeFhirServer) -> None:
    patient = high_risk_dialysis_patient()
    fake_holds(fhir, patient)
    prefetch = {"patient": patient.patient, "observations": patient.prefetch()["observations"]}
    body = hook_request(RISK, patient.pid, prefetch=prefetch, fhir_server=fhir.base_url, token=FHIR_TOKEN)
    document = ok_cards(call(dev_client, RISK, body))
    card = next(c for c in document["cards"] if c["source"]["topic"]["code"] == "calciphylaxis-risk")
    assert card["indicator"] == "warning"  # ESRD and warfarin came from the FHIR server

    seen = fhir.requests
    assert seen, "the service did not call the FHIR server"
    assert all(r.headers.get("authorization") == f"Bearer {FHIR_TOKEN}" for r in seen)
    for path in ("/fhir/Condition", "/fhir/MedicationRequest"):
        queries = [r for r in seen if r.path == path]
        assert len(queries) == 1, path
        assert queries[0].param("patient") == patient.pid
    assert fhir.count(r"/fhir/Observation") == 0, "a key that was prefetched is not fetched again"
    assert fhir.count(r"/fhir/Patient") == 0


def test_null_prefetch_keys_mean_no_data_and_are_not_fetched(dev_client: TestClient, fhir: FakeFhirServer) -> None:
    patient = high_risk_dialysis_patient()
    fake_holds(fhir, patient)
    prefetch = {
        "patient": patient.patient,
        "observations": patient.prefetch()["observations"],
        "conditions": None,
        "medicationRequests": None,
        "medicationStatements": None,
        "medicationAdministrations": None,
        "procedures": None,
    }
    body = hook_request(RISK, patient.pid, prefetch=prefetch, fhir_server=fhir.base_url, token=FHIR_TOKEN)
    document = ok_cards(call(dev_client, RISK, body))
    assert fhir.requests == []
    # Without the ESRD condition and warfarin the patient is no longer in a renal context on warfarin.
    assert all("R2" not in c["summary"] for c in document["cards"])


def test_an_operation_outcome_in_a_prefetch_key_is_refetched(dev_client: TestClient, fhir: FakeFhirServer) -> None:
    patient = high_risk_dialysis_patient()
    fake_holds(fhir, patient)
    prefetch = patient.prefetch()
    prefetch["conditions"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout", "diagnostics": "prefetch timed out"}],
    }
    body = hook_request(RISK, patient.pid, prefetch=prefetch, fhir_server=fhir.base_url, token=FHIR_TOKEN)
    document = ok_cards(call(dev_client, RISK, body))
    assert "calciphylaxis-risk" in topics(document)
    assert [r.path for r in fhir.requests] == ["/fhir/Condition"]
    assert fhir.requests[0].param("patient") == patient.pid


def test_unreachable_fhir_server_for_required_keys_is_412(dev_client: TestClient) -> None:
    patient = high_risk_dialysis_patient()
    body = hook_request(RISK, patient.pid, prefetch={"patient": patient.patient}, fhir_server=closed_port_url(), token=FHIR_TOKEN)
    document = assert_operation_outcome(call(dev_client, RISK, body), 412)
    assert document["issue"][0]["code"] == "incomplete"
    assert FHIR_TOKEN not in orjson.dumps(document).decode()


def test_fhir_server_error_on_a_required_key_is_412(dev_client: TestClient, fhir: FakeFhirServer) -> None:
    patient = high_risk_dialysis_patient()
    fake_holds(fhir, patient)
    fhir.add_rule(FailureRule(status=500, times=None, path=r"^/fhir/Condition"))
    prefetch = patient.prefetch()
    del prefetch["conditions"]
    body = hook_request(RISK, patient.pid, prefetch=prefetch, fhir_server=fhir.base_url, token=FHIR_TOKEN)
    assert_operation_outcome(call(dev_client, RISK, body), 412)
    assert fhir.count(r"^/fhir/Condition") >= 1


def test_fhir_server_error_on_an_optional_key_still_answers_with_cards(dev_client: TestClient, fhir: FakeFhirServer) -> None:
    patient = high_risk_dialysis_patient()
    fake_holds(fhir, patient)
    fhir.add_rule(FailureRule(status=500, times=None, path=r"^/fhir/Procedure"))
    prefetch = patient.prefetch()
    del prefetch["procedures"]
    body = hook_request(RISK, patient.pid, prefetch=prefetch, fhir_server=fhir.base_url, token=FHIR_TOKEN)
    document = ok_cards(call(dev_client, RISK, body))
    assert "calciphylaxis-risk" in topics(document)
    assert fhir.count(r"^/fhir/Procedure") >= 1


def test_missing_required_keys_without_fhir_server_is_412(dev_client: TestClient) -> None:
    patient = high_risk_dialysis_patient()
    body = hook_request(RISK, patient.pid, prefetch={"observations": patient.prefetch()["observations"]})
    assert_operation_outcome(call(dev_client, RISK, body), 412)


def test_http_fhir_server_is_refused_outside_development_mode(
    make_client: Callable[..., TestClient], issuer: Issuer, fhir: FakeFhirServer
) -> None:
    # Even when its host is allowed: outside development mode the fhirServer must be https (no token over clear text).
    client = make_client(dev_mode=False, fhir_server_allowlist=[fhir.base_url.replace("http://", "https://", 1)])
    patient = high_risk_dialysis_patient()
    fake_holds(fhir, patient)
    body = hook_request(RISK, patient.pid, prefetch={"patient": patient.patient}, fhir_server=fhir.base_url, token=FHIR_TOKEN)
    response = call(client, RISK, body, headers=issuer.bearer(f"{TESTSERVER}/cds-services/{RISK}"))
    assert_operation_outcome(response, 412)
    assert fhir.requests == [], "the service never sends the EHR's token to a refused server"


@pytest.mark.parametrize("trusted", [True, False], ids=["internal-ca-configured", "default-trust"])
def test_https_fhir_server_on_an_internal_ca(make_client: Callable[..., TestClient], issuer: Issuer, pki: Pki, trusted: bool) -> None:
    """Production settings, a signed call, an allowlisted https fhirServer whose certificate a hospital CA issued:
    cards with CDS_TLS_CA_FILE naming that CA; without it the certificate is refused and the call is a 412."""
    with FakeFhirServer(required_token=FHIR_TOKEN, tls=pki.server_context()) as srv:
        patient = high_risk_dialysis_patient()
        fake_holds(srv, patient)
        client = make_client(dev_mode=False, fhir_server_allowlist=[srv.base_url], tls_ca_file=pki.ca_file if trusted else None)
        body = hook_request(RISK, patient.pid, fhir_server=srv.base_url, token=FHIR_TOKEN)
        response = call(client, RISK, body, headers=issuer.bearer(f"{TESTSERVER}/cds-services/{RISK}"))
        if trusted:
            assert "calciphylaxis-risk" in topics(ok_cards(response))
            assert srv.count(r"/fhir/Observation") == 1
        else:
            outcome = assert_operation_outcome(response, 412)
            # what an on-call engineer needs to see: which check failed, not a bare ConnectError
            assert "TLS certificate not trusted: unable to get local issuer certificate" in outcome["issue"][0]["diagnostics"]
            assert srv.requests == [], "no request reached the server over an untrusted connection"
        assert not srv.errors, "\n".join(srv.errors)


def test_fallback_over_real_http_end_to_end(make_app: Callable[..., Any], fhir: FakeFhirServer) -> None:
    """EHR → service → FHIR server, every hop over a real socket (uvicorn in a thread)."""
    patient = high_risk_dialysis_patient()
    fake_holds(fhir, patient)
    with serve_in_thread(make_app(dev_mode=True)) as origin:
        body = hook_request(RISK, patient.pid, fhir_server=fhir.base_url, token=FHIR_TOKEN)
        response = httpx.post(f"{origin}/cds-services/{RISK}", json=body, timeout=15)
    document = ok_cards(response)
    assert "calciphylaxis-risk" in topics(document)
    paths = {r.path for r in fhir.requests}
    assert {"/fhir/Patient/p1", "/fhir/Observation", "/fhir/Condition", "/fhir/MedicationRequest"} <= paths
    observation_query = next(r for r in fhir.requests if r.path == "/fhir/Observation")
    assert observation_query.param("patient") == patient.pid
    assert "http://loinc.org|" in (observation_query.param("code") or "")


def _first_page(fhir: FakeFhirServer, resource_type: str, pid: str, count: int, *, paged: bool = True) -> dict[str, Any]:
    """A searchset as an EHR that pages its prefetch sends it: the first ``count`` entries and a ``next`` link."""
    page = httpx.get(
        f"{fhir.base_url}/{resource_type}", params={"patient": pid, "_count": count}, headers={"Authorization": f"Bearer {FHIR_TOKEN}"}
    ).json()
    assert len(page["entry"]) == count
    assert any(link["relation"] == "next" for link in page.get("link", [])) == paged
    return page


def test_a_paged_prefetch_is_completed_from_the_fhir_server(dev_client: TestClient, fhir: FakeFhirServer) -> None:
    """CDS Hooks 2.0 allows prefetch results to be paged: the pages after the first come from fhirServer, with the
    EHR's token, and the cards are those of the whole record."""
    patient = high_risk_dialysis_patient()
    fake_holds(fhir, patient)
    count = len(patient.observations)
    unpaged = {**patient.prefetch(), "observations": _first_page(fhir, "Observation", patient.pid, count, paged=False)}
    whole = ok_cards(call(dev_client, RISK, hook_request(RISK, patient.pid, prefetch=unpaged)))
    prefetch = {**patient.prefetch(), "observations": _first_page(fhir, "Observation", patient.pid, 1)}
    fhir.clear_requests()
    paged = ok_cards(call(dev_client, RISK, hook_request(RISK, patient.pid, prefetch=prefetch, fhir_server=fhir.base_url, token=FHIR_TOKEN)))
    assert without_uuids(paged) == without_uuids(whole)  # two calls: the same cards, each call's uuids
    pages = fhir.requests_matching(path="/fhir/Observation")
    assert len(pages) == count - 1  # one request per later page, none for the first
    assert all(r.headers.get("authorization") == f"Bearer {FHIR_TOKEN}" for r in fhir.requests)
    assert not fhir.requests_matching(path="/fhir/Condition") and not fhir.requests_matching(path="/fhir/MedicationRequest")


def test_a_paged_prefetch_without_a_fhir_server_is_evaluated_from_its_first_page(
    monkeypatch: pytest.MonkeyPatch, dev_client: TestClient, fhir: FakeFhirServer
) -> None:
    """The first page is data the EHR gave: answered from it (not 412), as far as it goes, and the log line says
    which key was cut."""
    patient = high_risk_dialysis_patient()
    fake_holds(fhir, patient)
    prefetch = {**patient.prefetch(), "observations": _first_page(fhir, "Observation", patient.pid, 1)}
    fhir.clear_requests()
    responses, [complete, line] = logged_calls(
        monkeypatch,
        dev_client,
        {"body": hook_request(RISK, patient.pid, prefetch=patient.prefetch())},
        {"body": hook_request(RISK, patient.pid, prefetch=prefetch)},
    )
    whole, first_page_only = (ok_cards(r) for r in responses)
    assert fhir.requests == []
    assert first_page_only != whole and "calciphylaxis-risk" in topics(first_page_only)
    assert line["data_gaps"] == ["prefetch observations is paged; the pages after the first were not fetched (no fhirServer was given)"]
    assert "data_gaps" not in complete


def test_an_unknown_service_id_is_never_echoed_in_the_answer_the_log_or_the_metrics(monkeypatch: pytest.MonkeyPatch, signed_client: TestClient) -> None:
    """The path segment is the caller's text (a patient's name, say): the 404 says "unknown CDS service", and the log
    line and metric labels carry the fixed value "unknown" (an unbounded label would also grow the metrics)."""
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    patient = high_risk_dialysis_patient()
    segment = "John%20Smith%20MRN%20123"
    feedback = {"feedback": [{"card": "c1", "outcome": "accepted", "outcomeTimestamp": "2026-01-01T00:00:00Z"}]}
    responses = [
        signed_client.post(f"/cds-services/{segment}", json=hook_request(RISK, patient.pid, prefetch=patient.prefetch())),
        signed_client.post(f"/cds-services/{segment}/feedback", json=feedback),
    ]
    for response in responses:
        assert_operation_outcome(response, 404)
        assert response.json()["issue"][0]["diagnostics"] == "unknown CDS service"
    logged = captured.getvalue()
    [line] = [orjson.loads(text) for text in logged.splitlines() if text.startswith("{") and orjson.loads(text).get("event") == "cds_hook"]
    assert (line["service"], line["status"]) == ("unknown", 404)
    metrics = signed_client.get("/metrics").text
    for text in (logged, metrics, *(r.text for r in responses)):
        assert "Smith" not in text and "MRN" not in text


def hook_errors(client: TestClient, service: str, status: int) -> float:
    return metric_samples(client.get("/metrics").text).get(("cds_hook_errors_total", (("service", service), ("status", str(status)))), 0.0)


def test_a_call_that_ends_in_a_500_is_logged_and_counted_as_one(
    monkeypatch: pytest.MonkeyPatch, make_client: Callable[..., TestClient]
) -> None:
    """An unexpected error is answered 500 by the one handler: the call's ``cds_hook`` line says 500 (not 200), it is
    counted in ``cds_hook_errors_total{status="500"}``, and it is not timed as a success."""
    client = make_client(dev_mode=True)

    async def bug(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(client.app.state.ctx.hooks, "answer", bug)  # type: ignore[attr-defined]
    latency = ("cds_hook_request_seconds_count", (("data_path", "none"), ("service", RISK)))
    before, timed_before = hook_errors(client, RISK, 500), metric_samples(client.get("/metrics").text).get(latency, 0.0)
    patient = high_risk_dialysis_patient()
    [response], [line] = logged_calls(monkeypatch, client, {"body": hook_request(RISK, patient.pid, prefetch=patient.prefetch())})
    assert_operation_outcome(response, 500)
    assert (line["service"], line["status"]) == (RISK, 500)
    assert hook_errors(client, RISK, 500) == before + 1
    assert metric_samples(client.get("/metrics").text).get(latency, 0.0) == timed_before


def test_refused_calls_are_counted_by_status(dev_client: TestClient) -> None:
    before = {status: hook_errors(dev_client, RISK, status) for status in (400, 412)}
    assert call(dev_client, RISK, {"hook": "patient-view"}).status_code == 400
    patient = high_risk_dialysis_patient()
    assert call(dev_client, RISK, hook_request(RISK, patient.pid)).status_code == 412  # no prefetch, no FHIR server
    assert {status: hook_errors(dev_client, RISK, status) for status in (400, 412)} == {status: n + 1 for status, n in before.items()}
    unknown = hook_errors(dev_client, "unknown", 404)
    assert call(dev_client, "not-a-service", {}).status_code == 404
    assert hook_errors(dev_client, "unknown", 404) == unknown + 1


# --- medicationReference -------------------------------------------------------------------------
WARFARIN_MEDICATION = {"resourceType": "Medication", "id": "med-9", "code": {"coding": [{"system": b.RXNORM, "code": WARFARIN}]}}


def by_reference(request: dict[str, Any], target: str) -> dict[str, Any]:
    """``request`` naming its drug by ``medicationReference`` instead of a code."""
    return {**{k: v for k, v in request.items() if k != "medicationCodeableConcept"}, "medicationReference": {"reference": target}}


def on_warfarin_by_reference() -> PatientData:
    """The high-risk dialysis patient, whose warfarin order names ``Medication/med-9`` (not in the prefetch)."""
    patient = high_risk_dialysis_patient()
    patient.medication_requests = [by_reference(r, "Medication/med-9") for r in patient.medication_requests]
    return patient


def calciphylaxis_detail(response: httpx.Response) -> str:
    return str(next(c["detail"] for c in ok_cards(response)["cards"] if c["source"]["topic"]["code"] == "calciphylaxis-risk"))


def test_a_medication_referenced_but_not_prefetched_is_read_from_the_fhir_server(
    monkeypatch: pytest.MonkeyPatch, dev_client: TestClient, fhir: FakeFhirServer
) -> None:
    """Every prefetch key filled, but the warfarin order names its drug by reference: the Medication is read from
    fhirServer with the EHR's token, and the warfarin factor (M1) counts."""
    patient = on_warfarin_by_reference()
    fhir.put(WARFARIN_MEDICATION)
    body = hook_request(RISK, patient.pid, prefetch=patient.prefetch(), fhir_server=fhir.base_url, token=FHIR_TOKEN)
    [response], [line] = logged_calls(monkeypatch, dev_client, {"body": body})
    assert "M1 " in calciphylaxis_detail(response)
    assert [(r.method, r.path) for r in fhir.requests] == [("GET", "/fhir/Medication/med-9")]
    assert fhir.requests[0].headers.get("authorization") == f"Bearer {FHIR_TOKEN}"
    assert line["data_path"] == "fallback" and "data_gaps" not in line


@pytest.mark.parametrize(
    ("server", "gap"),
    [
        pytest.param(None, "1 referenced Medication(s) not in the prefetch were not fetched (no fhirServer was given)", id="no-fhir-server"),
        pytest.param("fake", "1 referenced Medication(s) could not be fetched (HTTP 404); evaluated without them", id="not-on-the-server"),
        pytest.param("failing", "1 referenced Medication(s) could not be fetched (HTTP 500); evaluated without them", id="server-error"),
    ],
)
def test_a_referenced_medication_that_cannot_be_had_is_a_data_gap(
    monkeypatch: pytest.MonkeyPatch, dev_client: TestClient, fhir: FakeFhirServer, server: str | None, gap: str
) -> None:
    """Answered (not 412) without the drug, and the call's log line says a Medication was missing (no id)."""
    patient = on_warfarin_by_reference()
    if server == "failing":
        fhir.put(WARFARIN_MEDICATION)
        fhir.add_rule(FailureRule(status=500, times=None, path=r"^/fhir/Medication/"))
    where = {"fhir_server": fhir.base_url, "token": FHIR_TOKEN} if server else {}
    body = hook_request(RISK, patient.pid, prefetch=patient.prefetch(), **where)
    [response], [line] = logged_calls(monkeypatch, dev_client, {"body": body})
    assert "M1 " not in calciphylaxis_detail(response)
    assert line["data_gaps"] == [gap]
    assert fhir.count(r"^/fhir/Medication/med-9$") == (1 if server else 0)


@pytest.mark.parametrize("where", ["draft-orders-full-url", "draft-orders-id", "prefetch", "fhir-server"])
def test_a_draft_order_naming_its_medication_by_reference(dev_client: TestClient, fhir: FakeFhirServer, where: str) -> None:
    """order-select: the Medication of a draft order, from the draftOrders Bundle (by fullUrl or Medication/id), the
    prefetch, or else fhirServer."""
    patient = high_risk_dialysis_patient()
    draft = by_reference(draft_order("draft-warfarin", WARFARIN, patient.pid), "Medication/med-9")
    entries: list[dict[str, Any]] = [{"resource": draft}]
    prefetch = patient.prefetch()
    if where == "draft-orders-full-url":
        full_url = "urn:uuid:5f0c1d7e-2a4b-4c6d-8e9f-0a1b2c3d4e5f"
        entries = [{"resource": by_reference(draft, full_url)}, {"fullUrl": full_url, "resource": {k: v for k, v in WARFARIN_MEDICATION.items() if k != "id"}}]
    elif where == "draft-orders-id":
        entries.append({"resource": WARFARIN_MEDICATION})
    elif where == "prefetch":
        prefetch["medicationRequests"]["entry"].append({"resource": WARFARIN_MEDICATION, "search": {"mode": "include"}})
    else:
        fhir.put(WARFARIN_MEDICATION)
    draft_orders = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    context = {"draftOrders": draft_orders, "selections": ["MedicationRequest/draft-warfarin"]}
    body = hook_request(ORDER_SELECT, patient.pid, prefetch=prefetch, fhir_server=fhir.base_url, token=FHIR_TOKEN, **context)
    document = ok_cards(call(dev_client, ORDER_SELECT, body))
    assert topics(document) == ["medication-order-risk"]
    assert document["cards"][0]["summary"].startswith("Order adds warfarin")
    assert [r.path for r in fhir.requests] == (["/fhir/Medication/med-9"] if where == "fhir-server" else [])


# --- malformed calls ------------------------------------------------------------------------------
MARKER = "ECHO-MARKER-7f3a9c"


@pytest.mark.parametrize(
    ("service", "content", "status"),
    [
        pytest.param(RISK, {"hook": f"order-select-{MARKER}", "hookInstance": MARKER, "context": {"patientId": "p1"}}, 400, id="unknown-hook"),
        pytest.param(RISK, {"hook": "order-select", "hookInstance": MARKER, "context": {"patientId": "p1", "selections": []}}, 400, id="wrong-hook"),
        pytest.param(ORDER_SIGN, {"hook": "patient-view", "hookInstance": MARKER, "context": {"patientId": "p1"}}, 400, id="wrong-hook-order"),
        pytest.param("no-such-service", {"hook": "patient-view", "hookInstance": MARKER, "context": {"patientId": "p1"}}, 404, id="unknown-service"),
        pytest.param(RISK, f'{{"hook": "patient-view", "hookInstance": "{MARKER}", '.encode(), 400, id="malformed-json"),
        pytest.param(RISK, [MARKER, {"hook": "patient-view"}], 400, id="array-body"),
        pytest.param(RISK, MARKER, 400, id="string-body"),
        pytest.param(RISK, {"hook": "patient-view", "hookInstance": "x", "context": {"userId": MARKER}}, 400, id="no-patient-id"),
        pytest.param(RISK, {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": f"Patient/{MARKER}"}}, 400, id="patient-ref"),
        pytest.param(RISK, {"hook": "patient-view", "hookInstance": "x", "context": MARKER}, 400, id="context-string"),
        pytest.param(
            RISK,
            {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "p1"}, "prefetch": {"observations": MARKER}},
            400,
            id="prefetch-not-resource",
        ),
        pytest.param(
            ORDER_SELECT,
            {"hook": "order-select", "hookInstance": "x", "context": {"patientId": "p1", "draftOrders": MARKER, "selections": []}},
            400,
            id="draft-orders-string",
        ),
        pytest.param(
            ENCOUNTER,
            {"hook": "encounter-start", "hookInstance": "x", "context": {"patientId": "p1", "userId": MARKER}},
            400,
            id="encounter-start-without-encounter-id",
        ),
        pytest.param(RISK, b"", 400, id="empty-body"),
    ],
)
def test_bad_calls_are_refused_without_echoing_the_body(dev_client: TestClient, service: str, content: Any, status: int) -> None:
    raw = content if isinstance(content, bytes) else orjson.dumps(content)
    response = dev_client.post(f"/cds-services/{service}", content=raw, headers={"Content-Type": "application/json"})
    assert_operation_outcome(response, status)
    assert MARKER not in response.text


def test_oversized_body_is_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client(dev_mode=True, max_hook_request_bytes=1000)
    body = hook_request(RISK, "p1", prefetch={"observations": {"resourceType": "Bundle", "entry": [], "id": "x" * 2000}})
    assert_operation_outcome(call(client, RISK, body), 413)


# --- order-select / order-sign -------------------------------------------------------------------
def order_body(service: str, patient: PatientData, *orders: dict[str, Any], selections: list[str] | None = None) -> dict[str, Any]:
    context: dict[str, Any] = {"draftOrders": sandbox_draft_orders(*orders)}
    if service == ORDER_SELECT:
        context["selections"] = selections if selections is not None else [f"MedicationRequest/{o['id']}" for o in orders]
    return hook_request(service, patient.pid, prefetch=patient.prefetch(), **context)


def test_order_select_warfarin_for_an_esrd_patient(dev_client: TestClient) -> None:
    patient = high_risk_dialysis_patient()
    order = draft_order("draft-warfarin", WARFARIN, patient.pid)
    document = ok_cards(call(dev_client, ORDER_SELECT, order_body(ORDER_SELECT, patient, order)))
    assert topics(document) == ["medication-order-risk"]
    card = document["cards"][0]
    assert card["indicator"] == "warning"
    assert card["selectionBehavior"] == "at-most-one"
    delete = [a for s in card["suggestions"] for a in s["actions"] if a["type"] == "delete"]
    assert delete == [{"type": "delete", "description": delete[0]["description"], "resourceId": "MedicationRequest/draft-warfarin"}]


def test_order_select_only_looks_at_the_selected_orders(dev_client: TestClient) -> None:
    patient = high_risk_dialysis_patient()
    warfarin = draft_order("draft-warfarin", WARFARIN, patient.pid)
    other = draft_order("draft-other", SEVELAMER, patient.pid)
    body = order_body(ORDER_SELECT, patient, warfarin, other, selections=["MedicationRequest/draft-other"])
    assert ok_cards(call(dev_client, ORDER_SELECT, body)) == {"cards": []}


def test_order_select_warfarin_for_a_non_renal_patient_gives_no_card(dev_client: TestClient) -> None:
    patient = non_renal_patient()
    order = draft_order("draft-warfarin", WARFARIN, patient.pid)
    assert ok_cards(call(dev_client, ORDER_SELECT, order_body(ORDER_SELECT, patient, order))) == {"cards": []}


def test_order_select_calcium_acetate_suggests_sevelamer(dev_client: TestClient) -> None:
    patient = high_risk_dialysis_patient()
    order = draft_order("draft-ca", CALCIUM_ACETATE, patient.pid, display="calcium acetate")
    document = ok_cards(call(dev_client, ORDER_SELECT, order_body(ORDER_SELECT, patient, order)))
    assert topics(document) == ["medication-order-risk"]
    actions = [a for s in document["cards"][0]["suggestions"] for a in s["actions"]]
    updates = [a for a in actions if a["type"] == "update"]
    assert len(updates) == 1
    replaced = updates[0]["resource"]
    assert replaced["resourceType"] == "MedicationRequest" and replaced["id"] == "draft-ca"
    assert [(c["system"], c["code"]) for c in replaced["medicationCodeableConcept"]["coding"]] == [(b.RXNORM, SEVELAMER)]
    assert "dosageInstruction" not in replaced, "the prescriber sets the dose of the alternative"
    assert any(a["type"] == "delete" and a["resourceId"] == "MedicationRequest/draft-ca" for a in actions)


def test_order_sign_calcium_carbonate_for_a_patient_already_on_sevelamer_offers_removal_only(dev_client: TestClient) -> None:
    """ESRD with Ca 7.1 and P 2.4 mg/dL and an active sevelamer order (from the prefetch): the calcium carbonate order is
    warned about, but sevelamer is not proposed again (the phosphate is not above 5.5 mg/dL and a non-calcium binder is
    already current); the card says so."""
    pid = "p1"
    patient = PatientData(
        pid=pid,
        patient=b.patient(pid, gender="male", birth="1960-01-01"),
        observations=[{**shifted(r), "subject": {"reference": f"Patient/{pid}"}} for r in b.renal_panel(ca=7.1, p=2.4, alb=3.9, pth=300, days=2)],
        conditions=[{**shifted(b.esrd()), "subject": {"reference": f"Patient/{pid}"}}],
        medication_requests=[{**shifted(b.med_request(SEVELAMER, authored_days=30)), "subject": {"reference": f"Patient/{pid}"}}],
    )
    order = draft_order("draft-cc", "282465", pid, display="calcium carbonate 1250 MG Oral Tablet")
    document = ok_cards(call(dev_client, ORDER_SIGN, order_body(ORDER_SIGN, patient, order)))
    [card] = [c for c in document["cards"] if c["source"]["topic"]["code"] == "medication-order-risk"]
    assert [a["type"] for s in card["suggestions"] for a in s["actions"]] == ["delete"]
    assert "is not proposed: latest phosphate not above 5.5 mg/dL; already on a non-calcium phosphate binder." in card["detail"]


def test_the_replacement_order_keeps_only_what_stays_true_for_the_new_drug(dev_client: TestClient) -> None:
    """A calcium acetate draft as an EHR sends it (a contained Medication, narrative, quantity to dispense, substitution,
    note): the ``update`` is a valid MedicationRequest for sevelamer that keeps the order's identity, subject,
    requester and indication, and nothing about the old drug (a contained Medication left unreferenced breaks dom-3;
    the narrative and the 540 capsules would describe calcium acetate)."""
    from fhir.resources.R4B.medicationrequest import MedicationRequest

    patient = high_risk_dialysis_patient()
    order = {
        "resourceType": "MedicationRequest",
        "id": "draft-ca",
        "meta": {"versionId": "1"},
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">calcium acetate 667 mg, 2 capsules TID, #540</div>'},
        "contained": [
            {
                "resourceType": "Medication",
                "id": "med1",
                "code": {"coding": [{"system": b.RXNORM, "code": "359296", "display": "calcium acetate 667 MG Oral Capsule"}]},
            }
        ],
        "identifier": [{"system": "https://ehr.example.org/orders", "value": "ORD-1"}],
        "status": "draft",
        "intent": "order",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category", "code": "community"}]}],
        "medicationReference": {"reference": "#med1"},
        "subject": {"reference": f"Patient/{patient.pid}"},
        "encounter": {"reference": "Encounter/e1"},
        "authoredOn": "2025-06-30",
        "requester": {"reference": "Practitioner/pr1"},
        "reasonCode": [{"coding": [{"system": b.SNOMED, "code": "20165001", "display": "Hyperphosphatemia"}]}],
        "note": [{"text": "take with meals; calcium acetate may be crushed"}],
        "dosageInstruction": [{"text": "2 capsules three times daily with meals"}],
        "dispenseRequest": {
            "quantity": {"value": 540, "unit": "capsule"},
            "expectedSupplyDuration": {"value": 90, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"},
        },
        "substitution": {"allowedBoolean": True},
    }
    document = ok_cards(call(dev_client, ORDER_SELECT, order_body(ORDER_SELECT, patient, order)))
    assert topics(document) == ["medication-order-risk"]
    [update] = [a for s in document["cards"][0]["suggestions"] for a in s["actions"] if a["type"] == "update"]
    replaced = update["resource"]
    MedicationRequest.model_validate(replaced)  # R4B (reads R4 JSON)
    for element in ("contained", "text", "dispenseRequest", "substitution", "note", "dosageInstruction", "medicationReference", "meta"):
        assert element not in replaced, element
    assert [(c["system"], c["code"]) for c in replaced["medicationCodeableConcept"]["coding"]] == [(b.RXNORM, SEVELAMER)]
    kept = ("id", "identifier", "status", "intent", "category", "subject", "encounter", "authoredOn", "requester", "reasonCode")
    assert {k: replaced[k] for k in kept} == {k: order[k] for k in kept}


def test_order_sign_returns_order_cards_and_risk_cards(dev_client: TestClient) -> None:
    patient = high_risk_dialysis_patient()
    order = draft_order("draft-warfarin", WARFARIN, patient.pid)
    document = ok_cards(call(dev_client, ORDER_SIGN, order_body(ORDER_SIGN, patient, order)))
    found = topics(document)
    assert found[0] == "medication-order-risk"
    assert "calciphylaxis-risk" in found


def test_order_sign_for_a_non_renal_patient_without_risky_orders(dev_client: TestClient) -> None:
    patient = non_renal_patient()
    order = draft_order("draft-sev", SEVELAMER, patient.pid)
    assert ok_cards(call(dev_client, ORDER_SIGN, order_body(ORDER_SIGN, patient, order))) == {"cards": []}


def test_order_sign_with_two_draft_orders_without_an_id(dev_client: TestClient) -> None:
    """Drafts an EHR has not given an id yet (two calcium binders): a card each, with its own uuid, and no suggestion
    to change or remove an order that cannot be named; no suggestion uuid is shared by two cards (renal panel)."""
    patient = esrd_patient_without_labs()
    drafts = [{k: v for k, v in draft_order("x", CALCIUM_ACETATE, patient.pid, display="calcium acetate").items() if k != "id"} for _ in range(2)]
    document = ok_cards(call(dev_client, ORDER_SIGN, order_body(ORDER_SIGN, patient, *drafts)))
    assert topics(document)[:2] == ["medication-order-risk"] * 2
    order_cards = document["cards"][:2]
    assert all("suggestions" not in card and "selectionBehavior" not in card for card in order_cards)
    assert all("cannot be changed or removed from this card" in card["detail"] for card in order_cards)
    labels = [s["label"] for c in document["cards"] for s in c.get("suggestions", [])]
    assert labels.count("Order Renal panel: calcium, phosphate, albumin") == 2, "the renal panel is suggested on two cards"
    assert len(set(all_uuids(document))) == len(all_uuids(document))


def test_order_sign_draft_orders_with_and_without_an_id(dev_client: TestClient) -> None:
    patient = high_risk_dialysis_patient()
    named = draft_order("draft-ca", CALCIUM_ACETATE, patient.pid)
    unnamed = {k: v for k, v in named.items() if k != "id"}
    document = ok_cards(call(dev_client, ORDER_SIGN, order_body(ORDER_SIGN, patient, unnamed, named)))
    first, second = document["cards"][:2]
    assert "suggestions" not in first
    actions = [a for s in second["suggestions"] for a in s["actions"]]
    assert {a["type"] for a in actions} == {"update", "delete"}
    assert all(a.get("resourceId", "MedicationRequest/draft-ca") == "MedicationRequest/draft-ca" for a in actions)
    assert all(a["resource"]["id"] == "draft-ca" for a in actions if a["type"] == "update")
    assert first["uuid"] != second["uuid"]


@pytest.mark.parametrize("service", [ORDER_SIGN, ORDER_SELECT])
def test_at_most_max_draft_orders_are_evaluated_and_the_rest_are_said_to_be_unchecked(
    monkeypatch: pytest.MonkeyPatch, make_client: Callable[..., TestClient], service: str
) -> None:
    """CDS_MAX_DRAFT_ORDERS bounds the work and the answer of an order hook (one card per risky draft): the first ones
    are checked, and an info card says how many were not, so that no warning is not read as "all safe"."""
    client = make_client(dev_mode=True, max_draft_orders=3)
    patient = high_risk_dialysis_patient()
    drafts = [draft_order(f"draft-{i}", WARFARIN, patient.pid) for i in range(5)]
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    document = ok_cards(call(client, service, order_body(service, patient, *drafts)))
    [line] = [orjson.loads(text) for text in captured.getvalue().splitlines() if text.startswith("{") and '"cds_hook"' in text]
    notice, *rest = document["cards"]
    assert (notice["indicator"], notice["source"]["topic"]["code"]) == ("info", "medication-order-risk")
    assert notice["summary"] == "2 of 5 draft medication orders were not checked for calcification risk"
    assert "last 2 were **not evaluated**" in notice["detail"] and "suggestions" not in notice
    checked = [c for c in rest if c["source"]["topic"]["code"] == "medication-order-risk"]
    assert [c["suggestions"][-1]["actions"][0]["resourceId"] for c in checked] == [f"MedicationRequest/draft-{i}" for i in range(3)]
    assert line["data_gaps"] == ["2 draft order(s) were not evaluated (more than 3 in one call)"]


def test_draft_orders_within_the_limit_get_no_notice(make_client: Callable[..., TestClient]) -> None:
    client = make_client(dev_mode=True, max_draft_orders=3)
    patient = high_risk_dialysis_patient()
    drafts = [draft_order(f"draft-{i}", WARFARIN, patient.pid) for i in range(3)]
    document = ok_cards(call(client, ORDER_SIGN, order_body(ORDER_SIGN, patient, *drafts)))
    assert topics(document)[:3] == ["medication-order-risk"] * 3
    assert all(c["indicator"] != "info" or "not checked" not in c["summary"] for c in document["cards"])


def test_thousands_of_draft_orders_get_a_bounded_answer(dev_client: TestClient) -> None:
    """At the default (100): 2,000 warfarin drafts used to be 2,000 cards (the fuzzer's 20,000 took 2.4 s and 43 MB)."""
    patient = high_risk_dialysis_patient()
    drafts = [draft_order(f"d{i}", WARFARIN, patient.pid) for i in range(2000)]
    response = call(dev_client, ORDER_SIGN, order_body(ORDER_SIGN, patient, *drafts))
    cards = ok_cards(response)["cards"]
    assert sum(c["source"]["topic"]["code"] == "medication-order-risk" for c in cards) == 101  # 100 checked + the notice
    assert cards[0]["summary"].startswith("1900 of 2000 draft medication orders were not checked")
    assert len(response.content) < 2_000_000


def test_order_select_requires_a_draft_orders_bundle(dev_client: TestClient) -> None:
    patient = high_risk_dialysis_patient()
    body = hook_request(ORDER_SELECT, patient.pid, prefetch=patient.prefetch(), selections=[])
    assert_operation_outcome(call(dev_client, ORDER_SELECT, body), 400)


# --- CORS -------------------------------------------------------------------------------------------
def test_cors_preflight_and_response_headers(signed_client: TestClient, issuer: Issuer) -> None:
    origin = "https://sandbox.cds-hooks.org"
    preflight = signed_client.options(
        f"/cds-services/{RISK}",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] in ("*", origin)
    allowed = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "POST" in preflight.headers["access-control-allow-methods"]

    patient = high_risk_dialysis_patient()
    headers = {"Origin": origin, **issuer.bearer(f"{TESTSERVER}/cds-services/{RISK}")}
    response = call(signed_client, RISK, hook_request(RISK, patient.pid, prefetch=patient.prefetch()), headers=headers)
    ok_cards(response)
    assert response.headers["access-control-allow-origin"] in ("*", origin)

    refused = call(signed_client, RISK, hook_request(RISK, patient.pid, prefetch=patient.prefetch()), headers={"Origin": origin})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] in ("*", origin), "errors must reach the browser too"


def private_network_preflight(client: TestClient) -> httpx.Response:
    return client.options(
        f"/cds-services/{RISK}",
        headers={
            "Origin": "https://sandbox.cds-hooks.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
            "Access-Control-Request-Private-Network": "true",
        },
    )


@pytest.mark.parametrize(
    "settings",
    [{"cors_origins": ["https://sandbox.cds-hooks.org"]}, {"cors_origins": ["*"], "dev_mode": True}],
    ids=["named-origin", "development-mode"],
)
def test_a_private_network_preflight_from_a_public_page_is_allowed(make_client: Callable[..., TestClient], settings: dict[str, Any]) -> None:
    """Chrome's Private Network Access: the public Sandbox page calling a service on localhost asks first."""
    preflight = private_network_preflight(make_client(**settings))
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-private-network"] == "true"


def test_a_private_network_preflight_is_refused_when_every_origin_is_allowed_in_production_settings(signed_client: TestClient) -> None:
    """CORS open to every origin must not also open a service on a private network to every public page."""
    preflight = private_network_preflight(signed_client)
    assert preflight.status_code == 400
    assert "access-control-allow-private-network" not in preflight.headers
