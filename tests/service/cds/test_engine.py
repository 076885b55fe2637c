"""evaluate_patient: cards at once, the full Assessment on first read, with the caller's notes."""

from __future__ import annotations

from service.cds.engine import evaluate_patient
from service.cds.thresholds import Thresholds
from service.terminology.catalog import Catalog
from tests.builders import NOW, PATIENT, esrd, patient, renal_panel


def test_the_assessment_is_built_on_first_read_and_carries_the_callers_notes(catalog: Catalog) -> None:
    evaluation = evaluate_patient(
        [patient(), esrd(), *renal_panel(ca=10.8, p=7.5)],
        patient_ref=PATIENT,
        catalog=catalog,
        thresholds=Thresholds(),
        now=NOW,
        notes=["prefetch 'conditions' fetched from the FHIR server"],
    )
    assert evaluation.cards, "an ESRD patient with Ca×P above 70 gets cards"
    assert "assessment" not in vars(evaluation)  # a CDS Hooks call reads only the cards: nothing built for it

    assessment = evaluation.assessment
    assert assessment.cards == evaluation.cards
    assert assessment.notes[-1] == "prefetch 'conditions' fetched from the FHIR server"
    assert assessment.inputs_hash == evaluation.context.inputs_hash
    assert [i["reference"] for i in assessment.inputs] == sorted(i["reference"] for i in assessment.inputs)
    assert evaluation.assessment is assessment  # built once
