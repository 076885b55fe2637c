"""The CDS Hooks service answers from a fresh stored assessment when the EHR's data cannot be had."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from service.cds.thresholds import Thresholds
from service.errors import PrefetchUnavailable
from service.fhir.hook_fetch import HookFetcher
from service.usecases.evaluate_hook import HookService, StoredAssessment

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


def call(svc: HookService, hook: str = "patient-view", service_id: str = "calcinosis-risk"):
    body = {"hook": hook, "hookInstance": "i", "context": {"patientId": "p1", "draftOrders": {"resourceType": "Bundle"}}}
    return asyncio.run(svc.answer(service_id, body, NOW))


def stored(catalog, age: timedelta, rules: str | None = None) -> StoredAssessment:
    return StoredAssessment(NOW - age, rules or Thresholds().rules_version(), catalog.version, {"cards": [CARD]})


def test_fresh_stored_assessment_answers(catalog) -> None:
    answer = call(service(catalog, stored(catalog, timedelta(minutes=5))))
    assert answer.data_path == "stored"
    assert answer.response == {"cards": [CARD]}


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
