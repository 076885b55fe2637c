"""FhirClient against FakeFhirServer over real HTTP: reads, search paging, writes, retries, auth."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from service.config import Settings
from service.fhir.client import (
    FhirClient,
    StaticBearer,
    client_from_settings,
    entry_resources,
    escape_search_value,
    history_entries,
    parse_retry_after,
)
from service.fhir.errors import FhirAuthError, FhirNotFound, FhirPermanentError, FhirTransientError, redact_url
from tests.fakes.fhir_server import FailureRule, FakeFhirServer, KeyPair
from tests.service.fhir.conftest import SleepRecorder, observation

MakeClient = Callable[..., FhirClient]


# --- reads --------------------------------------------------------------------------------------
def test_read_returns_resource_with_versioning(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    fhir_server.put(observation("o1"))
    fhir_server.put(observation("o1", valueString="again"))
    client = make_client(fhir_server)

    got = client.read("Observation", "o1")

    assert got["id"] == "o1" and got["meta"]["versionId"] == "2" and got["valueString"] == "again"
    req = fhir_server.requests[-1]
    assert (req.method, req.path) == ("GET", "/fhir/Observation/o1")
    assert req.headers["accept"] == "application/fhir+json"
    assert "authorization" not in req.headers
    assert client.vread("Observation", "o1", "1").get("valueString") is None


def test_read_unknown_and_deleted_raise_not_found(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    client = make_client(fhir_server)
    with pytest.raises(FhirNotFound) as missing:
        client.read("Patient", "nope")
    assert missing.value.status == 404 and missing.value.resource_type == "Patient" and missing.value.resource_id == "nope"
    assert not missing.value.gone

    fhir_server.put({"resourceType": "Patient", "id": "gone"})
    fhir_server.delete("Patient", "gone")
    with pytest.raises(FhirNotFound) as gone:
        client.read("Patient", "gone")
    assert gone.value.status == 410 and gone.value.gone


def test_instance_history_is_newest_first_and_names_a_deletion(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    fhir_server.put(observation("h1"))
    fhir_server.delete("Observation", "h1")
    client = make_client(fhir_server)

    bundle = client.history("Observation", "h1", count=1)

    newest = bundle["entry"][0]
    assert newest["request"]["method"] == "DELETE" and newest["response"]["etag"] == 'W/"2"'
    req = fhir_server.requests[-1]
    assert (req.method, req.path, req.param("_count")) == ("GET", "/fhir/Observation/h1/_history", "1")
    with pytest.raises(FhirNotFound):
        client.history("Observation", "never")


def test_invalid_type_or_id_is_a_programming_error(make_client: MakeClient) -> None:
    client = make_client("http://127.0.0.1:9/fhir")
    with pytest.raises(ValueError):
        client.read("observation", "1")
    with pytest.raises(ValueError):
        client.read("Observation", "../Patient/1")


# --- search -------------------------------------------------------------------------------------
def test_search_filters_and_yields_resources(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    fhir_server.put(observation("a", patient="p1", code="2777-1"))
    fhir_server.put(observation("b", patient="p1", code="17861-6"))
    fhir_server.put(observation("c", patient="p2", code="2777-1"))
    client = make_client(fhir_server)

    ids = [r["id"] for r in client.search("Observation", {"patient": "p1", "code": "http://loinc.org|2777-1,http://loinc.org|17861-6"})]

    assert sorted(ids) == ["a", "b"]
    assert fhir_server.requests[-1].query["patient"] == ["p1"]


def test_search_by_post_keeps_patient_ids_out_of_the_url(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    fhir_server.put(observation("a", patient="p-secret"))
    client = make_client(fhir_server)

    ids = [r["id"] for r in client.search("Observation", {"subject": "Patient/p-secret"}, method="POST")]

    assert ids == ["a"]
    req = fhir_server.requests[-1]
    assert (req.method, req.path, req.raw_query) == ("POST", "/fhir/Observation/_search", "")
    assert req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert b"p-secret" in req.body


def test_search_follows_next_links_up_to_max_pages(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    for i in range(7):
        fhir_server.put(observation(f"o{i}"))
    client = make_client(fhir_server, max_pages=2)

    bounded = list(client.search("Observation", {"_count": 2}))
    assert [r["id"] for r in bounded] == ["o0", "o1", "o2", "o3"]
    assert fhir_server.count(r"/fhir/Observation$") == 2

    fhir_server.clear_requests()
    everything = list(client.search("Observation", {"_count": 2}, max_pages=10))
    assert len(everything) == 7
    assert fhir_server.count(r"/fhir/Observation$") == 4
    pages = list(client.search_bundle_pages("Observation", {"_count": 3}, max_pages=10))
    assert [len(p["entry"]) for p in pages] == [3, 3, 1] and all(p["total"] == 7 for p in pages)


@pytest.mark.parametrize("elsewhere", ["another origin", "another base on the same origin"])
def test_next_link_off_the_fhir_base_is_refused(fhir_server: FakeFhirServer, make_client: MakeClient, elsewhere: str) -> None:
    """Another server (same host, other port), or another tenant's base on this host, never gets the token."""
    for i in range(3):
        fhir_server.put(observation(f"o{i}"))
    with FakeFhirServer() as other:
        fhir_server.next_link_base = other.base_url if elsewhere == "another origin" else f"{fhir_server.origin}/fhir-other-tenant"
        client = make_client(fhir_server, auth="s3cret")
        seen: list[str] = []
        with pytest.raises(FhirPermanentError, match="off the FHIR base"):
            for r in client.search("Observation", {"_count": 1}, max_pages=10):
                seen.append(r["id"])
        assert seen == ["o0"]
        assert other.requests == [] and fhir_server.count(r"/fhir-other-tenant") == 0


