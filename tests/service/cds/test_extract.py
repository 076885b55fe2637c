"""REFERENCE §2.1 data validity: statuses, units, dates, duplicates, codings, medications, procedures."""

from __future__ import annotations

from service.cds.extract import extract_facts
from service.cds.grouping import group_by_patient
from service.cds.model import LabSeries
from service.cds.rules import assess
from service.cds.thresholds import Thresholds
from tests.builders import (
    CA,
    CA_MOL,
    LOINC,
    NOW,
    PATIENT,
    RXNORM,
    SNOMED,
    P,
    bundle,
    condition,
    med_request,
    obs,
    patient,
    procedure,
)


def facts(catalog, *resources, thresholds: Thresholds | None = None):
    return extract_facts(list(resources), patient_ref=PATIENT, catalog=catalog, thresholds=thresholds or Thresholds(), now=NOW)


def reasons(f) -> dict[str, str]:
    return {e.reference: e.reason for e in f.excluded}


def test_status_filters(catalog) -> None:
    kept = [obs(CA, 9.0, status=s, days=i + 1) for i, s in enumerate(("final", "amended", "corrected"))]
    dropped = [obs(CA, 9.0, status=s, days=5) for s in ("entered-in-error", "cancelled", "registered", "preliminary")]
    f = facts(catalog, *kept, *dropped)
    assert len(f.labs["calcium_total"]) == 3
    r = reasons(f)
    for o in dropped:
        assert r[f"Observation/{o['id']}"] == f"status {o['status']}"


def test_preliminary_is_configurable(catalog) -> None:
    f = facts(catalog, obs(CA, 9.0, status="preliminary"), thresholds=Thresholds(accept_preliminary=True))
    assert len(f.labs["calcium_total"]) == 1


def test_match_on_any_coding_not_only_first(catalog) -> None:
    o = obs(CA, 9.0, extra_codings=[{"system": "urn:local", "code": "CA-SERUM"}])
    assert facts(catalog, o).labs["calcium_total"][0].source.code == CA


def test_unmapped_codes_are_ignored_not_excluded(catalog) -> None:
    f = facts(catalog, obs("2339-0", 100))  # glucose
    assert f.excluded == [] and f.ignored == {"Observation": 1}


def test_unit_conversion_mmol_to_mg(catalog) -> None:
    lab = facts(catalog, obs(CA_MOL, 2.5, "mmol/L")).labs["calcium_total"][0]
    assert round(float(lab.value), 3) == 10.02 and lab.unit == "mg/dL" and lab.raw_unit == "mmol/L"


def test_unit_alias_from_text_when_no_code(catalog) -> None:
    o = obs(CA, 9.0)
    o["valueQuantity"] = {"value": 9.0, "unit": "mg/dl"}
    assert facts(catalog, o).labs["calcium_total"][0].value == 9


def test_invalid_values_are_excluded_with_reasons(catalog) -> None:
    no_value = obs(CA, None)
    absent = obs(CA, 9.0, dataAbsentReason={"text": "lost"})
    comparator = obs(CA, 9.0)
    comparator["valueQuantity"]["comparator"] = "<"
    text_value = obs(CA, "nine")
    bool_value = obs(CA, True)
    future = obs(CA, 9.0, days=-2)
    no_time = obs(CA, 9.0)
    del no_time["effectiveDateTime"]
    unknown_unit = obs(CA, 9.0, "furlongs")
    f = facts(catalog, no_value, absent, comparator, text_value, bool_value, future, no_time, unknown_unit)
    r = reasons(f)
    assert r[f"Observation/{no_value['id']}"] == "no valueQuantity"
    assert r[f"Observation/{absent['id']}"] == "dataAbsentReason present"
    assert r[f"Observation/{comparator['id']}"] == "value has comparator <"
    assert "not a number" in r[f"Observation/{text_value['id']}"]
    assert "not a number" in r[f"Observation/{bool_value['id']}"]
    assert r[f"Observation/{future['id']}"] == "effective time in the future"
    assert r[f"Observation/{no_time['id']}"] == "no effective time"
    assert "not a known UCUM unit" in r[f"Observation/{unknown_unit['id']}"]
    assert "calcium_total" not in f.labs


