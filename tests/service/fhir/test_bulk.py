"""Bulk Data $export end to end against FakeFhirServer (kick-off, polling, NDJSON download)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from service.fhir.client import FhirClient
from service.fhir.errors import FhirPermanentError, FhirTransientError
from tests.fakes.fhir_server import FakeFhirServer
from tests.service.fhir.conftest import SleepRecorder, observation

MakeClient = Callable[..., FhirClient]


def _seed(srv: FakeFhirServer) -> None:
    srv.put({"resourceType": "Patient", "id": "p1"})
    srv.put({"resourceType": "Patient", "id": "p2"})
    srv.put(observation("o1", patient="p1"))
    srv.put(observation("o2", patient="p2"))
    srv.put({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}})
    srv.put({"resourceType": "Organization", "id": "org"})


def test_bulk_export_end_to_end(make_client: MakeClient, sleeper: SleepRecorder) -> None:
    with FakeFhirServer(bulk_polls_before_ready=2, bulk_retry_after=1) as srv:
        _seed(srv)
        client = make_client(srv)

        resources = list(client.bulk_export(types=["Patient", "Observation"]))

        assert sorted(f"{r['resourceType']}/{r['id']}" for r in resources) == [
            "Observation/o1",
            "Observation/o2",
            "Patient/p1",
            "Patient/p2",
        ]
        assert sleeper.calls == [1.0, 1.0]  # Retry-After of each 202
        kickoff = srv.requests_matching(r"/fhir/\$export")[0]
        assert kickoff.headers["prefer"] == "respond-async"
        assert kickoff.headers["accept"] == "application/fhir+json"
        assert kickoff.query == {"_outputFormat": ["application/fhir+ndjson"], "_type": ["Patient,Observation"]}
        assert srv.count("/bulk/status/", "GET") == 3
        files = srv.requests_matching("/bulk/files/")
        assert len(files) == 2 and all(f.headers["accept"] == "application/fhir+ndjson" for f in files)
        assert srv.count("/bulk/status/", "DELETE") == 1  # cleanup after download
        assert not srv.errors


def test_bulk_export_sends_the_token_only_when_required(make_client: MakeClient) -> None:
    with FakeFhirServer(required_token="tok", bulk_retry_after=0) as srv:
        _seed(srv)
        assert len(list(make_client(srv, auth="tok").bulk_export())) == 6
        assert all(r.headers.get("authorization") == "Bearer tok" for r in srv.requests_matching("/bulk/files/"))

    with FakeFhirServer(bulk_retry_after=0) as srv:  # requiresAccessToken: false
        _seed(srv)
        assert len(list(make_client(srv, auth="tok").bulk_export(types=["Organization"]))) == 1
        assert all("authorization" not in r.headers for r in srv.requests_matching("/bulk/files/"))


def test_bulk_files_on_another_origin_never_get_the_token(make_client: MakeClient) -> None:
    with FakeFhirServer() as other, FakeFhirServer(required_token="tok", bulk_retry_after=0, bulk_file_base=other.origin) as srv:
        _seed(srv)
        with pytest.raises(FhirPermanentError, match="another origin"):
            list(make_client(srv, auth="tok").bulk_export())
        assert other.requests == []
        assert srv.count("/bulk/status/", "DELETE") == 1  # the job is released anyway


def test_patient_group_and_since_exports(make_client: MakeClient) -> None:
    with FakeFhirServer(bulk_retry_after=0) as srv:
        _seed(srv)
        srv.put({"resourceType": "Group", "id": "g1", "type": "person", "actual": True, "member": [{"entity": {"reference": "Patient/p1"}}]})
        client = make_client(srv)

        patient_level = {f"{r['resourceType']}/{r['id']}" for r in client.bulk_export(patient_level=True)}
        assert "Organization/org" not in patient_level and "Observation/o2" in patient_level

        group = {f"{r['resourceType']}/{r['id']}" for r in client.bulk_export(group_id="g1")}
        assert group == {"Patient/p1", "Observation/o1", "Condition/c1"}

        cutoff = srv.get("Group", "g1")["meta"]["lastUpdated"]  # type: ignore[index]
        srv.put(observation("o3", patient="p2"))
        since = [r["id"] for r in client.bulk_export(since=cutoff)]
        assert since == ["o3"]
        assert srv.requests_matching(r"/fhir/Patient/\$export")
        assert srv.requests_matching(r"/fhir/Group/g1/\$export")


def test_bulk_wait_gives_up_and_cancels(make_client: MakeClient, sleeper: SleepRecorder) -> None:
    with FakeFhirServer(bulk_polls_before_ready=100, bulk_retry_after=5) as srv:
        client = make_client(srv, clock=sleeper.clock)
        with pytest.raises(FhirTransientError, match="not complete"):
            list(client.bulk_export(max_wait_s=12))
        assert srv.count("/bulk/status/", "GET") == 3  # 0 s, 5 s, 10 s (recorded sleeps): the next would pass 12 s
        assert srv.count("/bulk/status/", "DELETE") == 1


def test_bulk_kickoff_errors_are_permanent(fhir_server: FakeFhirServer, make_client: MakeClient) -> None:
    fhir_server.fail_next(1, status=400, path=r"\$export")
    with pytest.raises(FhirPermanentError) as err:
        list(make_client(fhir_server).bulk_export())
    assert err.value.status == 400


def test_bulk_invalid_ndjson_is_permanent(make_client: MakeClient) -> None:
    from tests.fakes.fhir_server import FailureRule

    with FakeFhirServer(bulk_retry_after=0) as srv:
        _seed(srv)
        srv.add_rule(FailureRule(status=200, path="/bulk/files/", raw_body=b'{"resourceType":"Patient","id":"p1"}\n[1,2]\n'))
        with pytest.raises(FhirPermanentError, match="line 2"):
            list(make_client(srv).bulk_export(types=["Patient"]))
