"""Outcome → CDS Hooks 2.0 cards and FHIR R4 RiskAssessment resources.

Cards follow the contract's topics and the spec's shape (no empty strings or arrays; summary under
140 characters; ``selectionBehavior`` with suggestions; ``overrideReasons`` with display). Each card's
detail lists every fact used (value, unit, date, source reference), the threshold crossed, the rule id
and version, the evidence strength, and says the tiers are not validated probabilities.
The ``uuid`` is stable for the same patient, rule, versions and inputs; a CDS Hooks call issues each card under a
uuid of its own derived from it and the call's ``hookInstance`` (:func:`for_call`), so feedback and audit can join.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from service.cds.fhirutil import iso
from service.cds.model import Evidence, Factor
from service.cds.rules import RULE_IDS, Outcome, condition_evidence, fmt, medication_evidence, product_evidence
from service.terminology.catalog import Catalog
from service.terminology.schema import SYSTEM_NAMES

CARD_NAMESPACE = uuid.UUID("6f1d8c2e-3b4a-5c6d-8e7f-90a1b2c3d4e5")
OVERRIDE_SYSTEM = "https://calcinosis-cds.org/fhir/CodeSystem/override-reason"
RISK_IDENTIFIER_SYSTEM = "https://calcinosis-cds.org/fhir/NamingSystem/risk-assessment"
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"

NOT_PROBABILITY = (
    "_These tiers are expert-opinion rules built on observational (case-control) data. "
    "They are not validated probabilities and do not replace clinical judgement._"
)
EVIDENCE = {
    "calciphylaxis-risk": "Evidence: weak. Every risk factor comes from case-control studies (5–1,030 cases, very wide "
    "confidence intervals, e.g. warfarin OR 61, 95% CI 6.7–546); the tier cut-offs are an uncalibrated proposal; the "
    "CKD G4 down-step and the non-uremic warfarin pathway are expert judgement.",
    "metastatic-calcification-risk": "Evidence: Ca×P > 70 mg²/dL² is a physicochemical teaching threshold plus one "
    "retrospective risk-factor study; KDIGO 2017 advises basing decisions on serial Ca, P and PTH rather than the "
    "product. Outside CKD no validated threshold exists (physiologic reasoning).",
    "established-calciphylaxis": "Evidence: the modifiable factors listed are the case-control risk factors of "
    "calciphylaxis; stopping them has not been tested prospectively.",
    "calcinosis-cutis-present": "Evidence: informational; derived from the problem list.",
    "dystrophic-calcinosis-context": "Evidence: cohort studies and case reports; this card makes no risk prediction.",
    "iatrogenic-calcinosis-context": "Evidence: case reports and case series only; this card makes no risk prediction.",
    "severe-hypercalcemia": "Evidence: the severity bands are widely used but not universally accepted; in CKD the "
    "albumin correction may misclassify (ionized calcium is preferred).",
    "moderate-hypercalcemia": "Evidence: the severity bands are widely used but not universally accepted; in CKD the "
    "albumin correction may misclassify (ionized calcium is preferred).",
    "medication-order-risk": "Evidence: warfarin, calcium-based binders and vitamin D are case-control risk factors "
    "for calciphylaxis; IV calcium/phosphate extravasation is described in case reports.",
}
TOPIC_DISPLAY = {
    "calciphylaxis-risk": "Calciphylaxis risk",
    "metastatic-calcification-risk": "Metastatic calcification risk",
    "established-calciphylaxis": "Established calciphylaxis",
    "calcinosis-cutis-present": "Calcinosis cutis present",
    "dystrophic-calcinosis-context": "Dystrophic calcinosis context",
    "iatrogenic-calcinosis-context": "Iatrogenic calcinosis context",
    "severe-hypercalcemia": "Severe hypercalcemia",
    "moderate-hypercalcemia": "Moderate hypercalcemia",
    "medication-order-risk": "Medication order risk",
}
OVERRIDE_REASONS = [
    {"system": OVERRIDE_SYSTEM, "code": "already-addressed", "display": "Already addressed"},
    {"system": OVERRIDE_SYSTEM, "code": "not-clinically-relevant", "display": "Not clinically relevant for this patient"},
    {"system": OVERRIDE_SYSTEM, "code": "data-incorrect", "display": "Source data are incorrect or outdated"},
    {"system": OVERRIDE_SYSTEM, "code": "benefit-outweighs-risk", "display": "Benefit outweighs the risk"},
]


@dataclass(frozen=True)
class CardContext:
    patient: str
    rules_version: str
    mappings_version: str
    topic_system: str
    inputs_hash: str
    label: str = "calcinosis-cds"


def _clean(value: Any) -> Any:
    """Drop None, empty strings, empty lists and empty dicts recursively (CDS Hooks: no empty elements)."""
    if isinstance(value, dict):
        out = {k: _clean(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        items = [_clean(v) for v in value]
        return [v for v in items if v not in (None, "", [], {})]
    return value


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def code_text(code: str | None) -> str:
    """``system|code`` as a reader names it: "LOINC 17861-6" (an unknown system is shown as it is)."""
    if not code:
        return ""
    system, _, value = code.rpartition("|")
    return f"{SYSTEM_NAMES.get(system, system)} {value}".strip()


def evidence_table(rows: list[tuple[str, Evidence]]) -> str:
    """The facts as a Markdown table. Facts that differ only in date and source (three times a week of
    "Hemodialysis, performed", months of the same warfarin order) are one row: the latest date with how many there
    are since the earliest, and every source, in the order given."""
    if not rows:
        return ""
    lines = ["| Factor | Fact | Code | Value | Date | Source | Threshold |", "|---|---|---|---|---|---|---|"]
    same: dict[tuple[str, str, str, str, str], list[Evidence]] = {}
    for factor, e in rows:
        value = f"{e.value} {e.unit}" if e.value and e.unit else (e.value or "")
        if e.note:
            value += f" ({e.note})"
        same.setdefault((factor, e.label, code_text(e.code), value, e.threshold or ""), []).append(e)
    for (factor, label, code, value, threshold), facts in same.items():
        dates = sorted({e.date[:10] for e in facts if e.date})
        when = dates[-1] if dates else ""
        if len(facts) > 1 and dates:
            when += f" ({len(facts)} since {dates[0]})" if len(dates) > 1 else f" ({len(facts)})"
        sources = ", ".join(dict.fromkeys(e.reference for e in facts if e.reference))
        cells = (factor, label, code, value, when, sources, threshold)
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return "\n".join(lines)


def factor_rows(factors: list[Factor]) -> list[tuple[str, Evidence]]:
    return [(f"{f.id} {f.label}" if f.id.startswith("M") else f.label, e) for f in factors for e in f.evidence]


def stable_uuid(ctx: CardContext, rule_id: str, *parts: str) -> str:
    key = "|".join((ctx.patient, rule_id, ctx.rules_version, ctx.mappings_version, ctx.inputs_hash, *parts))
    return str(uuid.uuid5(CARD_NAMESPACE, key))


def _footer(ctx: CardContext, rule_id: str, topic: str) -> str:
    return f"{EVIDENCE[topic]}\n\n{NOT_PROBABILITY}\n\nRule `{rule_id}` · rules {ctx.rules_version} · mappings {ctx.mappings_version}"


def make_card(
    ctx: CardContext,
    *,
    topic: str,
    rule_id: str,
    indicator: str,
    summary: str,
    body: str,
    suggestions: list[dict[str, Any]] | None = None,
    uuid_parts: tuple[str, ...] = (),
) -> dict[str, Any]:
    if len(summary) > 139:
        summary = summary[:138] + "…"
    card_uuid = stable_uuid(ctx, rule_id, topic, indicator, summary, *uuid_parts)
    card: dict[str, Any] = {
        "uuid": card_uuid,
        "summary": summary,
        "indicator": indicator,
        "detail": f"{body}\n\n{_footer(ctx, rule_id, topic)}",
        "source": {
            "label": ctx.label,
            "topic": {"system": ctx.topic_system, "code": topic, "display": TOPIC_DISPLAY[topic]},
        },
        "overrideReasons": OVERRIDE_REASONS,
    }
    if suggestions:
        card["suggestions"] = suggestions
        card["selectionBehavior"] = "any"
    return _clean(_with_uuid(card, card_uuid))


def _with_uuid(card: dict[str, Any], card_uuid: str) -> dict[str, Any]:
    """``card`` under ``card_uuid``, its suggestions' uuids derived from it: the same suggestion (a renal panel) on two
    cards, or on the same card issued by two calls, is two suggestions."""
    issued = {**card, "uuid": card_uuid}
    if "suggestions" in card:
        issued["suggestions"] = [{**s, "uuid": child_uuid(card_uuid, s["uuid"])} if s.get("uuid") else s for s in card["suggestions"]]
    return issued


def child_uuid(parent: str, key: str) -> str:
    """A uuid derived from ``parent`` (a card's) and ``key``: deterministic, and distinct under distinct parents."""
    return str(uuid.uuid5(CARD_NAMESPACE, f"{parent}|{key}"))


def for_call(cards: list[dict[str, Any]], hook_instance: str) -> list[dict[str, Any]]:
    """The cards as one CDS Hooks call issues them: each card's uuid derived from its own and the call's
    ``hookInstance``, its suggestions' from that. Feedback is kept per card uuid and outcome, so two calls (two
    clinicians) never share a card; the same request again (a retry) gets the same uuids."""
    return [_with_uuid(card, child_uuid(card["uuid"], hook_instance)) for card in cards]


def order_suggestions(ctx: CardContext, catalog: Catalog, order_ids: list[str]) -> list[dict[str, Any]]:
    """One suggestion per order set, each with ``create`` actions for draft ServiceRequests coded in LOINC."""
    out: list[dict[str, Any]] = []
    for oid in order_ids:
        order_set = catalog.order_sets.get(oid)
        if order_set is None:
            continue
        actions: list[dict[str, Any]] = []
        codes = order_set.codes or ()
        for code in codes:
            entry = catalog.observation("http://loinc.org", code)
            display = entry.display if entry else code
            actions.append(
                {
                    "type": "create",
                    "description": f"Order {display}",
                    "resource": {
                        "resourceType": "ServiceRequest",
                        "status": "draft",
                        "intent": "proposal",
                        "subject": {"reference": ctx.patient},
                        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}], "text": display},
                    },
                }
            )
        if not codes:
            actions.append(
                {
                    "type": "create",
                    "description": f"Order {order_set.display}",
                    "resource": {
                        "resourceType": "ServiceRequest",
                        "status": "draft",
                        "intent": "proposal",
                        "subject": {"reference": ctx.patient},
                        "code": {"text": order_set.display},
                    },
                }
            )
        out.append(
            {
                "label": f"Order {order_set.display}",
                "uuid": stable_uuid(ctx, "orders", oid),
                "isRecommended": True,
                "actions": actions,
            }
        )
    return out