def test_structurally_invalid_fhir_is_excluded_when_consulted(catalog) -> None:
    o = obs(CA, 9.0)
    o["subject"] = {"reference": PATIENT, "display": ["not", "a", "string"]}
    f = facts(catalog, o)
    lab = f.labs["calcium_total"][0]
    assert f.usable(lab) is False
    assert f.usable(lab) is False  # memoised, reported once
    assert [e.reason for e in f.excluded if e.reference == f"Observation/{o['id']}"] == ["invalid FHIR Observation (subject.display)"]


def test_invalid_latest_value_is_skipped_for_the_next_valid_one(run) -> None:
    bad = obs(CA, 14.0, days=1)
    bad["subject"] = {"reference": PATIENT, "display": ["x"]}
    ev = run(bad, obs(CA, 9.1, days=5))
    assert ev.assessment.calcium["measured_mg_dl"] == "9.1"
    assert any(e.reference == f"Observation/{bad['id']}" and e.reason.startswith("invalid FHIR") for e in ev.assessment.excluded)


def test_duplicates_at_one_time_prefer_corrected(catalog) -> None:
    when = "2025-06-20T08:00:00Z"
    final = obs(CA, 11.0, when=when, status="final")
    corrected = obs(CA, 9.0, when=when, status="corrected")
    f = facts(catalog, final, corrected)
    assert [lab.value for lab in f.labs["calcium_total"]] == [9]
    assert "preferred" in reasons(f)[f"Observation/{final['id']}"]


def test_effective_period_start_and_issued_tiebreak(catalog) -> None:
    o = obs(CA, 9.0)
    del o["effectiveDateTime"]
    o["effectivePeriod"] = {"start": "2025-06-01T10:00:00Z", "end": "2025-06-01T11:00:00Z"}
    lab = facts(catalog, o).labs["calcium_total"][0]
    assert lab.effective.isoformat().startswith("2025-06-01T10:00")


def test_reference_range_converted(catalog) -> None:
    lab = facts(catalog, obs(P, 2.0, "mmol/L", ref_high=(1.45, "mmol/L"))).labs["phosphate"][0]
    assert lab.ref_high is not None and round(float(lab.ref_high), 2) == 4.49


def test_condition_status_rules(catalog) -> None:
    pl_no_status = condition("44054006", clinical=None, category="problem-list-item")
    enc_no_status = condition("44054006", clinical=None, category="encounter-diagnosis")
    remission = condition("44054006", clinical="remission")
    relapse = condition("44054006", clinical="relapse")
    f = facts(catalog, pl_no_status, enc_no_status, remission, relapse)
    kept = {c.source.reference for c in f.conditions}
    assert kept == {f"Condition/{pl_no_status['id']}", f"Condition/{relapse['id']}"}
    r = reasons(f)
    assert r[f"Condition/{remission['id']}"] == "clinicalStatus remission"
    assert "problem-list" in r[f"Condition/{enc_no_status['id']}"]


def test_medication_reference_resolved_from_contained_and_bundle(catalog) -> None:
    contained = med_request("11289")
    del contained["medicationCodeableConcept"]
    contained["contained"] = [{"resourceType": "Medication", "id": "m", "code": {"coding": [{"system": RXNORM, "code": "855332"}]}}]
    contained["medicationReference"] = {"reference": "#m"}
    f = facts(catalog, contained)
    assert f.medications[0].features == frozenset({"vka"})

    via_bundle = med_request("11289")
    del via_bundle["medicationCodeableConcept"]
    via_bundle["medicationReference"] = {"reference": "urn:uuid:med-1"}
    b = bundle(patient(), via_bundle)
    b["entry"].append(
        {"fullUrl": "urn:uuid:med-1", "resource": {"resourceType": "Medication", "id": "med-1", "code": {"coding": [{"system": RXNORM, "code": "855332"}]}}}
    )
    groups = group_by_patient([b])
    f = extract_facts(groups.patients[PATIENT], patient_ref=PATIENT, catalog=catalog, thresholds=Thresholds(), now=NOW, medications=groups.medications)
    assert f.medications[0].features == frozenset({"vka"})


