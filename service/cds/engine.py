"""Evaluate a patient: resources → facts → outcome → Assessment with cards. Pure: data in, data out."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from service.cds.cards import CardContext, render_cards, risk_assessments
from service.cds.extract import extract_facts
from service.cds.fhirutil import iso
from service.cds.grouping import PatientGroups, group_by_patient
from service.cds.model import (
    Assessment,
    Calciphylaxis,
    CaseFacts,
    CaXP,
    MetastaticCalcification,
)
from service.cds.rules import Outcome, assess, fmt, lab_evidence
from service.cds.thresholds import Thresholds
from service.terminology.catalog import Catalog

DEFAULT_TOPIC_SYSTEM = "https://calcinosis-cds.org/fhir/CodeSystem/card-topic"


@dataclass(frozen=True)
class Evaluation:
    """One patient's result. The cards are rendered at once; the full :class:`Assessment` (the JSON the CLI, the
    monitor and the audit store) is built on first read, so a CDS Hooks call, which only answers with cards,
    never pays for it."""

    outcome: Outcome
    facts: CaseFacts
    context: CardContext
    cards: list[dict[str, Any]]
    evaluated_at: str
    notes: tuple[str, ...] = ()

    @cached_property
    def assessment(self) -> Assessment:
        return _assessment(self)

    @cached_property
    def risk_assessments(self) -> list[dict[str, Any]]:
        """The RiskAssessments to write back (built on demand: a CDS Hooks call never needs them)."""
        return risk_assessments(self.outcome, self.context, self.evaluated_at)


def inputs_hash(inputs: dict[str, str | None]) -> str:
    """Hash of the (reference, version) pairs read, in reference order."""
    text = "\n".join(f"{ref}@{ver or ''}" for ref, ver in sorted(inputs.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def evaluate_patient(
    resources: Iterable[dict[str, Any]],
    *,
    patient_ref: str,
    catalog: Catalog,
    thresholds: Thresholds,
    now: datetime,
    medications: dict[str, dict[str, Any]] | None = None,
    topic_system: str = DEFAULT_TOPIC_SYSTEM,
    notes: Iterable[str] = (),
) -> Evaluation:
    facts = extract_facts(resources, patient_ref=patient_ref, catalog=catalog, thresholds=thresholds, now=now, medications=medications)
    outcome = assess(facts, thresholds, now, catalog)
    rules_version = thresholds.rules_version()
    ihash = inputs_hash(facts.inputs)
    ctx = CardContext(
        patient=patient_ref,
        rules_version=rules_version,
        mappings_version=catalog.version,
        topic_system=topic_system,
        inputs_hash=ihash,
    )
    cards = render_cards(outcome, ctx, catalog, card_for_low_complete=thresholds.card_for_low_complete)
    return Evaluation(outcome, facts, ctx, cards, iso(now) or "", tuple(notes))


def _assessment(evaluation: Evaluation) -> Assessment:
    outcome, facts, ctx = evaluation.outcome, evaluation.facts, evaluation.context
    calcium = outcome.calcium
    return Assessment(
        patient=ctx.patient,
        evaluated_at=evaluation.evaluated_at,
        rules_version=ctx.rules_version,
        mappings_version=ctx.mappings_version,
        renal_context=outcome.renal,
        calciphylaxis=Calciphylaxis(
            tier=outcome.calciphylaxis_tier,
            incomplete_data=outcome.incomplete,
            major_factors=[f.id for f in outcome.majors],
            minor_factors=[f.id for f in outcome.minors],
            factors=[*outcome.majors, *outcome.minors],
            missing=outcome.missing,
            explanation=outcome.explanations["calciphylaxis"],
        ),
        metastatic_calcification=MetastaticCalcification(
            tier=outcome.metastatic_tier,
            ca_x_p=None
            if outcome.product is None
            else CaXP(
                value=float(outcome.product.value),
                value_si=float(outcome.product.value_si),
                paired_with_lag=outcome.product.lag,
                hours_apart=float(outcome.product.hours_apart),
                calcium=lab_evidence(outcome.product.calcium, label="Calcium, total (measured)"),
                phosphate=lab_evidence(outcome.product.phosphate),
            ),
            predisposing=outcome.predisposing,
            hypercalcemia=calcium.hypercalcemia,
            hyperphosphatemia=outcome.hyperphosphatemia,
            explanation=outcome.explanations["metastatic"],
        ),
        cards=evaluation.cards,
        excluded=facts.excluded,
        patient_resource_present=facts.patient.present,
        sex=facts.patient.sex,
        age=outcome.age,
        renal_evidence=outcome.renal_evidence,
        calcium=None
        if calcium.basis == "none" and calcium.ionized is None
        else {
            "basis": calcium.basis,
            "measured_mg_dl": fmt(calcium.measured_mg_dl) if calcium.measured_mg_dl is not None else None,
            "corrected_mg_dl": fmt(calcium.corrected_mg_dl) if calcium.corrected_mg_dl is not None else None,
            "ionized_mmol_l": fmt(calcium.ionized_mmol_l) if calcium.ionized_mmol_l is not None else None,
            "hypercalcemia": calcium.hypercalcemia,
            "note": calcium.correction_note or None,
        },
        suggested_orders=outcome.orders,
        notes=[*outcome.notes, *evaluation.notes],
        ignored=facts.ignored,
        inputs=[{"reference": r, "version": v} for r, v in sorted(facts.inputs.items())],
        inputs_hash=ctx.inputs_hash,
    )


def evaluate_groups(
    groups: PatientGroups,
    *,
    catalog: Catalog,
    thresholds: Thresholds,
    now: datetime,
    topic_system: str = DEFAULT_TOPIC_SYSTEM,
) -> list[Evaluation]:
    out = []
    for patient_ref in sorted(groups.patients):
        out.append(
            evaluate_patient(
                groups.patients[patient_ref],
                patient_ref=patient_ref,
                catalog=catalog,
                thresholds=thresholds,
                now=now,
                medications=groups.medications,
                topic_system=topic_system,
            )
        )
    return out


def evaluate_resources(items: Iterable[Any], **kwargs: Any) -> tuple[list[Evaluation], PatientGroups]:
    groups = group_by_patient(items)
    return evaluate_groups(groups, **kwargs), groups