def _missing_section(outcome: Outcome) -> str:
    if not outcome.missing:
        return ""
    lines = ["**Incomplete data** — no valid result in the window for: " + ", ".join(outcome.missing) + "."]
    for lab in outcome.stale.values():
        lines.append(f"- last known (stale): {lab.label} {fmt(lab.value)} {lab.unit} on {(iso(lab.effective) or '')[:10]} ({lab.source.reference})")
    return "\n".join(lines)


def _who(outcome: Outcome) -> str:
    parts = []
    parts.append(f"sex {outcome.sex}" if outcome.sex else "sex unknown")
    parts.append(f"age {outcome.age}" if outcome.age is not None else "age unknown")
    return ", ".join(parts)


def render_cards(outcome: Outcome, ctx: CardContext, catalog: Catalog, *, card_for_low_complete: bool = False) -> list[dict[str, Any]]:
    cards: list[dict[str, Any]] = []
    tier = outcome.calciphylaxis_tier
    renal_rows = [("Renal context " + outcome.renal, e) for e in outcome.renal_evidence]

    # --- established calciphylaxis (§2.3): INFO card with the modifiable factors still present
    if outcome.established:
        rows = [("Problem list", e) for e in _conditions_ev(outcome.established)]
        rows += [("Modifiable factor", e) for e in outcome.modifiable]
        body = (
            "**Calciphylaxis is on the problem list**: risk tiering is suppressed (N/A, established calciphylaxis).\n\n"
            + (
                "Modifiable factors still present:"
                if outcome.modifiable
                else "No modifiable factor found among: vitamin K antagonist, calcium-based binder, vitamin D therapy, Ca×P > 70."
            )
            + "\n\n"
            + evidence_table(rows)
        )
        n = len(outcome.modifiable)
        summary = "Established calciphylaxis" + (f": {n} modifiable factor(s) still present" if n else "")
        cards.append(
            make_card(ctx, topic="established-calciphylaxis", rule_id=RULE_IDS["established"], indicator="info", summary=summary, body=body)
        )  # §2.3: an INFO card

    # --- calciphylaxis risk (§2.3)
    renal = outcome.renal in ("R1", "R2")
    wants_card = tier in ("moderate", "high") or (renal and outcome.incomplete) or (tier == "low" and card_for_low_complete)
    if tier != "established" and wants_card:
        suffix = " (incomplete data)" if outcome.incomplete else ""
        indicator = "warning" if tier == "high" else "info"
        rows = renal_rows + factor_rows(outcome.majors) + factor_rows(outcome.minors)
        body = "\n\n".join(
            p
            for p in (
                f"**Calciphylaxis risk tier: {tier}{suffix}** — {outcome.explanations['calciphylaxis']}.",
                f"Major factors: {', '.join(f.id for f in outcome.majors) or 'none'}; minor factors: "
                f"{', '.join(f.id for f in outcome.minors) or 'none'} ({_who(outcome)}).",
                evidence_table(rows),
                _missing_section(outcome),
            )
            if p
        )
        summary = f"Calciphylaxis risk {tier.upper()}{suffix}: {len(outcome.majors)} major, {len(outcome.minors)} minor factor(s) ({outcome.renal})"
        orders = [o for o in outcome.orders if o in ("renal_panel", "pth")]
        cards.append(
            make_card(
                ctx,
                topic="calciphylaxis-risk",
                rule_id=RULE_IDS["calciphylaxis"],
                indicator=indicator,
                summary=summary,
                body=body,
                suggestions=order_suggestions(ctx, catalog, orders),
                uuid_parts=(tier, str(outcome.incomplete)),
            )
        )

    # --- metastatic calcification (§2.4)
    met = outcome.metastatic_tier
    if met in ("moderate", "high", "insufficient-data"):
        rows = [("Predisposing: " + f.label, e) for f in outcome.predisposing for e in f.evidence]
        if outcome.product is not None:
            rows.insert(0, ("Ca×P", product_evidence(outcome.product, "> 70 high; ≥ 55 (≥ 65 age ≤ 12) moderate")))
        rows += [("Calcium", e) for e in outcome.calcium.evidence]
        rows += [("Phosphate", e) for e in outcome.phosphate_evidence]
        body = "\n\n".join(
            p
            for p in (
                f"**Metastatic calcification risk: {met}** — {outcome.explanations['metastatic']}.",
                outcome.product_note,
                evidence_table(rows),
            )
            if p
        )
        indicator = "warning" if met == "high" else "info"
        if outcome.product is not None:
            summary = f"Metastatic calcification risk {met.upper()}: Ca×P {fmt(outcome.product.value)} mg²/dL²"
        else:
            summary = f"Metastatic calcification risk {met.upper()}"
        if met == "insufficient-data":
            summary = "Metastatic calcification risk: insufficient data (predisposing condition, no recent Ca/P)"
        cards.append(
            make_card(
                ctx,
                topic="metastatic-calcification-risk",
                rule_id=RULE_IDS["metastatic"],
                indicator=indicator,
                summary=summary,
                body=body,
                suggestions=order_suggestions(ctx, catalog, ["renal_panel"] if met == "insufficient-data" else []),
                uuid_parts=(met,),
            )
        )

    # --- hypercalcemia severity
    calcium = outcome.calcium
    if outcome.severity is not None and calcium.corrected_mg_dl is not None:
        value = f"{calcium.total_label()} {fmt(calcium.corrected_mg_dl)} mg/dL"
        band = f"{outcome.severity_band} mg/dL"
        if outcome.severity == "severe":
            topic, indicator = "severe-hypercalcemia", "critical"
            summary = f"URGENT: severe hypercalcemia, {value} ({outcome.severity_band})"
            lead = f"**Severe hypercalcemia** ({calcium.total_label()} {band}) is a medical emergency."
            workup: list[str] = []
        else:
            topic, indicator = "moderate-hypercalcemia", "warning"
            summary = f"Moderate hypercalcemia: {value} ({outcome.severity_band})"
            lead = (
                f"**Moderate hypercalcemia** ({calcium.total_label()} {band}). PTH, PTHrP, 25-OH and 1,25-(OH)₂ "
                "vitamin D separate PTH-mediated, malignancy-related, granulomatous and vitamin-D causes."
            )
            workup = [o for o in outcome.orders if o in ("pth", "pthrp", "vitamin_d_25oh", "vitamin_d_1_25")]
        rows = [("Calcium", e.model_copy(update={"threshold": band}) if e is calcium.total_row else e) for e in calcium.evidence]
        body = f"{lead}\n\nMeasured and corrected values:\n\n{evidence_table(rows)}"
        cards.append(
            make_card(
                ctx,
                topic=topic,
                rule_id=RULE_IDS["severe" if outcome.severity == "severe" else "moderate_hyperca"],
                indicator=indicator,
                summary=summary,
                body=body,
                suggestions=order_suggestions(ctx, catalog, workup),
            )
        )

    # --- §2.5 context cards
    if outcome.calcinosis_cutis:
        cards.append(
            make_card(
                ctx,
                topic="calcinosis-cutis-present",
                rule_id=RULE_IDS["calcinosis_cutis"],
                indicator="info",
                summary="Calcinosis cutis is on the problem list",
                body="**Calcinosis cutis is on the problem list.** Review its type (dystrophic, metastatic, iatrogenic, idiopathic) and the factors below.\n\n"
                + evidence_table([("Problem list", e) for e in _conditions_ev(outcome.calcinosis_cutis)]),
            )
        )
    if outcome.dystrophic:
        names = sorted({c.source.display for c in outcome.dystrophic})
        present = {c.feature for c in outcome.dystrophic}
        # REFERENCE §2.5.3's card text, the lines that concern the patient's own conditions.
        lines = [text for features, text in _DYSTROPHIC_LINES if present & features]
        body = (
            "**Dystrophic calcinosis context.** Calcium and phosphate are usually normal in dystrophic calcinosis.\n\n"
            + "".join(f"- {line}\n" for line in lines)
            + ("\n" if lines else "")
            + evidence_table([("Problem list", e) for e in _conditions_ev(outcome.dystrophic)])
        )
        cards.append(
            make_card(
                ctx,
                topic="dystrophic-calcinosis-context",
                rule_id=RULE_IDS["dystrophic"],
                indicator="info",
                summary=f"Dystrophic calcinosis context: {', '.join(names)}"[:139],
                body=body,
            )
        )
    if outcome.iatrogenic:
        body = (
            "**Iatrogenic calcinosis context**: intravenous calcium or phosphate, current or recent (dates below). "
            "Extravasation can cause calcinosis cutis: monitor the IV site.\n\n"
            + evidence_table([("IV medication", medication_evidence(m)) for m in outcome.iatrogenic])
        )
        cards.append(
            make_card(
                ctx,
                topic="iatrogenic-calcinosis-context",
                rule_id=RULE_IDS["iatrogenic"],
                indicator="info",
                summary="IV calcium or phosphate: monitor the IV site for extravasation calcinosis",
                body=body,
            )
        )
    # Most urgent first; among equals, the order above (risk before context). sorted() is stable.
    return sorted(cards, key=lambda c: _URGENCY[c["indicator"]])


