"""Real Synthea R4 bundles: every patient evaluates, nothing raises, exclusions are sensible."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.cds.engine import evaluate_resources
from service.cds.thresholds import Thresholds
from service.inputs import read_path
from tests.schema import assert_valid

DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.fixture(scope="module")
def evaluations(catalog):
    items = list(read_path(DATA / "synthea"))
    evaluations, groups = evaluate_resources(items, catalog=catalog, thresholds=Thresholds(), now=datetime(2020, 6, 1, tzinfo=UTC))
    return evaluations, groups


def test_every_patient_evaluates(evaluations) -> None:
    evs, groups = evaluations
    assert len(evs) == 5
    assert groups.unattributed == []
    assert all(e.assessment.patient_resource_present for e in evs)
    for e in evs:
        assert_valid({"cards": e.assessment.cards}, "CDSResponse")


def test_egfr_in_plain_ml_per_min_is_reported(evaluations) -> None:
    evs, _ = evaluations
    reasons = [x.reason for e in evs for x in e.assessment.excluded]
    assert any("mL/min is not accepted for egfr" in r for r in reasons)


def test_exclusion_reasons_are_from_the_known_set(evaluations) -> None:
    evs, _ = evaluations
    allowed = ("unit not convertible", "effective time in the future", "duplicate ", "status ", "clinicalStatus ")
    for e in evs:
        for x in e.assessment.excluded:
            assert x.reason.startswith(allowed), x


def test_warfarin_patients_have_vka_factor(evaluations) -> None:
    evs, _ = evaluations
    with_vka = [e.assessment.patient for e in evs if "M1" in e.assessment.calciphylaxis.major_factors]
    assert len(with_vka) >= 1


def test_irrelevant_resources_are_counted_not_listed(evaluations) -> None:
    evs, groups = evaluations
    assert groups.other_types.get("Claim", 0) > 0
    assert all(e.assessment.ignored.get("Observation", 0) > 0 for e in evs)
