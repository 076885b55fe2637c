"""What a record is does not depend on which of its codings comes first, and a drug coded the way real orders are
(a brand SBD, a salt PIN, an NDC, text only, a Medication with ingredients) is still recognised (the pharmacist's
review). Routes are read from coding displays as well as text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from service.cds.engine import Evaluation
from service.cds.orders import order_risk_cards
from service.terminology.catalog import Catalog
from tests import builders as b

NDC = "http://hl7.org/fhir/sid/ndc"
NCI = "http://ncimeta.nci.nih.gov"
E83_59 = {"system": b.ICD10, "code": "E83.59", "display": "Other disorders of calcium metabolism"}
CALCIPHYLAXIS = {"system": b.SNOMED, "code": "237900002"}


def condition_coded(*codings: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    res = b.condition("237900002")
    res["code"] = {"coding": list(codings), **({"text": text} if text else {})}
    return res


def medication(concept: dict[str, Any], **extra: Any) -> dict[str, Any]:
    res = b.med_request("11289", **extra)
    res["medicationCodeableConcept"] = concept
    return res


def topics(ev: Evaluation) -> set[str]:
    return {c["source"]["topic"]["code"] for c in ev.assessment.cards}


@pytest.mark.parametrize("calciphylaxis_first", [True, False], ids=["snomed-first", "icd-first"])
def test_a_specific_coding_counts_whichever_coding_comes_first(run: Callable[..., Evaluation], calciphylaxis_first: bool) -> None:
    """E83.59 without the word 'calciphylaxis' does not count by itself, but the SNOMED code beside it does."""
    codings = [CALCIPHYLAXIS, E83_59] if calciphylaxis_first else [E83_59, CALCIPHYLAXIS]
    ev = run(b.esrd(), *b.renal_panel(), condition_coded(*codings, text="Calcific uremic arteriolopathy"))
    assert ev.assessment.calciphylaxis.tier == "established"
    assert "established-calciphylaxis" in topics(ev)
    assert not [e for e in ev.assessment.excluded if "E83.59" in e.reason]


def test_a_condition_whose_every_coding_fails_its_check_is_excluded_with_the_reason(run: Callable[..., Evaluation]) -> None:
    ev = run(b.esrd(), *b.renal_panel(), condition_coded(E83_59))
    assert ev.assessment.calciphylaxis.tier != "established"
    assert any("E83.59 counts as calciphylaxis only when its text says 'calciphylaxis'" in e.reason for e in ev.assessment.excluded)


def test_a_residual_icd_code_beside_its_snomed_code_counts(run: Callable[..., Evaluation]) -> None:
    """[E83.39 without the word, SNOMED 20165001 Hyperphosphatemia]: the diagnosis is a predisposing condition."""
    dx = condition_coded({"system": b.ICD10, "code": "E83.39"}, {"system": b.SNOMED, "code": "20165001", "display": "Hyperphosphatemia"})
    assert run(b.obs(b.P, 4.6), dx).assessment.metastatic_calcification.tier == "moderate"
    assert run(b.obs(b.P, 4.6)).assessment.metastatic_calcification.tier == "low"


def test_every_mapped_coding_of_a_medication_adds_its_features(run: Callable[..., Evaluation]) -> None:
    combo = medication({"coding": [{"system": b.RXNORM, "code": "1897"}, {"system": b.RXNORM, "code": "2418"}]})
    minors = run(b.esrd(), *b.renal_panel(), combo).assessment.calciphylaxis.minor_factors
    assert {"calcium_binder", "vitamin_d_therapy"} <= set(minors)


@pytest.mark.parametrize(
    "concept",
    [
        pytest.param({"coding": [{"system": b.RXNORM, "code": "855334", "display": "Warfarin Sodium 5 MG Oral Tablet [Coumadin]"}]}, id="sbd"),
        pytest.param({"coding": [{"system": b.RXNORM, "code": "114194", "display": "Warfarin Sodium"}]}, id="pin"),
        pytest.param({"coding": [{"system": NDC, "code": "0056-0172-70", "display": "Coumadin 5 mg (warfarin sodium) tablet"}]}, id="ndc"),
        pytest.param({"text": "Warfarin 3 mg tablet"}, id="text-only"),
    ],
)
def test_warfarin_coded_as_real_orders_are_is_recognised_by_name(run: Callable[..., Evaluation], concept: dict[str, Any]) -> None:
    ev = run(b.esrd(), *b.renal_panel(), medication(concept))
    assert "M1" in ev.assessment.calciphylaxis.major_factors
    factor = next(f for f in ev.outcome.majors if f.id == "M1")
    (evidence,) = factor.evidence
    assert evidence.note is not None and "recognised by name (warfarin)" in evidence.note
    coding = concept.get("coding", [{}])[0]
    assert evidence.code == (f"{coding['system']}|{coding['code']}" if coding else None)  # the record's own code, as sent


def test_a_medication_known_by_its_ingredient_is_recognised(run: Callable[..., Evaluation]) -> None:
    med = {
        "resourceType": "Medication",
        "id": "m1",
        "code": {"coding": [{"system": b.RXNORM, "code": "999999991", "display": "A brand product"}]},
        "ingredient": [{"itemCodeableConcept": {"coding": [{"system": b.RXNORM, "code": "11289", "display": "warfarin"}]}}],
    }
    order = b.med_request("11289")
    del order["medicationCodeableConcept"]
    order["medicationReference"] = {"reference": "#m1"}
    order["contained"] = [med]
    ev = run(b.esrd(), *b.renal_panel(), order)
    factor = next(f for f in ev.outcome.majors if f.id == "M1")
    assert factor.evidence[0].note == "recognised by its ingredient (warfarin)"


@pytest.mark.parametrize("text", ["Hydrocortisone 1 % topical cream", "prednisone 5 mg tablet"])
def test_a_corticosteroid_is_not_recognised_by_name(run: Callable[..., Evaluation], text: str) -> None:
    """A name does not tell a cream from a tablet: corticosteroids count by code only."""
    ev = run(b.esrd(), *b.renal_panel(), medication({"text": text}))
    assert "systemic_corticosteroid" not in ev.assessment.calciphylaxis.minor_factors


def test_a_name_inside_a_longer_word_is_not_a_match(run: Callable[..., Evaluation]) -> None:
    ev = run(b.esrd(), *b.renal_panel(), medication({"text": "antiwarfarinase"}))
    assert "M1" not in ev.assessment.calciphylaxis.major_factors


def test_an_order_for_a_brand_product_gets_the_order_card(run: Callable[..., Evaluation], catalog: Catalog) -> None:
    evaluation = run(b.esrd())
    order = medication({"coding": [{"system": b.RXNORM, "code": "855334", "display": "Warfarin Sodium 5 MG Oral Tablet [Coumadin]"}]}, status="draft")
    cards = order_risk_cards([order], evaluation.outcome, evaluation.facts, evaluation.context, catalog, {})
    assert [c["source"]["topic"]["code"] for c in cards] == ["medication-order-risk"]


@pytest.mark.parametrize(
    "route",
    [
        pytest.param({"coding": [{"system": NCI, "code": "C38276", "display": "INTRAVENOUS"}]}, id="nci-display"),
        pytest.param({"text": "IVPB"}, id="piggyback"),
        pytest.param({"text": "IV push over 10 minutes"}, id="iv-in-a-sentence"),
    ],
)
def test_an_intravenous_route_is_read_from_displays_and_common_abbreviations(run: Callable[..., Evaluation], route: dict[str, Any]) -> None:
    admin = b.med_admin("1908", days=2)
    admin["dosage"] = {"route": route}
    assert "iatrogenic-calcinosis-context" in topics(run(admin, b.obs(b.CA, 9.0), b.obs(b.P, 4.0)))


def test_an_oral_route_display_is_not_intravenous(run: Callable[..., Evaluation]) -> None:
    admin = b.med_admin("1908", days=2)
    admin["dosage"] = {"route": {"coding": [{"system": NCI, "code": "C38288", "display": "ORAL"}]}}
    assert "iatrogenic-calcinosis-context" not in topics(run(admin, b.obs(b.CA, 9.0), b.obs(b.P, 4.0)))
