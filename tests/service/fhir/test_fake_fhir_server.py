"""Self-tests of tests/fakes/fhir_server.py, which the rest of the project relies on."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from tests.fakes.fhir_server import FailureRule, FakeFhirServer, KeyPair
from tests.service.fhir.conftest import observation


@pytest.fixture
def http(fhir_server: FakeFhirServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fhir_server.base_url + "/", timeout=5) as client:
        yield client


def ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def test_search_parameters(fhir_server: FakeFhirServer, http: httpx.Client) -> None:
    fhir_server.put(observation("a", patient="p1", code="2777-1", effectiveDateTime="2024-01-10T10:00:00Z", identifier=[{"system": "urn:lab", "value": "L1"}]))
    fhir_server.put(observation("b", patient="p1", code="17861-6", effectiveDateTime="2024-02-01", status="preliminary"))
    fhir_server.put(observation("c", patient="p2", code="2777-1", effectiveDateTime="2023-12-31"))
    fhir_server.put(
        {
            "resourceType": "Condition",
            "id": "k",
            "subject": {"reference": "Patient/p1"},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        }
    )

    def search(query: str, rtype: str = "Observation") -> list[str]:
        resp = http.get(f"{rtype}?{query}")
        assert resp.status_code == 200, resp.text
        return ids(resp.json())

    assert search("patient=p1") == ["a", "b"]
    assert search("patient=Patient/p1") == ["a", "b"]
    assert search("subject=Patient/p2") == ["c"]
    assert search("code=2777-1") == ["a", "c"]
    assert search("code=http://loinc.org|17861-6,http://loinc.org|2777-1&patient=p1") == ["a", "b"]
    assert search("code=http://other|2777-1") == []
    assert search("code=http://loinc.org|") == ["a", "b", "c"]
    assert search("identifier=urn:lab|L1") == ["a"]
    assert search("status=preliminary") == ["b"]
    assert search("_id=a,c") == ["a", "c"]
    assert search("date=ge2024-01-01&date=lt2024-02-01") == ["a"]
    assert search("date=2024-01") == ["a"]
    assert search("date=gt2024-01-10T10:00:00Z") == ["b"]
    assert search("_sort=-date") == ["b", "a", "c"]
    assert search("_sort=date") == ["c", "a", "b"]
    assert search("clinical-status=active", "Condition") == ["k"]
    assert search("_unknown=1") == ["a", "b", "c"]  # lenient by default
    assert http.get("Observation?date=notadate").status_code == 400


def test_last_updated_and_strict_search() -> None:
    with FakeFhirServer(strict_search=True) as srv, httpx.Client(base_url=srv.base_url + "/") as http:
        srv.put(observation("old"), last_updated="2024-01-01T00:00:00Z")
        srv.put(observation("new"), last_updated="2024-06-01T00:00:00Z")
        assert ids(http.get("Observation?_lastUpdated=gt2024-03-01").json()) == ["new"]
        assert ids(http.get("Observation?_lastUpdated=le2024-01-01T00:00:00Z").json()) == ["old"]
        assert ids(http.get("Observation?_sort=-_lastUpdated").json()) == ["new", "old"]
        assert http.get("Observation?foo=bar").status_code == 400
        assert srv.search("Observation", {"_lastUpdated": "ge2024-06-01"})[0]["id"] == "new"


def test_paging_links(fhir_server: FakeFhirServer, http: httpx.Client) -> None:
    for i in range(5):
        fhir_server.put(observation(f"o{i}"))
    page = http.get("Observation?_count=2").json()
    seen = ids(page)
    while (nxt := next((link["url"] for link in page["link"] if link["relation"] == "next"), None)) is not None:
        assert nxt.startswith(fhir_server.base_url)
        page = httpx.get(nxt).json()
        seen += ids(page)
    assert seen == [f"o{i}" for i in range(5)] and page["total"] == 5
    assert http.get("Observation?_count=0").json()["entry"] == []


def test_crud_versioning_and_history(fhir_server: FakeFhirServer, http: httpx.Client) -> None:
    created = http.post("Observation", json=observation("client-id"))
    assert created.status_code == 201 and created.headers["ETag"] == 'W/"1"'
    rid = created.json()["id"]
    assert rid != "client-id" and created.headers["Location"].endswith(f"/Observation/{rid}/_history/1")

    body = {**created.json(), "status": "amended"}
    assert http.put(f"Observation/{rid}", json=body, headers={"If-Match": 'W/"9"'}).status_code == 412
    updated = http.put(f"Observation/{rid}", json=body, headers={"If-Match": 'W/"1"'})
    assert updated.status_code == 200 and updated.json()["meta"]["versionId"] == "2"
    assert http.put(f"Observation/{rid}", json=body).json()["meta"]["versionId"] == "2"  # unchanged: no new version
    assert http.put(f"Observation/{rid}", json={**body, "id": "other"}).status_code == 400
    assert http.put("Observation/new-id", json=observation("new-id")).status_code == 201

    assert http.get(f"Observation/{rid}/_history/1").json()["status"] == "final"
    assert [e["response"]["status"] for e in http.get(f"Observation/{rid}/_history").json()["entry"]] == ["200", "201"]
    assert http.delete(f"Observation/{rid}").status_code == 200
    assert http.get(f"Observation/{rid}").status_code == 410
    assert http.get(f"Observation/{rid}/_history/3").status_code == 410
    assert http.get("Observation/never").status_code == 404
    assert http.post("Observation", content=b"{oops").status_code == 400
    assert http.post("Observation", json={"resourceType": "Patient"}).status_code == 400


def test_conditional_update_rules(fhir_server: FakeFhirServer, http: httpx.Client) -> None:
    body = {"resourceType": "RiskAssessment", "status": "final", "identifier": [{"system": "urn:ra", "value": "1"}]}
    first = http.put("RiskAssessment?identifier=urn:ra|1", json=body)
    assert first.status_code == 201
    second = http.put("RiskAssessment?identifier=urn:ra|1", json=body)
    assert second.status_code == 200 and second.json()["id"] == first.json()["id"]
    fhir_server.put({**body, "id": "dup"})
    assert http.put("RiskAssessment?identifier=urn:ra|1", json=body).status_code == 412
    assert http.put("RiskAssessment", json=body).status_code == 400


def test_metadata_and_smart_configuration_are_public() -> None:
    with FakeFhirServer(required_token="t") as srv, httpx.Client(base_url=srv.base_url + "/") as http:
        assert http.get("metadata").json()["fhirVersion"] == "4.0.1"
        config = http.get(".well-known/smart-configuration").json()
        assert config["token_endpoint"] == srv.token_url
        assert "private_key_jwt" in config["token_endpoint_auth_methods_supported"]
        denied = http.get("Observation")
        assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Bearer")
        assert http.get("Observation", headers={"Authorization": "Bearer t"}).status_code == 200
        assert http.get("Observation", headers={"Authorization": f"Bearer {srv.issue_token()}"}).status_code == 200
        assert http.get("Observation", headers={"Authorization": f"Bearer {srv.issue_token(-1)}"}).status_code == 401


def _assertion(keys: KeyPair, srv: FakeFhirServer, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": "cli", "sub": "cli", "aud": srv.token_url, "exp": now + 240, "jti": str(uuid.uuid4()), **claims}
    return jwt.encode(payload, keys.private_pem, algorithm=keys.alg, headers={"kid": keys.kid})


def _token_request(srv: FakeFhirServer, assertion: str, **form: str) -> httpx.Response:
    data = {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
        "scope": "system/*.rs",
        **form,
    }
    return httpx.post(srv.token_url, data=data)


def test_token_endpoint_validation(rsa_keys: KeyPair, ec_keys: KeyPair) -> None:
    with FakeFhirServer(smart_clients={"cli": rsa_keys}) as srv:
        good = _assertion(rsa_keys, srv)
        ok = _token_request(srv, good)
        assert ok.status_code == 200 and ok.json()["token_type"] == "bearer" and ok.json()["scope"] == "system/*.rs"
        assert _token_request(srv, good).json()["error_description"] == "jti replayed"
        assert _token_request(srv, _assertion(rsa_keys, srv, aud="https://elsewhere/token")).status_code == 401
        assert _token_request(srv, _assertion(rsa_keys, srv, exp=int(time.time()) + 3600)).status_code == 401
        assert _token_request(srv, _assertion(rsa_keys, srv, exp=int(time.time()) - 60)).status_code == 401
        assert _token_request(srv, _assertion(rsa_keys, srv, sub="someone-else")).status_code == 401
        assert _token_request(srv, _assertion(rsa_keys, srv, iss="unknown", sub="unknown")).status_code == 401
        assert _token_request(srv, _assertion(ec_keys, srv)).status_code == 401  # key not registered for cli
        assert _token_request(srv, good, grant_type="password").json()["error"] == "unsupported_grant_type"
        assert _token_request(srv, "not-a-jwt").status_code == 400
        hs = jwt.encode({"iss": "cli"}, "k" * 32, algorithm="HS256", headers={"kid": rsa_keys.kid})
        assert _token_request(srv, hs).json()["error_description"] == "alg must be RS384 or ES384"
        assert len(srv.token_errors) == 10


def test_failure_rules(fhir_server: FakeFhirServer, http: httpx.Client) -> None:
    fhir_server.put(observation("o1"))
    rule = fhir_server.add_rule(FailureRule(status=429, times=None, path=r"/Patient", method="GET", retry_after=7))
    assert http.get("Observation/o1").status_code == 200
    for _ in range(3):
        resp = http.get("Patient/x")
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "7"
    assert rule.hits == 3
    fhir_server.clear_rules()
    fhir_server.fail_next(2, status=502)
    assert [http.get("Observation/o1").status_code for _ in range(3)] == [502, 502, 200]
    fhir_server.add_rule(FailureRule(drop_connection=True))
    with pytest.raises(httpx.RemoteProtocolError):
        http.get("Observation/o1")
    fhir_server.add_rule(FailureRule(status=None, latency_s=0.3))
    started = time.monotonic()
    assert http.get("Observation/o1").status_code == 200
    assert time.monotonic() - started >= 0.3
    log = fhir_server.requests_matching("/fhir/Observation/o1", "GET")
    assert len(log) == 6 and log[0].headers["host"].startswith("127.0.0.1")


def test_backport_operations(fhir_server: FakeFhirServer, http: httpx.Client) -> None:
    fhir_server.put(observation("o1"))
    fhir_server.add_subscription("s1", content="full-resource")
    fhir_server.add_subscription("s2", status="error")
    assert fhir_server.record_event("s1", "Observation/o1") == 1
    assert fhir_server.record_event("s1", observation("snap")) == 2

    full = http.get("Subscription/s1/$events").json()
    assert [e.get("resource", {}).get("id") for e in full["entry"][1:]] == ["o1", "snap"]
    empty = http.get("Subscription/s1/$events?content=empty&eventsSinceNumber=2").json()
    assert len(empty["entry"]) == 1
    posted = http.post(
        "Subscription/s1/$events",
        json={"resourceType": "Parameters", "parameter": [{"name": "eventsUntilNumber", "valueString": "1"}]},
    ).json()
    assert len(posted["entry"]) == 2
    assert http.get("Subscription/nope/$events").status_code == 404
    assert http.get("Subscription/s1/$events?eventsSinceNumber=x").status_code == 400
    everything = http.get("Subscription/$status").json()
    assert everything["total"] == 2
    only_s2 = http.get("Subscription/$status?id=s2").json()
    status_params = {p["name"]: p for p in only_s2["entry"][0]["resource"]["parameter"]}
    assert status_params["status"]["valueCode"] == "error" and status_params["type"]["valueCode"] == "query-status"


def test_bulk_job_lifecycle(fhir_server: FakeFhirServer) -> None:
    fhir_server.put(observation("o1"))
    kick = httpx.get(f"{fhir_server.base_url}/$export", headers={"Prefer": "respond-async"})
    assert kick.status_code == 202
    status_url = kick.headers["Content-Location"]
    first = httpx.get(status_url)
    assert first.status_code == 202 and first.headers["X-Progress"] and first.headers["Retry-After"] == "1"
    manifest = httpx.get(status_url).json()
    assert manifest["requiresAccessToken"] is False and manifest["output"][0]["type"] == "Observation"
    lines = httpx.get(manifest["output"][0]["url"]).text.splitlines()
    assert len(lines) == 1 and '"o1"' in lines[0]
    assert httpx.delete(status_url).status_code == 202
    assert httpx.get(status_url).status_code == 404
    assert httpx.get(f"{fhir_server.base_url}/$export").status_code == 400  # Prefer: respond-async is required
    bad_format = httpx.get(f"{fhir_server.base_url}/$export?_outputFormat=text/csv", headers={"Prefer": "respond-async"})
    assert bad_format.status_code == 400
