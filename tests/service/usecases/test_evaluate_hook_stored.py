"""HookService.answer: from a fresh stored assessment when the EHR's data cannot be had, prefetch Bundles whose
entries name the patient by fullUrl, and paged prefetch that cannot be completed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from service.cds.thresholds import Thresholds
from service.errors import PrefetchUnavailable
from service.fhir.hook_fetch import HookFetcher
from service.usecases.evaluate_hook import HookService, StoredAssessment
from tests import builders as b

NOW = datetime(2026, 1, 10, tzinfo=UTC)
CARD = {"uuid": "u1", "summary": "Calciphylaxis risk HIGH", "indicator": "warning", "source": {"label": "calcinosis-cds"}}


def service(catalog, stored: StoredAssessment | None) -> HookService:
    return HookService(
        catalog=catalog,
        thresholds=Thresholds(),
        topic_system="urn:test",
        fetcher=HookFetcher(timeout_s=1, max_pages=1),
        fhir_server_allowlist=[],
        dev_mode=False,
        stored=lambda ref: stored if ref == "Patient/p1" else None,
        stored_fresh_s=3600,
    )


def call(
    svc: HookService,
    hook: str = "patient-view",
    service_id: str = "calcinosis-risk",
    prefetch: dict | None = None,
    fhir_server: str | None = None,
    hook_instance: str = "i",
):
    body: dict = {"hook": hook, "hookInstance": hook_instance, "context": {"patientId": "p1", "draftOrders": {"resourceType": "Bundle"}}}
    if prefetch is not None:
        body["prefetch"] = prefetch
    if fhir_server is not None:
        body["fhirServer"] = fhir_server
    return asyncio.run(svc.answer(service_id, body, NOW))


def stored(catalog, age: timedelta, rules: str | None = None) -> StoredAssessment:
    return StoredAssessment(NOW - age, rules or Thresholds().rules_version(), catalog.version, {"cards": [CARD]})


def test_fresh_stored_assessment_answers(catalog) -> None:
    answer = call(service(catalog, stored(catalog, timedelta(minutes=5))))
    assert answer.data_path == "stored"
    [card] = answer.response["cards"]
    assert card == {**CARD, "uuid": card["uuid"]}
    assert answer.cards == [card]


def test_each_call_answered_from_the_stored_assessment_has_card_uuids_of_its_own(catalog) -> None:
    """Feedback is kept per card uuid and outcome: two clinicians' calls must not share a card's uuid."""
    svc = service(catalog, stored(catalog, timedelta(minutes=5)))
    [first], [again], [other] = ([c["uuid"] for c in call(svc, hook_instance=i).cards] for i in ("call-1", "call-1", "call-2"))
    assert first == again, "the same request (a retry) has the same uuids"
    assert len({first, other, CARD["uuid"]}) == 3


@pytest.mark.parametrize("age_rules", [(timedelta(hours=2), None), (timedelta(minutes=5), "0.0.1-other")])
def test_stale_or_other_rules_still_412(catalog, age_rules) -> None:
    with pytest.raises(PrefetchUnavailable):
        call(service(catalog, stored(catalog, *age_rules)))


def test_order_hooks_never_use_stored(catalog) -> None:
    with pytest.raises(PrefetchUnavailable):
        call(service(catalog, stored(catalog, timedelta(minutes=5))), hook="order-sign", service_id="calcinosis-order-sign")


def test_no_stored_assessment_412(catalog) -> None:
    with pytest.raises(PrefetchUnavailable):
        call(service(catalog, None))


def test_prefetch_bundle_with_urn_uuid_references(catalog) -> None:
    """A searchset whose entries reference the patient by fullUrl (urn:uuid) is still attributed to the patient."""
    from tests.builders import ALB, CA, P, ago, condition, obs, patient

    now_iso = ago(now=NOW)
    subject = "urn:uuid:0f1e"
    labs = [obs(code, v, u, when=now_iso, subject=subject) for code, v, u in ((CA, 10.0, "mg/dL"), (P, 7.5, "mg/dL"), (ALB, 2.8, "g/dL"))]
    esrd_dx = condition("46177005", subject=subject)
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"fullUrl": subject, "resource": patient("p1")}, *({"resource": r} for r in (*labs, esrd_dx))],
    }
    prefetch = {"patient": None, "observations": bundle, "conditions": None, "medicationRequests": None,
                "medicationStatements": None, "medicationAdministrations": None, "procedures": None}
    answer = call(service(catalog, None), prefetch=prefetch)
    assert answer.evaluation is not None
    assert answer.evaluation.assessment.renal_context == "R2"
    assert answer.evaluation.assessment.metastatic_calcification.ca_x_p is not None


@pytest.mark.parametrize(
    ("server", "reason"),
    [(None, "no fhirServer was given"), ("https://ehr.example.org/fhir", "fhirServer is not on the allowlist")],
    ids=["no-server", "server-not-allowed"],
)
def test_a_paged_prefetch_that_cannot_be_completed_is_answered_from_its_first_page_and_noted(catalog, server, reason) -> None:
    first_page = {**b.bundle(btype="searchset"), "link": [{"relation": "next", "url": "https://ehr.example.org/fhir/Observation?page=2"}]}
    empty = b.bundle(btype="searchset")
    prefetch = {"observations": first_page, "conditions": empty, "medicationRequests": empty}
    answer = call(service(catalog, None), prefetch=prefetch, fhir_server=server)
    assert answer.data_path == "fallback"
    assert f"prefetch observations is paged; the pages after the first were not fetched ({reason})" in answer.notes