def test_history_since_uses_last_updated_gt(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    t0 = datetime(2024, 3, 1, tzinfo=UTC)
    fhir_server.put(observation("old"), last_updated=t0)
    fhir_server.put(observation("new2"), last_updated=t0 + timedelta(hours=2))
    fhir_server.put(observation("new1"), last_updated=t0 + timedelta(hours=1))
    client = make_client(fhir_server)

    ids = [r["id"] for page in client.history_since_pages("Observation", t0) for r in entry_resources(page, include_included=False)]

    assert ids == ["new1", "new2"]
    assert fhir_server.requests[-1].query["_lastUpdated"] == ["gt2024-03-01T00:00:00Z"]


def test_history_since_pages_sends_count_and_ends_on_a_page_with_a_next_link_when_cut(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    t0 = datetime(2024, 3, 1, tzinfo=UTC)
    for i in range(7):
        fhir_server.put(observation(f"o{i}"), last_updated=t0 + timedelta(minutes=i + 1))
    client = make_client(fhir_server)

    pages = list(client.history_since_pages("Observation", t0, count=3, max_pages=2))

    assert [[e["resource"]["id"] for e in p["entry"]] for p in pages] == [["o0", "o1", "o2"], ["o3", "o4", "o5"]]
    assert any(link["relation"] == "next" for link in pages[-1]["link"])  # cut: the caller can tell
    assert fhir_server.requests[0].query["_count"] == ["3"]
    assert fhir_server.requests[0].query["_sort"] == ["_lastUpdated"]
    whole = client.history_since_pages("Observation", t0, count=5, max_pages=5)
    assert [r["id"] for page in whole for r in entry_resources(page, include_included=False)] == [f"o{i}" for i in range(7)]


def test_type_history_since_lists_versions_and_deletions_newest_first_page_by_page(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    t0 = datetime(2024, 3, 1, tzinfo=UTC)
    fhir_server.put(observation("old"), last_updated=t0 - timedelta(milliseconds=1))  # _since is inclusive
    fhir_server.put(observation("a"), last_updated=t0 + timedelta(minutes=1))
    fhir_server.put(observation("b"), last_updated=t0 + timedelta(minutes=2))
    fhir_server.delete("Observation", "a")  # now: the newest entry
    fhir_server.put({"resourceType": "Condition", "id": "c"})
    client = make_client(fhir_server)

    pages = list(client.history_type_pages("Observation", t0, count=2, max_pages=1))

    assert len(pages) == 1 and any(link["relation"] == "next" for link in pages[0]["link"])  # cut: the caller can tell
    req = fhir_server.requests[-1]
    assert (req.path, req.param("_since"), req.param("_count")) == ("/fhir/Observation/_history", "2024-03-01T00:00:00Z", "2")
    whole = [e for page in client.history_type_pages("Observation", t0, count=2) for e in history_entries(page, "Observation")]
    assert [(e.resource_id, e.version_id, e.deleted) for e in whole] == [("a", "2", True), ("b", "1", False), ("a", "1", False)]
    assert whole[0].modified is not None and whole[0].modified > t0 + timedelta(minutes=2)


def test_history_entries_read_a_deletion_as_each_server_writes_it() -> None:
    when = "2024-03-01T10:00:00.123Z"
    bundle = {"resourceType": "Bundle", "type": "history", "entry": [
        # The specification: request.url Type/id, response.lastModified.
        {"request": {"method": "DELETE", "url": "Observation/spec"}, "response": {"lastModified": when}},
        # HAPI: the version in request.url and the etag, no lastModified.
        {"fullUrl": "https://ehr.example/fhir/Observation/hapi", "request": {"method": "DELETE", "url": "Observation/hapi/_history/3"},
         "response": {"status": "200 OK", "etag": 'W/"3"'}},
        # LinuxForHealth: the version in response.location.
        {"fullUrl": "Observation/lfh", "request": {"method": "DELETE", "url": "Observation/lfh"},
         "response": {"status": "200 OK", "location": "Observation/lfh/_history/2", "lastModified": when}},
        # Another type, an id only in fullUrl, a URL naming two different ids, and no id at all.
        {"request": {"method": "DELETE", "url": "Condition/c1"}},
        {"fullUrl": "https://ehr.example/fhir/Observation/full", "request": {"method": "DELETE"}},
        {"fullUrl": "Observation/one", "request": {"method": "DELETE", "url": "Observation/two"}},
        {"request": {"method": "DELETE", "url": "Observation"}},
        # A version.
        {"resource": {"resourceType": "Observation", "id": "kept", "meta": {"versionId": "4", "lastUpdated": when}},
         "request": {"method": "PUT", "url": "Observation/kept"}},
    ]}

    got = [(e.resource_id, e.version_id, e.modified is not None, e.deleted) for e in history_entries(bundle, "Observation")]

    assert got == [
        ("spec", None, True, True),
        ("hapi", "3", False, True),
        ("lfh", "2", True, True),
        ("full", None, False, True),
        ("two", None, False, True),
        ("kept", "4", True, False),
    ]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_request = st.fixed_dictionaries(
    {}, optional={"method": st.sampled_from(["DELETE", "PUT", "POST", None]), "url": st.text(max_size=30) | st.just("Observation/z?x=1")}
)
_response = st.fixed_dictionaries({}, optional={"etag": st.text(max_size=10), "location": st.text(max_size=30), "lastModified": st.text(max_size=30)})
_resource = st.fixed_dictionaries({"resourceType": st.sampled_from(["Observation", "Condition"]), "id": st.text(max_size=8) | st.integers()})
_entry = st.fixed_dictionaries({}, optional={
    "fullUrl": st.sampled_from(["Observation/x", "https://e/fhir/Observation/y/_history/2", "Observation", ""]) | st.text(max_size=20),
    "request": _request | _json,
    "response": _response | _json,
    "resource": _resource | _json,
})


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"entry": st.lists(_entry, max_size=6) | _json}))
def test_history_entries_never_raise_on_malformed_bundles(bundle: dict[str, object]) -> None:
    for entry in history_entries(bundle, "Observation"):
        assert isinstance(entry.resource_id, str) and (entry.version_id is None or isinstance(entry.version_id, str))


