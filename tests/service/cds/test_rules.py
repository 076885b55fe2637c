"""Every branch of REFERENCE §2.2–2.5."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.cds.thresholds import Thresholds
from tests.builders import (
    ALB,
    ALP,
    BMI,
    CA,
    CA_CORR_REPORTED,
    CPT,
    EGFR,
    HEIGHT,
    ICA,
    ICD10,
    PTH,
    SNOMED,
    WEIGHT,
    P,
    condition,
    esrd,
    med_admin,
    med_request,
    med_statement,
    obs,
    patient,
    procedure,
    renal_panel,
)

# ----------------------------------------------------------------------------- §2.2 renal context


@pytest.mark.parametrize(("value", "context"), [(14.96, "R2"), (15, "R1"), (29.96, "R1"), (30, "R0")])
def test_egfr_is_compared_as_reported_not_rounded(run, value, context) -> None:
    """REFERENCE §2.1 rounds calcium, phosphate and Ca×P before comparison, not eGFR: 14.96 is below 15."""
    ev = run(obs(EGFR, value, "mL/min/{1.73_m2}", days=20))
    assert ev.assessment.renal_context == context
    (row,) = ev.assessment.renal_evidence
    assert row.value == str(value)


@pytest.mark.parametrize(
    "resource",
    [
        condition("46177005"),
        condition("N18.6", ICD10),
        condition("N186", ICD10),  # dotless ICD-10-CM
        condition("Z99.2", ICD10, clinical="inactive"),  # status code: current unless resolved
        condition("Z94.0", ICD10),
        condition("737295003"),
        procedure("302497006", days=30),
        procedure("90935", CPT, days=80),
        procedure("70536003", days=2000),  # transplant: any time
        obs(EGFR, 12, "mL/min/{1.73_m2}", days=20),
    ],
)
def test_r2_paths(run, resource) -> None:
    assert run(resource).assessment.renal_context == "R2"


@pytest.mark.parametrize(
    "resource",
    [condition("N18.4", ICD10), condition("431857002"), obs(EGFR, 22, "mL/min/{1.73_m2}", days=20), obs(EGFR, 15, "mL/min/{1.73_m2}", days=20)],
)
def test_r1_paths(run, resource) -> None:
    assert run(resource).assessment.renal_context == "R1"


@pytest.mark.parametrize(
    "resource",
    [
        procedure("302497006", days=100),  # dialysis outside 90 d
        obs(EGFR, 30, "mL/min/{1.73_m2}", days=20),
        obs(EGFR, 10, "mL/min/{1.73_m2}", days=400),  # stale eGFR
        obs(EGFR, 10, "mL/min", days=20),  # wrong unit: excluded
        condition("Z99.2", ICD10, clinical="resolved"),
        condition("46177005", clinical="resolved"),
        condition("46177005", verification="entered-in-error"),
    ],
)
def test_r0_paths(run, resource) -> None:
    assert run(resource).assessment.renal_context == "R0"


def test_only_latest_egfr_counts(run) -> None:
    ev = run(obs(EGFR, 12, "mL/min/{1.73_m2}", days=100), obs(EGFR, 45, "mL/min/{1.73_m2}", days=10))
    assert ev.assessment.renal_context == "R0"


# ----------------------------------------------------------------------------- §2.3 calciphylaxis tiers


def _r2(*extra):
    return (esrd(), *extra)


def test_r2_no_factors_low_and_no_card(run) -> None:
    ev = run(*_r2(*renal_panel()))
    cal = ev.assessment.calciphylaxis
    assert (cal.tier, cal.incomplete_data, cal.major_factors, cal.minor_factors) == ("low", False, [], [])
    assert not [c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "calciphylaxis-risk"]


def test_low_complete_card_is_configurable(run) -> None:
    ev = run(*_r2(*renal_panel()), thresholds=Thresholds(card_for_low_complete=True))
    assert [c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "calciphylaxis-risk"]


def test_r2_one_major_is_moderate(run) -> None:
    ev = run(*_r2(*renal_panel(), med_request("11289")))
    assert ev.assessment.calciphylaxis.tier == "moderate"
    assert ev.assessment.calciphylaxis.major_factors == ["M1"]


def test_r2_two_majors_is_high(run) -> None:
    ev = run(*_r2(*renal_panel(alb=2.8), med_request("11289")))
    cal = ev.assessment.calciphylaxis
    assert cal.tier == "high" and cal.major_factors == ["M1", "M3"]
    card = next(c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "calciphylaxis-risk")
    assert card["indicator"] == "warning"


def test_r2_one_major_three_minors_is_high(run) -> None:
    ev = run(
        *_r2(*renal_panel(), med_request("11289"), condition("44054006"), med_request("214342")),
        gender="female",
    )
    cal = ev.assessment.calciphylaxis
    assert cal.major_factors == ["M1"]
    assert cal.minor_factors == ["female", "diabetes", "calcium_binder"]
    assert cal.tier == "high"


def test_r2_three_minors_is_moderate(run) -> None:
    ev = run(*_r2(*renal_panel(), condition("44054006"), med_request("214342"), med_request("1894")), gender="male")
    cal = ev.assessment.calciphylaxis
    assert cal.minor_factors == ["diabetes", "calcium_binder", "vitamin_d_therapy"]
    assert cal.tier == "moderate"


def test_r1_steps_down_one_level(run) -> None:
    ev = run(condition("N18.4", ICD10), *renal_panel(alb=2.8), med_request("11289"))
    assert ev.assessment.renal_context == "R1"
    assert ev.assessment.calciphylaxis.tier == "moderate"  # high in R2
    ev = run(condition("N18.4", ICD10), *renal_panel(), med_request("11289"))
    assert ev.assessment.calciphylaxis.tier == "low"  # moderate in R2


def test_r0_vka_with_two_minors_is_low(run) -> None:
    ev = run(med_request("11289"), condition("44054006"), gender="female")
    assert ev.assessment.renal_context == "R0"
    assert ev.assessment.calciphylaxis.tier == "low"


def test_r0_vka_with_one_minor_is_none(run) -> None:
    ev = run(med_request("11289"), gender="female")
    assert ev.assessment.calciphylaxis.tier == "none"
    assert ev.assessment.cards == []


def test_r0_never_incomplete(run) -> None:
    ev = run()
    assert ev.assessment.calciphylaxis.incomplete_data is False
    assert ev.assessment.calciphylaxis.tier == "none"


def test_missing_labs_in_r2_incomplete_with_order_suggestions(run, catalog) -> None:
    ev = run(esrd())
    cal = ev.assessment.calciphylaxis
    assert cal.tier == "low" and cal.incomplete_data is True
    assert ev.assessment.suggested_orders == ["renal_panel", "pth"]
    card = next(c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "calciphylaxis-risk")
    assert "(incomplete data)" in card["summary"]
    loincs = [a["resource"]["code"]["coding"][0]["code"] for s in card["suggestions"] for a in s["actions"]]
    expected = [*catalog.order_sets["renal_panel"].codes, *catalog.order_sets["pth"].codes]
    assert loincs == expected
    assert card["selectionBehavior"] == "any"


def test_missing_pth_only_marks_incomplete(run) -> None:
    ev = run(esrd(), *renal_panel(pth=None))
    assert ev.assessment.calciphylaxis.incomplete_data is True
    assert ev.assessment.suggested_orders == ["pth"]


def test_stale_labs_are_not_used_but_shown(run) -> None:
    ev = run(esrd(), *renal_panel(ca=11.5, days=120))
    assert ev.assessment.calciphylaxis.incomplete_data is True
    assert any("stale" in n for n in ev.assessment.notes)
    card = next(c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "calciphylaxis-risk")
    assert "last known (stale)" in card["detail"]


def test_established_calciphylaxis_suppresses_tier_and_lists_modifiable(run) -> None:
    ev = run(esrd(), *renal_panel(), condition("237900002"), med_request("11289"), med_request("214342"))
    assert ev.assessment.calciphylaxis.tier == "established"
    card = next(c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "established-calciphylaxis")
    assert "2 modifiable" in card["summary"]
    assert card["indicator"] == "info"  # REFERENCE §2.3: an INFO card
    assert not [c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "calciphylaxis-risk"]


# ----------------------------------------------------------------------------- majors M2–M4


@pytest.mark.parametrize(("p", "fires"), [(5.5, False), (5.51, True), (5.49, False)])
def test_m2_phosphate_renal_threshold(run, p, fires) -> None:
    ev = run(esrd(), *renal_panel(p=p, ca=8.5))
    assert ("M2" in ev.assessment.calciphylaxis.major_factors) is fires


def test_m2_phosphate_nonrenal_threshold(run) -> None:
    assert run(obs(P, 4.6)).assessment.metastatic_calcification.hyperphosphatemia is True
    assert run(obs(P, 4.5)).assessment.metastatic_calcification.hyperphosphatemia is False


@pytest.mark.parametrize(("ca", "fires"), [(10.2, False), (10.21, True)])
def test_m2_corrected_calcium_renal_threshold(run, ca, fires) -> None:
    ev = run(esrd(), *renal_panel(ca=ca, p=4.0, alb=4.2))
    assert ("M2" in ev.assessment.calciphylaxis.major_factors) is fires


def test_corrected_calcium_float_artefact_and_slope(run) -> None:
    # REFERENCE §2.6: Ca 9.4, albumin 3.0 → 10.2 with slope 0.8 (not above 10.2), 10.4 with slope 1.0 (above).
    ev = run(esrd(), *renal_panel(ca=9.4, alb=3.0, p=4.0))
    assert ev.assessment.calcium["corrected_mg_dl"] == "10.2"
    assert ev.assessment.calcium["measured_mg_dl"] == "9.4"
    assert ev.assessment.metastatic_calcification.hypercalcemia is False
    ev = run(esrd(), *renal_panel(ca=9.4, alb=3.0, p=4.0), thresholds=Thresholds(correction_slope=Decimal("1.0")))
    assert ev.assessment.calcium["corrected_mg_dl"] == "10.4"
    assert ev.assessment.metastatic_calcification.hypercalcemia is True
    assert ev.assessment.rules_version != Thresholds().rules_version()


def test_albumin_at_or_above_4_means_no_correction(run) -> None:
    ev = run(obs(CA, 10.0), obs(ALB, 4.5, "g/dL"))
    assert ev.assessment.calcium["corrected_mg_dl"] == "10"


def test_albumin_beyond_72_hours_is_not_used_for_correction(run) -> None:
    ev = run(obs(CA, 10.0, days=1), obs(ALB, 2.5, "g/dL", days=5))
    assert ev.assessment.calcium["corrected_mg_dl"] == "10"
    assert "no albumin" in ev.assessment.calcium["note"]


def test_paired_normal_ionized_overrides_high_corrected(run) -> None:
    ev = run(obs(CA, 14.5, days=1), obs(ICA, 1.2, "mmol/L", days=1, hours=2))
    assert ev.assessment.metastatic_calcification.hypercalcemia is False
    assert not [c for c in ev.assessment.cards if "hypercalcemia" in c["source"]["topic"]["code"]]


def test_an_ionized_calcium_newer_than_the_total_calcium_decides(run) -> None:
    """The newest calcium result decides: an ionized calcium drawn after the last total calcium (and its own paired
    ionized value) supersedes them; a high one is M2 and hypercalcemia, with the superseded values shown unthresholded."""
    newer = obs(ICA, 1.45, "mmol/L", days=1)
    ev = run(esrd(), obs(CA, 9.0, days=10), obs(ICA, 1.20, "mmol/L", days=10, hours=-1), obs(P, 4.0, days=10), obs(ALB, 4.2, "g/dL", days=10), newer)
    assert ev.assessment.calcium is not None and ev.assessment.calcium["basis"] == "ionized"
    assert ev.assessment.calcium["ionized_mmol_l"] == "1.45"
    assert ev.assessment.metastatic_calcification.hypercalcemia is True
    m2 = next(f for f in ev.assessment.calciphylaxis.factors if f.id == "M2")
    assert [(e.reference, e.value, e.threshold, e.note) for e in m2.evidence] == [
        (f"Observation/{newer['id']}", "1.45", "> 1.3 mmol/L", "newer than the total calcium: decides")
    ]


def test_an_ionized_calcium_older_than_the_total_calcium_is_superseded(run) -> None:
    """A high ionized calcium two months before a normal total calcium (no ionized value with it) is not hypercalcemia
    now: the newer total calcium supersedes it."""
    old = obs(ICA, 1.40, "mmol/L", days=60)
    ev = run(esrd(), *renal_panel(), old)
    assert ev.assessment.metastatic_calcification.hypercalcemia is False
    assert "M2" not in ev.assessment.calciphylaxis.major_factors
    assert ev.assessment.calcium is not None and ev.assessment.calcium["basis"] == "corrected"
    assert ev.assessment.calcium["ionized_mmol_l"] == "1.4"  # read and reported, not deciding


def test_a_total_calcium_in_the_severe_band_with_a_normal_paired_ionized_calcium_is_noted_as_discordant(run) -> None:
    ev = run(obs(CA, 14.2, days=1), obs(ICA, 1.25, "mmol/L", days=1, hours=2))
    assert ev.assessment.metastatic_calcification.hypercalcemia is False
    assert not [c for c in ev.assessment.cards if "hypercalcemia" in c["source"]["topic"]["code"]]
    (note,) = [n for n in ev.assessment.notes if "discordant" in n]
    assert "14.2 mg/dL" in note and "1.25 mmol/L" in note


@pytest.mark.parametrize("value", [1e200, "1e200", -1e16])
def test_an_absurd_value_is_excluded_not_a_failure(run, value) -> None:
    """A value no laboratory reports (it would overflow the rounding of a Ca×P product) is excluded with its reason;
    the rest of the record is assessed."""
    absurd = obs(CA, 9.0, days=1)
    absurd["valueQuantity"]["value"] = value
    ev = run(esrd(), *renal_panel(ca=9.5), absurd)
    reasons = {e.reference: e.reason for e in ev.assessment.excluded}
    assert reasons[f"Observation/{absurd['id']}"] == "valueQuantity.value is missing, not a number or out of range"
    assert ev.assessment.calcium is not None and ev.assessment.calcium["measured_mg_dl"] == "9.5"


def test_an_absurd_reference_limit_is_not_used(run) -> None:
    pth = obs(PTH, 700, "pg/mL", days=5)
    pth["referenceRange"] = [{"high": {"value": 1e200, "unit": "pg/mL", "system": "http://unitsofmeasure.org", "code": "pg/mL"}}]
    assert "M4" in run(esrd(), *renal_panel(pth=None), pth).assessment.calciphylaxis.major_factors  # default ULN 65: 585


def test_m2_product_above_70(run) -> None:
    ev = run(esrd(), *renal_panel(ca=10.0, p=7.01))  # 70.1 > 70 (P also > 5.5)
    m2 = next(f for f in ev.assessment.calciphylaxis.factors if f.id == "M2")
    assert any(e.label == "Calcium × phosphate product" for e in m2.evidence)


def test_m3_albumin_below_3_and_minor_band(run) -> None:
    assert "M3" in run(esrd(), *renal_panel(alb=2.99)).assessment.calciphylaxis.major_factors
    ev = run(esrd(), *renal_panel(alb=3.0))
    assert "M3" not in ev.assessment.calciphylaxis.major_factors
    assert "albumin_3_0_to_3_49" in ev.assessment.calciphylaxis.minor_factors
    assert "albumin_3_0_to_3_49" not in run(esrd(), *renal_panel(alb=3.5)).assessment.calciphylaxis.minor_factors


@pytest.mark.parametrize(("comparator", "value", "fires"), [(">", 2500, True), (">", 585, True), (">=", 585, False), (">=", 600, True), (">", 300, False)])
def test_a_pth_above_the_assay_range_is_kept_and_decides_m4_when_it_can(run, comparator, value, fires) -> None:
    """ "> 2500 pg/mL" (above the assay's range) is a valid result: M4 asks only whether PTH exceeds 9 × ULN (585), which
    "> v" answers when v ≥ 585. It is shown with its comparator, and PTH is not "missing"."""
    pth = obs(PTH, value, "pg/mL", days=5)
    pth["valueQuantity"]["comparator"] = comparator
    ev = run(esrd(), *renal_panel(pth=None), pth)
    cal = ev.assessment.calciphylaxis
    assert ("M4" in cal.major_factors) is fires
    assert not cal.incomplete_data and "pth" not in ev.assessment.suggested_orders
    if fires:
        (row,) = next(f for f in cal.factors if f.id == "M4").evidence
        assert row.value == f"{comparator}{value}"


def test_a_calcium_with_a_comparator_is_still_excluded(run) -> None:
    ca = obs(CA, 15, days=1)
    ca["valueQuantity"]["comparator"] = ">"
    reasons = {e.reference: e.reason for e in run(esrd(), ca).assessment.excluded}
    assert reasons[f"Observation/{ca['id']}"] == "value has comparator >"


def test_m4_pth_default_uln(run) -> None:
    assert "M4" not in run(esrd(), *renal_panel(pth=585)).assessment.calciphylaxis.major_factors
    assert "M4" in run(esrd(), *renal_panel(pth=585.1)).assessment.calciphylaxis.major_factors


def test_m4_pth_uses_reference_range_uln_converted(run) -> None:
    # ULN 7.4 pmol/L = 69.7 pg/mL → 9 × ULN = 627.7 pg/mL
    labs = [*renal_panel(pth=None), obs(PTH, 600, "pg/mL", days=3, ref_high=(7.4, "pmol/L"))]
    assert "M4" not in run(esrd(), *labs).assessment.calciphylaxis.major_factors
    labs = [*renal_panel(pth=None), obs(PTH, 640, "pg/mL", days=3, ref_high=(7.4, "pmol/L"))]
    assert "M4" in run(esrd(), *labs).assessment.calciphylaxis.major_factors


def test_pth_in_pmol_per_l_converted(run) -> None:
    labs = [*renal_panel(pth=None), obs("14866-8", 70, "pmol/L", days=3)]  # 659.75 pg/mL
    assert "M4" in run(esrd(), *labs).assessment.calciphylaxis.major_factors


# ----------------------------------------------------------------------------- minors


@pytest.mark.parametrize(("bmi", "fires"), [(30.0, True), (29.9, False), (29.95, True)])
def test_bmi_threshold_inclusive(run, bmi, fires) -> None:
    ev = run(esrd(), *renal_panel(), obs(BMI, bmi, "kg/m2", days=30))
    assert ("bmi_ge_30" in ev.assessment.calciphylaxis.minor_factors) is fires


def test_obesity_code_only_without_bmi(run) -> None:
    assert "bmi_ge_30" in run(esrd(), *renal_panel(), condition("414916001")).assessment.calciphylaxis.minor_factors
    ev = run(esrd(), *renal_panel(), condition("414916001"), obs(BMI, 25, "kg/m2", days=30))
    assert "bmi_ge_30" not in ev.assessment.calciphylaxis.minor_factors


def test_bmi_computed_from_weight_and_height(run) -> None:
    ev = run(esrd(), *renal_panel(), obs(WEIGHT, 100, "kg", days=30), obs(HEIGHT, 180, "cm", days=900))
    assert "bmi_ge_30" in ev.assessment.calciphylaxis.minor_factors  # 30.9


def test_alp_above_uln_and_liver_and_steroid(run) -> None:
    ev = run(esrd(), *renal_panel(), obs(ALP, 121, "U/L", days=10), condition("235856003"), med_request("8640"))
    minors = ev.assessment.calciphylaxis.minor_factors
    assert {"alp_gt_uln", "liver_disease", "systemic_corticosteroid"} <= set(minors)
    assert "alp_gt_uln" not in run(esrd(), *renal_panel(), obs(ALP, 120, "U/L", days=10)).assessment.calciphylaxis.minor_factors


def test_thrombophilia_minor_is_optional(run) -> None:
    c = condition("D68.51", ICD10)
    assert "thrombophilia" not in run(esrd(), *renal_panel(), c).assessment.calciphylaxis.minor_factors
    ev = run(esrd(), *renal_panel(), c, thresholds=Thresholds(count_thrombophilia_minor=True))
    assert "thrombophilia" in ev.assessment.calciphylaxis.minor_factors


@pytest.mark.parametrize(
    ("route", "route_text", "counts"),
    [
        ((SNOMED, "6064005"), None, False),  # topical
        ((SNOMED, "447694001"), None, False),  # respiratory tract (inhaled)
        (None, "Topical", False),
        (None, "apply to skin", False),
        ((SNOMED, "26643006"), None, True),  # oral
        (None, "by mouth", True),  # a route that is not local
        (None, None, True),  # no route: counted, as before
    ],
)
def test_a_corticosteroid_given_only_by_a_local_route_is_not_systemic(run, route, route_text, counts) -> None:
    """REFERENCE §2.3: "current systemic corticosteroid". Hydrocortisone cream is not one."""
    order = med_request("5492", route=route, route_text=route_text)
    ev = run(esrd(), *renal_panel(), order)
    assert ("systemic_corticosteroid" in ev.assessment.calciphylaxis.minor_factors) is counts
    reasons = {e.reference: e.reason for e in ev.assessment.excluded}
    assert (f"MedicationRequest/{order['id']}" in reasons) is not counts


def test_inactive_medications_do_not_count(run) -> None:
    ev = run(esrd(), *renal_panel(), med_request("214342", status="stopped"), med_request("1894", status="cancelled"))
    assert ev.assessment.calciphylaxis.minor_factors == []


def test_medication_statement_period_overlapping_now_counts(run) -> None:
    ev = run(esrd(), *renal_panel(), med_statement("1894", status="unknown", start_days=30, end_days=-30))
    assert "vitamin_d_therapy" in ev.assessment.calciphylaxis.minor_factors


@pytest.mark.parametrize(
    "resource",
    [
        med_request("214342", status="stopped", authored_days=30, validity_end_days=-60),
        med_request("214342", status="cancelled", authored_days=30, validity_end_days=-60),
        med_request("214342", status="draft", authored_days=30, validity_end_days=-60),
        med_statement("214342", status="not-taken", start_days=30, end_days=-30),
        med_statement("214342", status="stopped", start_days=30, end_days=-30),
        med_statement("214342", status="completed", start_days=30, end_days=-30),  # FHIR: "no longer being taken"
    ],
)
def test_a_status_that_says_not_taken_wins_over_a_period_reaching_past_now(run, resource) -> None:
    """A MedicationRequest's validity period is its dispensing window and outlives a stop or a cancellation; a
    statement's status says whether the drug is taken: neither period makes the binder current."""
    ev = run(esrd(), *renal_panel(), resource)
    assert "calcium_binder" not in ev.assessment.calciphylaxis.minor_factors
    assert ev.assessment.calciphylaxis.tier == "low"


@pytest.mark.parametrize(
    "resource",
    [
        med_request("11289", status="cancelled", validity_end_days=-60),
        med_request("11289", status="draft"),
        med_statement("11289", status="not-taken", start_days=30, end_days=-30),
    ],
)
def test_a_warfarin_never_taken_is_excluded_with_its_status(run, resource) -> None:
    ev = run(esrd(), *renal_panel(), resource)
    assert "M1" not in ev.assessment.calciphylaxis.major_factors
    reasons = {e.reference: e.reason for e in ev.assessment.excluded}
    assert reasons[f"{resource['resourceType']}/{resource['id']}"] == f"status {resource['status']}: not taken"


def test_a_warfarin_order_stopped_inside_its_dispensing_window_counts_only_when_that_is_certainly_within_90_days(run) -> None:
    """Stopped while its validity period still runs: it stopped between the order and now. Ordered 30 days ago, that is
    within the 90-day lookback for certain (M1, shown as stopped, dated by the order); ordered 200 days ago, it is not
    known to be."""
    recent = med_request("11289", status="stopped", authored_days=30, validity_end_days=-300)
    ev = run(esrd(), *renal_panel(), recent)
    m1 = next(f for f in ev.assessment.calciphylaxis.factors if f.id == "M1")
    assert [(e.reference, e.value, e.date) for e in m1.evidence] == [(f"MedicationRequest/{recent['id']}", "stopped", recent["authoredOn"])]
    old = med_request("11289", status="stopped", authored_days=200, validity_end_days=-100)
    assert "M1" not in run(esrd(), *renal_panel(), old).assessment.calciphylaxis.major_factors


# ----------------------------------------------------------------------------- §2.4 metastatic


def test_metastatic_high_moderate_boundaries(run) -> None:
    assert run(obs(CA, 10.0), obs(P, 7.01)).assessment.metastatic_calcification.tier == "high"
    assert run(obs(CA, 10.0), obs(P, 7.0)).assessment.metastatic_calcification.tier == "moderate"  # 70.0: not > 70
    assert run(obs(CA, 10.0), obs(P, 5.5), obs(ALB, 4.0, "g/dL")).assessment.metastatic_calcification.tier == "moderate"  # 55.0
    tier = run(obs(CA, 9.0), obs(P, 4.4), obs(ALB, 4.0, "g/dL")).assessment.metastatic_calcification.tier
    assert tier == "none"


def test_metastatic_child_threshold(run) -> None:
    labs = (obs(CA, 10.0), obs(P, 6.0, ref_high=(6.5, "mg/dL")), obs(ALB, 4.0, "g/dL"))  # 60
    assert run(*labs, birth="2016-01-01").assessment.metastatic_calcification.tier == "none"  # age 9: ≥ 65 needed
    assert run(*labs, birth="2010-01-01").assessment.metastatic_calcification.tier == "moderate"  # age 15: ≥ 55


def test_paediatric_phosphate_uses_reference_range(run) -> None:
    ev = run(obs(P, 6.0, ref_high=(6.5, "mg/dL")), birth="2015-01-01")
    assert ev.assessment.metastatic_calcification.hyperphosphatemia is False  # 6.0 > 4.5 in adults
    ev = run(obs(P, 6.6, ref_high=(6.5, "mg/dL")), birth="2015-01-01")
    assert ev.assessment.metastatic_calcification.hyperphosphatemia is True


def test_metastatic_moderate_hyper_with_pred(run) -> None:
    ev = run(condition("31541009"), obs(CA, 10.6), obs(P, 3.5), obs(ALB, 4.1, "g/dL"))
    assert ev.assessment.metastatic_calcification.tier == "moderate"
    assert [f.id for f in ev.assessment.metastatic_calcification.predisposing] == ["sarcoidosis"]


def test_metastatic_low_hyper_without_pred(run) -> None:
    ev = run(obs(CA, 10.6), obs(P, 3.5), obs(ALB, 4.1, "g/dL"))
    assert ev.assessment.metastatic_calcification.tier == "low"
    assert not [c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "metastatic-calcification-risk"]


def test_metastatic_low_pred_with_normal_labs(run) -> None:
    ev = run(condition("66999008"), obs(CA, 9.5), obs(P, 3.5), obs(ALB, 4.1, "g/dL"))
    assert ev.assessment.metastatic_calcification.tier == "low"


def test_metastatic_insufficient_data(run) -> None:
    ev = run(condition("66999008"), obs(CA, 9.5))
    assert ev.assessment.metastatic_calcification.tier == "insufficient-data"
    card = next(c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "metastatic-calcification-risk")
    assert card["suggestions"][0]["actions"]


def test_metastatic_none(run) -> None:
    assert run().assessment.metastatic_calcification.tier == "none"


# ----------------------------------------------------------------------------- hypercalcemia severity


def test_severe_hypercalcemia_card_is_critical(run) -> None:
    ev = run(obs(CA, 13.0), obs(ALB, 2.5, "g/dL"))  # corrected 14.2
    card = next(c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "severe-hypercalcemia")
    assert card["indicator"] == "critical" and "14.2" in card["summary"]
    assert "9.4" not in card["summary"]
    assert "13" in card["detail"]  # measured value shown too


def test_moderate_hypercalcemia_card_suggests_workup(run, catalog) -> None:
    ev = run(obs(CA, 12.0), obs(ALB, 4.0, "g/dL"))
    card = next(c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "moderate-hypercalcemia")
    assert card["indicator"] == "warning"
    labels = [s["label"] for s in card["suggestions"]]
    assert len(labels) == 4 and any("PTHrP" in x for x in labels)


def _m2(ev) -> list:
    return next(f for f in ev.assessment.calciphylaxis.factors if f.id == "M2").evidence


def _topic_card(ev, topic: str) -> dict:
    return next(c for c in ev.assessment.cards if c["source"]["topic"]["code"] == topic)


def test_severity_card_names_the_measured_calcium_when_nothing_was_corrected(run) -> None:
    """No albumin: the card must not call the measured value "corrected", and shows the severity band as threshold."""
    card = _topic_card(run(obs(CA, 14.2)), "severe-hypercalcemia")
    assert card["summary"] == "URGENT: severe hypercalcemia, measured calcium 14.2 mg/dL (≥ 14)"
    assert "corrected" not in card["summary"]
    [row] = [line for line in card["detail"].splitlines() if line.startswith("| Calcium |")]
    assert row.endswith("| ≥ 14 mg/dL |")
    assert "> 10.4" not in card["detail"], "the hypercalcemia threshold is not the severity band"


def test_moderate_severity_card_shows_its_band(run) -> None:
    card = _topic_card(run(obs(CA, 11.0), obs(ALB, 2.5, "g/dL")), "moderate-hypercalcemia")  # corrected 12.2
    assert card["summary"] == "Moderate hypercalcemia: corrected calcium 12.2 mg/dL (12 to < 14)"
    assert "| Calcium | Calcium, albumin-corrected | LOINC 17861-6 | 12.2 mg/dL" in card["detail"]
    assert "| 12 to < 14 mg/dL |" in card["detail"]


def test_m2_from_a_paired_ionized_calcium_lists_only_the_ionized_value(run) -> None:
    """A total calcium under its threshold did not fire M2 and is not listed under it."""
    ev = run(esrd(), *renal_panel(ca=9.4, p=4.0, alb=4.2), obs(ICA, 1.35, "mmol/L", days=3))
    assert [e.label for e in _m2(ev)] == [ev.facts.labs["calcium_ionized"][0].label]
    total = next(e for e in ev.outcome.calcium.evidence if e.label == "Calcium, total (measured)")
    assert total.threshold is None and "decided by the ionized calcium of the same draw" in (total.note or "")


def test_m2_from_a_corrected_calcium_lists_it_with_its_inputs_and_the_ckd_caveat(run) -> None:
    ev = run(esrd(), *renal_panel(ca=9.6, p=4.0, alb=3.0))  # corrected 10.4 > 10.2
    labels = [e.label for e in _m2(ev)]
    assert labels == ["Calcium, albumin-corrected", "Calcium, total (measured)", "Albumin (for correction)"]
    corrected = _m2(ev)[0]
    assert corrected.value == "10.4" and corrected.threshold == "> 10.2 mg/dL (R1/R2)"
    assert "Lian 2018" in (corrected.note or "")


def test_m2_from_an_uncorrected_calcium_lists_the_measured_value_once(run) -> None:
    ev = run(esrd(), *renal_panel(ca=10.5, p=4.0, alb=4.2))
    [row] = _m2(ev)
    assert (row.label, row.value, row.threshold) == ("Calcium, total (measured)", "10.5", "> 10.2 mg/dL (R1/R2)")
    assert "Lian" not in (row.note or "")


def test_reported_corrected_calcium_keeps_its_reported_si_value(run) -> None:
    ev = run(esrd(), obs(CA_CORR_REPORTED, 2.65, "mmol/L"))
    [row] = _m2(ev)
    assert row.value == "10.62" and "reported 2.65 mmol/L" in (row.note or "")


def test_reported_corrected_calcium_used_without_total(run) -> None:
    ev = run(obs(CA_CORR_REPORTED, 3.6, "mmol/L"))  # 14.43 mg/dL
    assert any(c["source"]["topic"]["code"] == "severe-hypercalcemia" for c in ev.assessment.cards)


# ----------------------------------------------------------------------------- §2.5 context


def test_calcinosis_cutis_card(run) -> None:
    ev = run(condition("L94.2", ICD10))
    assert [c["source"]["topic"]["code"] for c in ev.assessment.cards] == ["calcinosis-cutis-present"]


@pytest.mark.parametrize("code", [("89155008", SNOMED), ("M34.0", ICD10), ("M34.81", ICD10), ("M33.02", ICD10), ("55464009", SNOMED)])
def test_dystrophic_context_card(run, code) -> None:
    ev = run(condition(code[0], code[1]))
    assert [c["source"]["topic"]["code"] for c in ev.assessment.cards] == ["dystrophic-calcinosis-context"]


@pytest.mark.parametrize(
    ("code", "expected", "absent"),
    [
        (("89155008", SNOMED), ["Systemic sclerosis:"], ["Juvenile dermatomyositis:", "PXE"]),
        (("M33.02", ICD10), ["Juvenile dermatomyositis:"], ["Systemic sclerosis:", "PXE"]),
        (("55464009", SNOMED), [], ["Systemic sclerosis:", "Juvenile dermatomyositis:", "PXE"]),
    ],
    ids=["ssc", "jdm", "sle"],
)
def test_dystrophic_card_text_concerns_the_patients_own_condition(run, code, expected, absent) -> None:
    [card] = run(condition(code[0], code[1])).assessment.cards
    assert "Calcium and phosphate are usually normal" in card["detail"]
    assert all(text in card["detail"] for text in expected)
    assert not any(text in card["detail"] for text in absent)


def test_iatrogenic_iv_calcium_card_and_pred(run) -> None:
    ev = run(med_admin("1908", days=2, route=(SNOMED, "47625008")), obs(CA, 9.0), obs(P, 4.0))
    topics = [c["source"]["topic"]["code"] for c in ev.assessment.cards]
    assert "iatrogenic-calcinosis-context" in topics
    assert ev.assessment.metastatic_calcification.predisposing[0].id == "iv_mineral"


def test_iv_route_needed_for_iatrogenic(run) -> None:
    assert run(med_admin("1908", days=2)).assessment.cards == []
    assert run(med_admin("1908", days=10, route=(SNOMED, "47625008"))).assessment.cards == []
    topics = [c["source"]["topic"]["code"] for c in run(med_request("1668250")).assessment.cards]  # injection SCD
    assert topics == ["metastatic-calcification-risk", "iatrogenic-calcinosis-context"]  # IV calcium is also a PRED


def test_cards_are_ordered_by_urgency(run) -> None:
    ev = run(esrd(), obs(CA, 13.0), obs(ALB, 2.5, "g/dL"), obs(P, 8.0), condition("L94.2", ICD10))
    indicators = [c["indicator"] for c in ev.assessment.cards]
    assert indicators[0] == "critical"
    rank = {"critical": 0, "warning": 1, "info": 2}
    assert indicators == sorted(indicators, key=rank.__getitem__)


# ----------------------------------------------------------------------------- patient


def test_patient_without_patient_resource(run) -> None:
    ev = run(esrd(), *renal_panel(), with_patient=False)
    assert ev.assessment.patient_resource_present is False
    assert ev.assessment.sex is None and ev.assessment.age is None
    card = next(c for c in ev.assessment.cards if c["source"]["topic"]["code"] == "calciphylaxis-risk") if ev.assessment.cards else None
    assert any("sex and age unknown" in n for n in ev.assessment.notes)
    assert card is None or "sex unknown" in card["detail"]


def test_patient_age(run) -> None:
    ev = run(patient(birth="1960-07-02"))
    assert ev.assessment.age == 64  # NOW is 2025-07-01