def test_unresolvable_medication_reference_is_reported(catalog) -> None:
    mr = med_request("11289")
    del mr["medicationCodeableConcept"]
    mr["medicationReference"] = {"reference": "Medication/unknown"}
    assert reasons(facts(catalog, mr))[f"MedicationRequest/{mr['id']}"] == "medicationReference could not be resolved"


def test_medication_entered_in_error_and_future(catalog) -> None:
    eie = med_request("11289", status="entered-in-error")
    future = med_request("11289", authored_days=-5)
    r = reasons(facts(catalog, eie, future))
    assert r[f"MedicationRequest/{eie['id']}"] == "status entered-in-error"
    assert r[f"MedicationRequest/{future['id']}"] == "starts in the future"


def test_intravenous_route_by_text(catalog) -> None:
    f = facts(catalog, med_request("1908", route_text="Intravenous"))
    assert f.medications[0].intravenous is True
    f = facts(catalog, med_request("1908", route_text="oral"))
    assert f.medications[0].intravenous is False


def test_every_mapped_coding_of_a_procedure_counts(catalog) -> None:
    """A procedure coded for dialysis first and kidney transplant second was read as dialysis only."""
    both = procedure("302497006")
    both["code"]["coding"] += [{"system": "http://example.org/local", "code": "X1"}, {"system": "http://snomed.info/sct", "code": "70536003"}]
    both["code"]["coding"].append({"system": "http://snomed.info/sct", "code": "71192002"})  # dialysis again: one fact
    f = facts(catalog, both)
    assert sorted((p.feature, p.source.code) for p in f.procedures) == [("dialysis", "302497006"), ("kidney_transplant_procedure", "70536003")]


def test_procedure_status_and_time(catalog) -> None:
    ok = procedure("302497006", days=5)
    not_done = procedure("302497006", status="not-done")
    future = procedure("302497006", days=-3)
    f = facts(catalog, ok, not_done, future)
    assert [p.source.reference for p in f.procedures] == [f"Procedure/{ok['id']}"]
    r = reasons(f)
    assert r[f"Procedure/{not_done['id']}"] == "status not-done"
    assert r[f"Procedure/{future['id']}"] == "performed time in the future"


def test_inputs_record_references_and_versions(catalog) -> None:
    o = obs(CA, 9.0, meta={"versionId": "3"})
    f = facts(catalog, o, obs("2339-0", 1))
    assert f.inputs == {f"Observation/{o['id']}": "3"}


def test_grouping_urn_uuid_and_unattributed(catalog) -> None:
    p = patient("abc")
    o = obs(CA, 9.0, subject="urn:uuid:abc-full")
    orphan = obs(CA, 9.0, subject="Group/g1")
    b = {"resourceType": "Bundle", "type": "transaction", "entry": [{"fullUrl": "urn:uuid:abc-full", "resource": p}, {"resource": o}, {"resource": orphan}]}
    groups = group_by_patient([b])
    assert set(groups.patients) == {"Patient/abc"}
    assert len(groups.patients["Patient/abc"]) == 2
    assert groups.unattributed[0].reference == f"Observation/{orphan['id']}"
    assert "patient could not be determined" in groups.unattributed[0].reason


def test_grouping_keeps_latest_version(catalog) -> None:
    v1 = obs(CA, 9.0, rid="x", meta={"versionId": "1"})
    v2 = obs(CA, 12.0, rid="x", meta={"versionId": "2"})
    groups = group_by_patient([v2, v1])
    assert [r["meta"]["versionId"] for r in groups.patients[PATIENT]] == ["2"]


def test_absolute_references_normalised(catalog) -> None:
    o = obs(CA, 9.0, subject="https://ehr.example.org/fhir/Patient/p1/_history/4")
    assert set(group_by_patient([o]).patients) == {PATIENT}


