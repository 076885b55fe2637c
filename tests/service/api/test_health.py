"""Liveness, readiness, metrics and the documentation routes."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from tests.integration.support import metric_samples
from tests.service.api.conftest import ADMIN_TOKEN
from tests.service.api.support import RISK, high_risk_dialysis_patient, hook_request

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # port 1: nothing listens (as security.support.unreachable_redis)


def test_healthz(signed_client: TestClient) -> None:
    response = signed_client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_checks_and_mode(make_client: Callable[..., TestClient]) -> None:
    for dev_mode in (False, True):
        response = make_client(dev_mode=dev_mode).get("/readyz")
        assert response.status_code == 200, response.text
        document = response.json()
        assert document["status"] == "ready"
        assert document["checks"] == {"database": True, "broker": True, "mappings": True, "replay_cache": True}
        assert document["dev_mode"] is dev_mode
        assert document["mappings_version"] and document["rules_version"]
        assert ("warning" in document) is dev_mode


def test_readyz_is_unready_when_the_replay_cache_is_unreachable(make_client: Callable[..., TestClient]) -> None:
    """Without its Redis replay cache every signed call is refused (401): the instance must not look ready."""
    response = make_client(redis_url=UNREACHABLE_REDIS).get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["replay_cache"] is False


def test_metrics_after_hook_calls(dev_client: TestClient) -> None:
    patient = high_risk_dialysis_patient()
    assert dev_client.post(f"/cds-services/{RISK}", json=hook_request(RISK, patient.pid, prefetch=patient.prefetch())).status_code == 200
    # required keys absent and no fhirServer: 412
    assert dev_client.post(f"/cds-services/{RISK}", json=hook_request(RISK, patient.pid, prefetch={})).status_code == 412
    feedback = {
        "feedback": [{"card": str(uuid.uuid4()), "outcome": "accepted", "outcomeTimestamp": "2026-01-01T00:00:00Z", "acceptedSuggestions": [{"id": "s1"}]}]
    }
    assert dev_client.post(f"/cds-services/{RISK}/feedback", json=feedback).status_code == 200

    response = dev_client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    names = {name for name, _ in samples}
    assert "cds_hook_request_seconds_bucket" in names
    latency_count = samples[("cds_hook_request_seconds_count", (("data_path", "prefetch"), ("service", RISK)))]
    assert latency_count >= 1
    assert samples[("cds_cards_total", (("service", RISK), ("topic", "calciphylaxis-risk")))] >= 1
    assert samples[("cds_feedback_total", (("outcome", "accepted"), ("service", RISK)))] >= 1
    assert samples[("cds_hook_precondition_failed_total", (("service", RISK),))] >= 1
    # The ledger's events by status, read at scrape time (an alert on failed events needs no worker metrics).
    assert samples[("inbound_events", (("status", "failed"),))] == 0
    assert samples[("inbound_events", (("status", "handled"),))] == 0


def test_openapi_and_docs(signed_client: TestClient) -> None:
    document = signed_client.get("/openapi.json").json()
    paths = document["paths"]
    for path in ("/cds-services", "/cds-services/{service_id}", "/cds-services/{service_id}/feedback", "/healthz", "/readyz", "/metrics"):
        assert path in paths, path
    assert {"CdsRequest", "FeedbackRequest", "CdsResponse", "OperationOutcome"} <= document["components"]["schemas"].keys()
    docs = signed_client.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]


_PATH_VALUES = {"service_id": RISK, "patient_id": "p1", "resource_type": "Observation", "resource_id": "o1"}


@pytest.mark.parametrize(
    "settings",
    [
        {"dev_mode": False},
        {"dev_mode": True},
        {"dev_mode": False, "subscription_secret": "channel-secret"},
        {"dev_mode": True, "subscription_secret": "channel-secret", "medplum_hmac_secret": "hmac-secret"},
        {"dev_mode": True, "admin_token": None},
    ],
    ids=["signed", "development", "signed-with-secret", "development-with-secrets", "development-without-admin-token"],
)
def test_the_document_says_which_calls_need_credentials(make_client: Callable[..., TestClient], settings: dict[str, object]) -> None:
    """Every operation, called without credentials: 401 exactly where the document names no credential-free way."""
    client = make_client(**settings)
    document = client.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["ehrJwt"]["bearerFormat"] == "JWT" and schemes["adminToken"]["scheme"] == "bearer"
    body = hook_request(RISK, "p1", prefetch=high_risk_dialysis_patient().prefetch())
    checked = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            security = operation["security"]
            assert all(set(requirement) <= schemes.keys() for requirement in security), (path, method)
            needs_credentials = bool(security) and {} not in security
            url = path.format(**_PATH_VALUES)
            if path == "/cds-services/{service_id}/feedback" and method == "post":
                response = client.post(
                    url,
                    json={
                        "feedback": [
                            {
                                "card": str(uuid.uuid4()),
                                "outcome": "accepted",
                                "outcomeTimestamp": "2026-01-01T00:00:00Z",
                                "acceptedSuggestions": [{"id": "s1"}],
                            }
                        ]
                    },
                )
            elif method in {"post", "put"}:
                response = client.request(method.upper(), url, json=body if path.startswith("/cds-services") else None)
            else:
                response = client.request(method.upper(), url)
            assert (response.status_code == 401) == needs_credentials, (path, method, response.status_code, security)
            checked += 1
    assert checked >= 11


def test_assessment_read_needs_the_admin_token(signed_client: TestClient) -> None:
    assert signed_client.get("/patients/p1/assessment").status_code == 401
    response = signed_client.get("/patients/nobody-here/assessment", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"


def test_unknown_route_is_an_operation_outcome(signed_client: TestClient) -> None:
    response = signed_client.get("/no/such/route")
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"


def test_bench_floor_route_only_when_asked(make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDS_BENCH_FLOOR_ROUTE", raising=False)
    assert make_client().post("/bench/floor", content=b"{}").status_code == 404
    monkeypatch.setenv("CDS_BENCH_FLOOR_ROUTE", "1")
    client = make_client()
    response = client.post("/bench/floor", content=b'{"hook": "patient-view"}')
    assert response.status_code == 200
    assert len(response.json()["cards"]) == 1
    assert "/bench/floor" not in client.get("/openapi.json").json()["paths"]
