"""REFERENCE §4: the cases worth a unit test each."""

from __future__ import annotations

from tests.builders import ALB, CA, ICA, RXNORM, P, condition, esrd, med_request, med_statement, obs, renal_panel


def test_ca_and_p_30_hours_apart_product_with_lag(run) -> None:
    ev = run(esrd(), obs(CA, 10.0, days=3), obs(P, 7.5, days=3, hours=-30), obs(ALB, 4.1, "g/dL", days=3))
    cxp = ev.assessment.metastatic_calcification.ca_x_p
    assert cxp is not None
    assert cxp.value == 75.0
    assert cxp.paired_with_lag is True
    assert cxp.hours_apart == 30.0
    assert any("paired with lag" in n for n in ev.assessment.notes)


def test_ca_and_p_same_draw_no_lag(run) -> None:
    ev = run(obs(CA, 10.0, days=3), obs(P, 7.5, days=3))
    cxp = ev.assessment.metastatic_calcification.ca_x_p
    assert cxp is not None and cxp.paired_with_lag is False and cxp.value == 75.0


def test_the_product_names_the_two_results_it_was_made_of(run) -> None:
    ca, p = obs(CA, 10.0, days=6), obs(P, 7.5, days=6, hours=-2)
    cxp = run(esrd(), ca, p).assessment.metastatic_calcification.ca_x_p
    assert cxp is not None and cxp.calcium is not None and cxp.phosphate is not None
    assert (cxp.calcium.reference, cxp.calcium.value, cxp.phosphate.reference, cxp.phosphate.value) == (
        f"Observation/{ca['id']}",
        "10",
        f"Observation/{p['id']}",
        "7.5",
    )


def test_a_patient_without_a_birth_date_is_noted(run) -> None:
    notes = run(esrd(), *renal_panel(), birth=None).assessment.notes
    assert any(n.startswith("no birth date on the Patient") for n in notes)
    assert not any("birth date" in n for n in run(esrd(), *renal_panel()).assessment.notes)


def test_ca_and_p_80_hours_apart_no_product(run) -> None:
    ev = run(esrd(), obs(CA, 10.0, days=6), obs(P, 7.5, days=6, hours=-80))
    assert ev.assessment.metastatic_calcification.ca_x_p is None
    assert any("no Ca×P product" in n for n in ev.assessment.notes)


def test_ionized_calcium_above_limit_with_normal_total_is_hypercalcemia(run) -> None:
    ev = run(obs(CA, 9.2, days=2), obs(ICA, 1.35, "mmol/L", days=2), obs(ALB, 4.2, "g/dL", days=2))
    assert ev.assessment.calcium is not None
    assert ev.assessment.calcium["basis"] == "ionized"
    assert ev.assessment.metastatic_calcification.hypercalcemia is True


def test_unit_mg_per_l_is_excluded_and_reported(run) -> None:
    bad = obs(CA, 95, "mg/L", days=2)
    ev = run(esrd(), bad)
    reasons = {e.reference: e.reason for e in ev.assessment.excluded}
    assert f"Observation/{bad['id']}" in reasons
    assert "mg/L" in reasons[f"Observation/{bad['id']}"]
    assert ev.assessment.calcium is None


def test_warfarin_stopped_120_days_ago_is_not_a_vka_factor(run) -> None:
    ev = run(esrd(), *renal_panel(), med_statement("11289", start_days=400, end_days=120))
    assert "M1" not in ev.assessment.calciphylaxis.major_factors


def test_warfarin_stopped_60_days_ago_still_counts(run) -> None:
    ev = run(esrd(), *renal_panel(), med_statement("11289", start_days=400, end_days=60))
    assert "M1" in ev.assessment.calciphylaxis.major_factors


def test_e83_59_without_calciphylaxis_text_is_not_established(run) -> None:
    c = condition("E83.59", "http://hl7.org/fhir/sid/icd-10-cm", display="Other disorders of calcium metabolism")
    ev = run(esrd(), *renal_panel(), c)
    assert ev.assessment.calciphylaxis.tier != "established"
    assert any(e.reference == f"Condition/{c['id']}" for e in ev.assessment.excluded)


def test_e83_59_with_calciphylaxis_text_is_established(run) -> None:
    c = condition("E83.59", "http://hl7.org/fhir/sid/icd-10-cm", display="Other disorders of calcium metabolism", text="Calciphylaxis of lower legs")
    ev = run(esrd(), *renal_panel(), c)
    assert ev.assessment.calciphylaxis.tier == "established"
    # The card shows the text that qualified the non-specific code, not only the code's name.
    card = next(card for card in ev.assessment.cards if card["source"]["topic"]["code"] == "established-calciphylaxis")
    assert "Other disorders of calcium metabolism | ICD-10-CM E83.59 | active (recorded as: Calciphylaxis of lower legs)" in card["detail"]


def test_refuted_condition_is_ignored(run) -> None:
    c = condition("46177005", verification="refuted")
    ev = run(c, *renal_panel())
    assert ev.assessment.renal_context == "R0"
    assert {"reference": f"Condition/{c['id']}", "reason": "verificationStatus refuted"} in [e.model_dump() for e in ev.assessment.excluded]


def test_warfarin_ordered_as_scd_maps_to_ingredient(run) -> None:
    mr = med_request("855332")
    ev = run(esrd(), *renal_panel(), mr)
    assert "M1" in ev.assessment.calciphylaxis.major_factors
    factor = next(f for f in ev.assessment.calciphylaxis.factors if f.id == "M1")
    assert factor.evidence[0].reference == f"MedicationRequest/{mr['id']}"
    assert factor.evidence[0].code == f"{RXNORM}|855332"