_URGENCY = {"critical": 0, "warning": 1, "info": 2}
_DYSTROPHIC_LINES = (
    (
        frozenset({"systemic_sclerosis", "crest"}),
        "Systemic sclerosis: calcinosis in 24.7% of 5,218 patients, associated with digital ulcers (OR 3.9) and "
        "osteoporosis (OR 4.2) (Valenzuela 2016); anticentromere and anti-PM/Scl antibodies are more frequent.",
    ),
    (
        frozenset({"juvenile_dermatomyositis"}),
        "Juvenile dermatomyositis: calcinosis in 13% (CARRA registry, 631 patients), historically about 40%; higher "
        "with anti-NXP2 (20% of 285 UK patients), younger onset, and delayed treatment or prolonged disease activity "
        "(Tansley 2014).",
    ),
    (frozenset({"pxe", "ehlers_danlos", "werner_syndrome"}), "PXE, Ehlers-Danlos and Werner syndrome: case-level evidence only."),
)


def _conditions_ev(conditions: list[Any]) -> list[Evidence]:
    return [condition_evidence(c) for c in conditions]


# --------------------------------------------------------------------------- RiskAssessment
_QUALITATIVE = {"low": "low", "moderate": "moderate", "high": "high"}


def risk_assessments(outcome: Outcome, ctx: CardContext, now_iso: str) -> list[dict[str, Any]]:
    """One FHIR R4 RiskAssessment per flag (calciphylaxis and metastatic calcification), with basis references."""
    out: list[dict[str, Any]] = []
    patient_id = ctx.patient.split("/", 1)[-1]
    flags: list[tuple[str, str, str, str, list[str], str | None]] = []
    cal_tier = outcome.calciphylaxis_tier
    if cal_tier != "none":
        basis = [e.reference for f in (*outcome.majors, *outcome.minors) for e in f.evidence if e.reference]
        basis += [e.reference for e in outcome.renal_evidence if e.reference]
        basis += [c.source.reference for c in outcome.established]
        label = "Calciphylaxis (calcific uremic arteriolopathy)"
        # REFERENCE §2.3: a tier without valid results it needs carries "(incomplete data)", here as on the card
        incomplete = f"incomplete data: no valid {', '.join(outcome.missing)}" if outcome.incomplete else None
        flags.append(("calciphylaxis", cal_tier, label, outcome.explanations["calciphylaxis"], basis, incomplete))
    met = outcome.metastatic_tier
    if met != "none":
        basis = [e.reference for f in outcome.predisposing for e in f.evidence if e.reference]
        basis += [e.reference for e in outcome.calcium.evidence if e.reference]
        basis += [e.reference for e in outcome.phosphate_evidence if e.reference]
        if outcome.product is not None:
            basis += [outcome.product.calcium.source.reference, outcome.product.phosphate.source.reference]
        flags.append(("metastatic-calcification", met, "Metastatic calcification", outcome.explanations["metastatic"], basis, None))
    for flag, tier, label, rationale, basis, incomplete in flags:
        rule_id = RULE_IDS["calciphylaxis" if flag == "calciphylaxis" else "metastatic"]
        refs = sorted({b for b in basis if not b.startswith(ctx.patient)})
        prediction: dict[str, Any] = {"outcome": {"text": label}, "rationale": f"{rationale} ({incomplete})" if incomplete else rationale}
        if tier in _QUALITATIVE:
            prediction["qualitativeRisk"] = {
                "coding": [{"system": RISK_PROBABILITY, "code": _QUALITATIVE[tier], "display": tier.capitalize()}],
                "text": f"{tier}{' (incomplete data)' if incomplete else ''} (rule tier; not a validated probability)",
            }
        else:
            prediction["qualitativeRisk"] = {"text": tier}
        resource = {
            "resourceType": "RiskAssessment",
            "identifier": [{"system": RISK_IDENTIFIER_SYSTEM, "value": f"{patient_id}-{flag}"}],
            "status": "final",
            "subject": {"reference": ctx.patient},
            "occurrenceDateTime": now_iso,
            "code": {"text": f"{label} risk ({flag})"},
            "method": {"text": f"calcinosis-cds rule {rule_id} (rules {ctx.rules_version}, mappings {ctx.mappings_version})"},
            "basis": [{"reference": r} for r in refs],
            "prediction": [prediction],
            "note": [
                {
                    "text": "Tier from expert-opinion rules on observational data; not a validated probability. "
                    f"rules_version={ctx.rules_version}; mappings_version={ctx.mappings_version}; inputs={ctx.inputs_hash}"
                }
            ],
        }
        out.append(_clean(resource))
    return out


def basis_hash(resource: dict[str, Any]) -> str:
    """What makes a written RiskAssessment different: its tier and basis (not its timestamp)."""
    pred = resource.get("prediction", [{}])[0]
    key = repr((pred.get("qualitativeRisk"), sorted(b["reference"] for b in resource.get("basis", []))))
    return hashlib.sha256(key.encode()).hexdigest()[:16]