# --- writes -------------------------------------------------------------------------------------
def _assessment(value: str = "high") -> dict[str, object]:
    return {
        "resourceType": "RiskAssessment",
        "status": "final",
        "identifier": [{"system": "https://calcinosis-cds.org/id/assessment", "value": "pat-1|calciphylaxis"}],
        "subject": {"reference": "Patient/pat-1"},
        "prediction": [{"qualitativeRisk": {"text": value}}],
    }


def test_conditional_update_is_idempotent(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    client = make_client(fhir_server)
    system, value = "https://calcinosis-cds.org/id/assessment", "pat-1|calciphylaxis"

    first = client.conditional_update("RiskAssessment", system, value, _assessment())
    again = client.conditional_update("RiskAssessment", system, value, _assessment())
    changed = client.conditional_update("RiskAssessment", system, value, _assessment("low"))

    assert first["id"] == again["id"] == changed["id"]
    assert (first["meta"]["versionId"], again["meta"]["versionId"], changed["meta"]["versionId"]) == ("1", "1", "2")
    assert len(fhir_server.resources("RiskAssessment")) == 1
    req = fhir_server.requests[-1]
    assert req.method == "PUT" and req.path == "/fhir/RiskAssessment"
    assert req.query["identifier"] == [f"{system}|{escape_search_value(value)}"]  # the '|' in the value is escaped


def test_conditional_update_with_several_matches_is_permanent(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    for rid in ("x", "y"):
        fhir_server.put({**_assessment(), "id": rid})
    client = make_client(fhir_server)
    with pytest.raises(FhirPermanentError) as err:
        client.conditional_update("RiskAssessment", "https://calcinosis-cds.org/id/assessment", "pat-1|calciphylaxis", _assessment())
    assert err.value.status == 412


def test_create_update_and_if_match(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    client = make_client(fhir_server)
    created = client.create("Observation", observation("ignored"))
    assert created["id"] != "ignored" and created["meta"]["versionId"] == "1"  # server-assigned id

    updated = client.update("Observation", created["id"], {**created, "status": "amended"}, if_match="1")
    assert updated["meta"]["versionId"] == "2"
    with pytest.raises(FhirPermanentError) as stale:
        client.update("Observation", created["id"], {**created, "status": "corrected"}, if_match="1")
    assert stale.value.status == 412
    with pytest.raises(ValueError):
        client.update("Observation", "other-id", created)


def test_conditional_create_with_if_none_exist(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    client = make_client(fhir_server)
    ident = {"identifier": [{"system": "urn:s", "value": "v1"}]}
    a = client.create("Observation", observation("x", **ident), if_none_exist={"identifier": "urn:s|v1"})
    b = client.create("Observation", observation("x", **ident), if_none_exist={"identifier": "urn:s|v1"})
    assert a["id"] == b["id"] and len(fhir_server.resources("Observation")) == 1


def test_write_with_return_minimal_reads_the_location(make_client: MakeClient) -> None:
    with FakeFhirServer(write_return="minimal") as srv:
        client = make_client(srv)
        created = client.create("Observation", observation("x"))
        assert created["resourceType"] == "Observation" and created["meta"]["versionId"] == "1"
        assert srv.requests[-1].path.endswith("/_history/1")  # vread of the Location
        assert not srv.errors


# --- retries ------------------------------------------------------------------------------------
def test_retries_503_then_succeeds(fhir_server: FakeFhirServer, make_client: MakeClient, sleeper: SleepRecorder) -> None:
    fhir_server.put(observation("o1"))
    fhir_server.fail_next(2, status=503)
    client = make_client(fhir_server, max_retries=3, backoff_s=0.1)

    assert client.read("Observation", "o1")["id"] == "o1"

    assert fhir_server.count("/fhir/Observation/o1") == 3
    assert len(sleeper.calls) == 2
    assert 0.05 <= sleeper.calls[0] <= 0.1 and 0.1 <= sleeper.calls[1] <= 0.2  # exponential with jitter


def test_retry_after_seconds_is_honoured(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    fhir_server.put(observation("o1"))
    fhir_server.fail_next(1, status=503, retry_after=1)
    real = SleepRecorder(real=True)
    client = make_client(fhir_server, sleep=real)

    started = time.monotonic()
    client.read("Observation", "o1")

    assert real.calls == [1.0]
    assert time.monotonic() - started >= 1.0


def test_retry_after_http_date_is_honoured(fhir_server: FakeFhirServer, make_client: MakeClient, sleeper: SleepRecorder) -> None:
    fhir_server.put(observation("o1"))
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
    fhir_server.fail_next(1, status=429, retry_after=when)
    client = make_client(fhir_server)

    client.read("Observation", "o1")

    assert len(sleeper.calls) == 1 and 1.0 < sleeper.calls[0] <= 3.0


def test_429_until_retries_are_exhausted(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    fhir_server.fail_next(10, status=429, retry_after=0)
    client = make_client(fhir_server, max_retries=2)
    with pytest.raises(FhirTransientError) as err:
        client.read("Observation", "o1")
    assert err.value.status == 429
    assert fhir_server.count("/fhir/Observation/o1") == 3


def test_retry_after_beyond_cap_fails_fast_with_the_hint(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    fhir_server.fail_next(1, status=503, retry_after=120)
    client = make_client(fhir_server, retry_after_max_s=5)
    with pytest.raises(FhirTransientError) as err:
        client.read("Observation", "o1")
    assert err.value.retry_after_s == 120.0 and err.value.status == 503
    assert fhir_server.count("/fhir/Observation/o1") == 1


def test_timeout_becomes_transient_error_without_the_query(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    fhir_server.add_rule(FailureRule(status=None, latency_s=1.0, times=None, path="/fhir/Observation"))
    client = make_client(fhir_server, timeout_s=0.2, max_retries=1)
    with pytest.raises(FhirTransientError) as err:
        list(client.search("Observation", {"patient": "pat-secret-42"}))
    message = str(err.value)
    assert "timeout" in message and "pat-secret-42" not in message and "?" not in message
    assert err.value.url == f"{fhir_server.base_url}/Observation"
    assert fhir_server.count("/fhir/Observation") == 2


def test_dropped_connection_is_retried_for_reads_only(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    fhir_server.put(observation("o1"))
    fhir_server.add_rule(FailureRule(drop_connection=True, times=1, method="GET"))
    client = make_client(fhir_server)
    assert client.read("Observation", "o1")["id"] == "o1"

    fhir_server.add_rule(FailureRule(drop_connection=True, times=1, method="POST"))
    with pytest.raises(FhirTransientError):
        client.create("Observation", observation("new"))
    assert fhir_server.count("/fhir/Observation$", "POST") == 1  # a POST that may have been processed is not resent


def test_post_is_retried_when_the_server_did_not_process_it(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    fhir_server.fail_next(1, status=503, method="POST")
    client = make_client(fhir_server)
    assert client.create("Observation", observation("new"))["resourceType"] == "Observation"
    assert fhir_server.count("/fhir/Observation$", "POST") == 2

    fhir_server.fail_next(1, status=502, method="POST")
    with pytest.raises(FhirTransientError):  # 502: the upstream may have processed it
        client.create("Observation", observation("new2"))


def test_status_mapping_and_no_bodies_in_messages(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    client = make_client(fhir_server)
    fhir_server.fail_next(1, status=500)
    with pytest.raises(FhirTransientError) as five:
        client.read("Observation", "o1")
    assert five.value.status == 500 and fhir_server.count("/fhir/Observation/o1") == 1

    fhir_server.add_rule(FailureRule(status=400, body={"resourceType": "OperationOutcome", "issue": [{"diagnostics": "PHI-HERE"}]}))
    with pytest.raises(FhirPermanentError) as bad:
        list(client.search("Observation", {"patient": "pat-77"}))
    assert bad.value.status == 400
    assert "PHI-HERE" not in str(bad.value) and "pat-77" not in str(bad.value)

    fhir_server.add_rule(FailureRule(status=200, raw_body=b"{not json"))
    with pytest.raises(FhirPermanentError, match="invalid JSON"):
        client.read("Observation", "o1")


# --- auth ---------------------------------------------------------------------------------------
def test_bearer_auth(make_client: MakeClient) -> None:
    with FakeFhirServer(required_token="s3cret") as srv:
        srv.put(observation("o1"))
        with pytest.raises(FhirAuthError) as err:
            make_client(srv).read("Observation", "o1")
        assert err.value.status == 401

        client = make_client(srv, auth="s3cret")
        assert client.read("Observation", "o1")["id"] == "o1"
        assert srv.requests[-1].headers["authorization"] == "Bearer s3cret"
        assert "s3cret" not in repr(StaticBearer("s3cret"))
        with pytest.raises(FhirAuthError):  # a static token cannot be refreshed: no retry loop
            make_client(srv, auth="wrong").read("Observation", "o1")
        assert not srv.errors


def test_smart_client_refreshes_after_401(make_client: MakeClient, rsa_keys: KeyPair) -> None:
    from service.fhir.smart import SmartBackendAuth

    with FakeFhirServer(require_auth=True, smart_clients={"cds": rsa_keys}) as srv:
        srv.put(observation("o1"))
        auth = SmartBackendAuth(client_id="cds", private_key=rsa_keys.private_pem, key_id=rsa_keys.kid, scope="system/*.rs", fhir_base_url=srv.base_url)
        client = make_client(srv, auth=auth)
        client.read("Observation", "o1")
        srv.revoke_tokens()
        client.read("Observation", "o1")
        assert srv.count("/auth/token") == 2
        assert [r.path for r in srv.requests].count("/fhir/Observation/o1") == 3  # ok, 401, ok
        auth.close()
        assert not srv.errors


# --- operations ---------------------------------------------------------------------------------
def test_backport_operations(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    fhir_server.add_subscription("cds-sub")
    for i in range(4):
        fhir_server.record_event("cds-sub", f"Observation/o{i}")
    client = make_client(fhir_server)

    events = client.subscription_events("cds-sub", since=2, until=3)
    status = client.subscription_status("cds-sub")

    assert events["type"] == "history"
    numbers = [p["part"][0]["valueString"] for p in events["entry"][0]["resource"]["parameter"] if p["name"] == "notification-event"]
    assert numbers == ["2", "3"]
    assert status["type"] == "searchset" and len(status["entry"]) == 1
    req = fhir_server.requests[-2]
    assert req.path == "/fhir/Subscription/cds-sub/$events" and req.query == {"eventsSinceNumber": ["2"], "eventsUntilNumber": ["3"]}

    posted = client.operation("$events", resource_type="Subscription", resource_id="cds-sub", params={"eventsSinceNumber": 4}, method="POST")
    assert len([p for p in posted["entry"][0]["resource"]["parameter"] if p["name"] == "notification-event"]) == 1
    with pytest.raises(FhirNotFound):
        client.subscription_status("unknown")


# --- factory and helpers ------------------------------------------------------------------------
def test_client_from_settings(tmp_path: object, rsa_keys: KeyPair) -> None:
    with FakeFhirServer(required_token="tok") as srv:
        srv.put(observation("o1"))
        settings = Settings(fhir_base_url=srv.base_url, fhir_auth_mode="bearer", fhir_bearer_token=SecretStr("tok"), fhir_max_pages=7)
        with client_from_settings(settings) as client:
            assert client.max_pages == 7
            assert client.read("Observation", "o1")["id"] == "o1"

    with pytest.raises(ValueError, match="CDS_FHIR_BASE_URL"):
        client_from_settings(Settings())
    with pytest.raises(ValueError, match="CDS_FHIR_BEARER_TOKEN"):
        client_from_settings(Settings(fhir_base_url="http://x/fhir", fhir_auth_mode="bearer"))
    with pytest.raises(ValueError, match="CLIENT_ID"):
        client_from_settings(Settings(fhir_base_url="http://x/fhir", fhir_auth_mode="smart-backend"))


def test_client_from_settings_smart(tmp_path: object, ec_keys: KeyPair) -> None:
    from pathlib import Path

    key_file = ec_keys.write_private(Path(str(tmp_path)) / "key.pem")
    with FakeFhirServer(require_auth=True, smart_clients={"cds-app": ec_keys}) as srv:
        srv.put(observation("o1"))
        settings = Settings(
            fhir_base_url=srv.base_url,
            fhir_auth_mode="smart-backend",
            smart_client_id="cds-app",
            smart_private_key_file=key_file,
            smart_key_id=ec_keys.kid,
            smart_alg="ES384",
        )
        with client_from_settings(settings) as client:
            client.read("Observation", "o1")
            client.read("Observation", "o1")
        assert srv.count("/auth/token") == 1
        assert srv.count("/.well-known/smart-configuration") == 1
        assert not srv.errors


def test_parse_retry_after() -> None:
    now = datetime(2024, 3, 5, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after(" 0.5 ", now=now) == 0.5
    assert parse_retry_after("-3", now=now) == 0.0
    assert parse_retry_after("Tue, 05 Mar 2024 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Tue, 05 Mar 2024 11:00:00 GMT", now=now) == 0.0
    for bad in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(bad, now=now) is None


def test_redact_url_strips_query_and_credentials() -> None:
    assert redact_url("https://user:pw@ehr.example.org:8443/fhir/Observation?patient=123#x") == "https://ehr.example.org:8443/fhir/Observation"
    assert redact_url(httpx.URL("http://h/fhir/Patient/1?_elements=name")) == "http://h/fhir/Patient/1"


def test_escape_search_value() -> None:
    assert escape_search_value(r"a|b,c$d\e") == r"a\|b\,c\$d\\e"