def test_condition_matches_snomed_system(catalog) -> None:
    c = condition("46177005", SNOMED)
    assert facts(catalog, c).conditions[0].feature == "esrd_or_ckd5"
    assert LOINC  # builders' constants are shared


def test_patient_validated_on_the_elements_used(run) -> None:
    bad = patient()
    bad["gender"] = {"not": "a code"}
    ev = run(bad)
    assert ev.assessment.patient_resource_present is False
    assert any(e.reference == "Patient/p1" and e.reason.startswith("invalid FHIR Patient") for e in ev.assessment.excluded)
    narrative = patient()
    narrative["text"] = {"status": "generated", "div": "<p>not validated: never read by the rules</p>"}
    assert run(narrative).assessment.patient_resource_present is True


def test_invalid_medication_record_is_excluded_when_consulted(run) -> None:
    bad = med_request("11289")
    bad["subject"] = {"reference": PATIENT, "display": ["x"]}
    good = med_request("11289", authored_days=10)
    ev = run(bad, good)
    factor = next(f for f in ev.assessment.calciphylaxis.factors if f.id == "M1") if "M1" in ev.assessment.calciphylaxis.major_factors else None
    assert ev.assessment.calciphylaxis.tier == "none"  # R0, one minor at most: but the VKA itself is evidence
    assert any(e.reference == f"MedicationRequest/{bad['id']}" and e.reason.startswith("invalid FHIR") for e in ev.assessment.excluded)
    assert factor is None or all(e.reference != f"MedicationRequest/{bad['id']}" for e in factor.evidence)


def test_irrelevant_medication_records_are_not_validated(catalog) -> None:
    old = med_request("11289", status="completed", authored_days=400)
    old["subject"] = {"reference": PATIENT, "display": ["x"]}  # invalid, but a stop 400 days ago is never consulted
    from tests.builders import esrd, renal_panel

    ev = extract_facts([esrd(), *renal_panel(), old], patient_ref=PATIENT, catalog=catalog, thresholds=Thresholds(), now=NOW)

    outcome = assess(ev, Thresholds(), NOW, catalog)
    assert "M1" not in [f.id for f in outcome.majors]
    assert not any(e.reference == f"MedicationRequest/{old['id']}" for e in ev.excluded)


def test_every_in_window_value_is_checked_though_only_read_values_are_built(catalog) -> None:
    """A year of results: the rules read the newest usable value, so only that one is converted; yet a value
    nobody reads is still excluded with its reason, and reading the series gives every value, converted."""

    values = [obs(CA_MOL, 2.2 + i / 100, "mmol/L", days=i + 1) for i in range(10)]
    bad_unit = obs(CA, 9.0, "furlongs", days=11)
    f = facts(catalog, *values, bad_unit)
    assert "not a known UCUM unit" in reasons(f)[f"Observation/{bad_unit['id']}"]  # never read, still reported
    series = f.labs["calcium_total"]
    assert isinstance(series, LabSeries) and len(series) == 10
    assess(f, Thresholds(), NOW, catalog)
    built = [lab for lab in series._built if lab is not None]
    assert 1 <= len(built) < len(series)
    assert [round(float(lab.value), 2) for lab in series] == [round((2.2 + i / 100) * 4.0078, 2) for i in range(10)]
    assert series[0] is series[0] and series[-1].raw_unit == "mmol/L"
    assert [lab.source.reference for lab in series[1:3]] == [f"Observation/{values[1]['id']}", f"Observation/{values[2]['id']}"]


def test_lab_series_builds_each_value_once_in_any_access_order() -> None:

    calls: list[int] = []

    def build(n: int) -> int:
        calls.append(n)
        return n * 10

    series = LabSeries([1, 2, 3], build)  # type: ignore[arg-type]
    assert series[1] == 20 and calls == [2]
    assert list(series) == [10, 20, 30] and calls == [2, 1, 3]
    assert series[-1] == 30 and series[0:2] == [10, 20] and calls == [2, 1, 3]
    assert len(series) == 3 and repr(series) == "LabSeries(3 values)"
