"""HookService.answer: Medications referenced by the record but not in the prefetch are read from fhirServer under the
fallback fetch's rules (allowlist, at most ``max_medication_reads`` per call), and what cannot be had is a data gap."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from service.cds.thresholds import Thresholds
from service.fhir.hook_fetch import HookFetcher
from service.usecases.evaluate_hook import HookService
from tests import builders as b
from tests.fakes.fhir_server import FakeFhirServer

NOW = datetime(2026, 1, 10, tzinfo=UTC)


def service(catalog: Any, *, dev_mode: bool, max_medication_reads: int = 50) -> HookService:
    return HookService(
        catalog=catalog,
        thresholds=Thresholds(),
        topic_system="urn:test",
        fetcher=HookFetcher(timeout_s=3, max_pages=1),
        fhir_server_allowlist=["https://ehr.example.org/fhir"],
        dev_mode=dev_mode,
        max_medication_reads=max_medication_reads,
    )


def by_reference(target: str) -> dict[str, Any]:
    request = {k: v for k, v in b.med_request("855332").items() if k != "medicationCodeableConcept"}
    return {**request, "medicationReference": {"reference": target}}


def answer(svc: HookService, server: str, *references: str) -> Any:
    prefetch: dict[str, Any] = {key: None for key in svc.templates}  # every key: "no data"
    prefetch.update(patient=b.patient("p1"), medicationRequests=b.bundle(*map(by_reference, references)))
    body = {"hook": "patient-view", "hookInstance": "i", "context": {"patientId": "p1"}, "prefetch": prefetch, "fhirServer": server}

    async def run() -> Any:
        try:
            return await svc.answer("calcinosis-risk", body, NOW)
        finally:
            await svc.fetcher.aclose()

    return asyncio.run(run())


def test_a_fhir_server_off_the_allowlist_is_not_asked_for_medications(catalog: Any) -> None:
    result = answer(service(catalog, dev_mode=False), "https://elsewhere.example.org/fhir", "Medication/m1", "Medication/m2")
    assert "2 referenced Medication(s) not in the prefetch were not fetched (fhirServer is not on the allowlist)" in result.notes


def test_at_most_max_medication_reads_per_call(catalog: Any) -> None:
    with FakeFhirServer() as fhir:
        fhir.put_all({"resourceType": "Medication", "id": f"m{i}", "code": {"text": "a drug"}} for i in range(3))
        result = answer(service(catalog, dev_mode=True, max_medication_reads=2), fhir.base_url, "Medication/m2", "Medication/m0", "Medication/m1")
        assert sorted(r.path for r in fhir.requests) == ["/fhir/Medication/m0", "/fhir/Medication/m1"]
        assert not fhir.errors
    assert result.notes == ["1 referenced Medication(s) were not fetched (more than 2 in one call)"]
    assert result.data_path == "fallback"
