"""Cards are valid CDS Hooks 2.0 and explain themselves; RiskAssessments are valid FHIR R4."""

from __future__ import annotations

import re

import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment

from service.cds.cards import NOT_PROBABILITY
from tests.builders import ALB, CA, ICD10, P, ago, condition, esrd, med_admin, med_request, obs, procedure, renal_panel
from tests.schema import assert_valid

TOPICS = {
    "calciphylaxis-risk",
    "metastatic-calcification-risk",
    "established-calciphylaxis",
    "calcinosis-cutis-present",
    "dystrophic-calcinosis-context",
    "iatrogenic-calcinosis-context",
    "severe-hypercalcemia",
    "moderate-hypercalcemia",
}

SCENARIOS = {
    "high": lambda: (esrd(), *renal_panel(alb=2.8, ca=10.0, p=7.5), med_request("11289")),
    "incomplete": lambda: (esrd(),),
    "established": lambda: (esrd(), *renal_panel(), condition("237900002"), med_request("11289")),
    "severe": lambda: (obs(CA, 13.5), obs(ALB, 2.5, "g/dL"), obs(P, 3.0)),
    "moderate": lambda: (obs(CA, 12.5), obs(ALB, 4.1, "g/dL"), obs(P, 3.0)),
    "context": lambda: (condition("L94.2", ICD10), condition("89155008"), med_admin("1908", route=("http://snomed.info/sct", "47625008"))),
    "insufficient": lambda: (condition("31541009"),),
    "dialysis": lambda: (esrd(), *renal_panel(alb=2.8, ca=10.0, p=7.5), *(procedure("302497006", days=d) for d in (2, 4, 7, 9, 11))),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_cards_valid_and_explained(run, name) -> None:
    ev = run(*SCENARIOS[name]())
    cards = ev.assessment.cards
    assert cards, name
    assert_valid({"cards": cards}, "CDSResponse")
    for card in cards:
        assert card["source"]["topic"]["code"] in TOPICS
        assert len(card["summary"]) < 140
        assert NOT_PROBABILITY in card["detail"]
        assert "Evidence:" in card["detail"]
        assert re.search(r"Rule `[a-z.-]+` · rules \S+ · mappings [0-9a-f]{16}", card["detail"])
        assert card["overrideReasons"]
        # Every fact row carries a source reference, and its code (REFERENCE §2 principle 1) unless it is derived
        # from two facts (the Ca×P product names both sources in its value) or is the Patient's sex.
        for row in card["detail"].splitlines():
            if row.startswith("| ") and not row.startswith("| Factor"):
                cells = [c.strip() for c in row.strip("|").split("|")]
                assert re.fullmatch(r"[A-Z][A-Za-z]+/[^\s,]+(, [A-Z][A-Za-z]+/[^\s,]+)*", cells[5]), row
                if cells[1] not in ("Calcium × phosphate product", "Sex"):
                    assert re.fullmatch(r"(LOINC|SNOMED CT|ICD-10-CM|ICD-10-PCS|RxNorm|CPT|HCPCS) \S+", cells[2]), row


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_card_and_suggestion_has_its_own_uuid(run, name) -> None:
    """In "incomplete" the calciphylaxis and the metastatic card both suggest a renal panel: two suggestions."""
    cards = run(*SCENARIOS[name]()).cards
    found = [c["uuid"] for c in cards] + [s["uuid"] for c in cards for s in c.get("suggestions", [])]
    assert len(found) == len(set(found))


def test_card_uuid_stable_and_input_sensitive(run) -> None:
    resources = SCENARIOS["high"]()
    a = run(*resources).assessment.cards
    b = run(*resources).assessment.cards
    assert [c["uuid"] for c in a] == [c["uuid"] for c in b]
    changed = run(*resources, obs(CA, 9.0, days=40)).assessment.cards
    assert a[0]["uuid"] != changed[0]["uuid"]


def test_high_card_lists_every_fact(run) -> None:
    ev = run(*SCENARIOS["high"]())
    card = next(c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "calciphylaxis-risk")
    for factor in ev.assessment.calciphylaxis.factors:
        for e in factor.evidence:
            assert e.reference in card["detail"]
    assert "mg/dL" in card["detail"] and "> 5.5 mg/dL" in card["detail"]


def test_facts_that_differ_only_in_date_and_source_are_one_row_with_every_source(run) -> None:
    """Hemodialysis three times a week is one row, not one per session, and names every session, newest first."""
    sessions = [procedure("302497006", days=d) for d in (2, 4, 7, 9, 11)]

    def dialysis_row(*procedures: dict[str, object]) -> list[str]:
        ev = run(esrd(), *renal_panel(alb=2.8, ca=10.0, p=7.5), *procedures)
        card = next(c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "calciphylaxis-risk")
        rows = [row for row in card["detail"].splitlines() if "SNOMED CT 302497006" in row]
        assert len(rows) == 1, rows
        return [c.strip() for c in rows[0].strip("|").split("|")]

    cells = dialysis_row(*sessions)
    assert cells[4] == f"{ago(2)[:10]} (5 since {ago(11)[:10]})"
    assert cells[5] == ", ".join(f"Procedure/{p['id']}" for p in sessions)
    assert dialysis_row(sessions[0])[4] == ago(2)[:10], "a single fact keeps its plain date"


def test_no_card_for_none(run) -> None:
    assert run(*renal_panel()).assessment.cards == []


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_risk_assessments_valid_fhir(run, name) -> None:
    ev = run(*SCENARIOS[name]())
    for resource in ev.risk_assessments:
        model = RiskAssessment.model_validate(resource)
        assert model.subject.reference == "Patient/p1"
        assert model.identifier[0].value.startswith("p1-")
        assert "not a validated probability" in model.note[0].text
        for basis in model.basis or []:
            assert "/" in basis.reference


def test_risk_assessment_per_flag(run) -> None:
    ev = run(*SCENARIOS["high"]())
    flags = sorted(r["identifier"][0]["value"] for r in ev.risk_assessments)
    assert flags == ["p1-calciphylaxis", "p1-metastatic-calcification"]
    cal = next(r for r in ev.risk_assessments if r["identifier"][0]["value"] == "p1-calciphylaxis")
    assert cal["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "high"
    assert len(cal["basis"]) >= 3


def test_a_risk_assessment_from_incomplete_data_says_so(run) -> None:
    """REFERENCE §2.3: a tier reached without the results it needs is "(incomplete data)"; the written RiskAssessment
    must not read as a reassuring "low" where the card says incomplete."""
    ev = run(esrd())  # kidney failure, no laboratory results at all
    cal = next(r for r in ev.risk_assessments if r["identifier"][0]["value"] == "p1-calciphylaxis")
    risk = cal["prediction"][0]["qualitativeRisk"]
    assert risk["coding"][0]["code"] == "low"
    assert risk["text"].startswith("low (incomplete data)")
    assert "incomplete data: no valid" in cal["prediction"][0]["rationale"] and "intact PTH" in cal["prediction"][0]["rationale"]
    complete = next(r for r in run(esrd(), *renal_panel()).risk_assessments if r["identifier"][0]["value"] == "p1-calciphylaxis")
    assert "incomplete" not in complete["prediction"][0]["qualitativeRisk"]["text"] + complete["prediction"][0]["rationale"]
