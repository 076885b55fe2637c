"""order-select / order-sign: the ``medication-order-risk`` card (CONTRACT "Cards").

Fires when an order under review adds warfarin, a calcium-based binder, vitamin D therapy or IV
calcium/phosphate for a patient in a renal context (R1/R2) or with established calciphylaxis.
Suggestions: remove the draft order (``delete``), and where the mappings name a standard alternative for the
patient's setting and findings (a non-calcium binder for a calcium-based one, in kidney failure with a high phosphate
and no non-calcium binder already) replace the drug in the draft order (``update``); when an alternative exists but is
withheld, the card says why. An order that adds only IV calcium or phosphate gets an informational card with no suggestion:
REFERENCE §2.5.4 rests on case reports, and IV calcium is often emergency treatment (hyperkalaemia, symptomatic
hypocalcaemia), so removing it is not advice this service can give.
"""

from __future__ import annotations

import copy
from typing import Any

from service.cds.cards import CardContext, evidence_table, make_card, stable_uuid
from service.cds.extract import IV_FEATURES, given_intravenously, recognise_medication
from service.cds.fhirutil import resource_ref
from service.cds.grouping import resolve_medication
from service.cds.model import CaseFacts, Evidence
from service.cds.rules import RULE_IDS, Outcome, condition_evidence
from service.terminology.catalog import Catalog
from service.terminology.schema import OrderAlternative

ORDER_RISK_FEATURES = {
    "vka": "warfarin (vitamin K antagonist)",
    "calcium_binder": "a calcium-based phosphate binder",
    "vitamin_d_therapy": "vitamin D therapy",
    "iv_calcium": "intravenous calcium",
    "iv_phosphate": "intravenous phosphate",
}


def draft_medication_requests(draft_orders: Any, selections: list[str] | None) -> list[dict[str, Any]]:
    """MedicationRequests of ``context.draftOrders`` (a Bundle, its ``type`` optional as the Sandbox sends it);
    restricted to ``selections`` (``MedicationRequest/id``) when given (order-select)."""
    if not isinstance(draft_orders, dict):
        return []
    entries = draft_orders.get("entry") if draft_orders.get("resourceType") == "Bundle" else [{"resource": draft_orders}]
    out = []
    for entry in entries if isinstance(entries, list) else []:
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or res.get("resourceType") != "MedicationRequest":
            continue
        if selections is not None and resource_ref(res) not in selections:
            continue
        out.append(res)
    return out


def draft_medications(draft_orders: Any) -> dict[str, dict[str, Any]]:
    """The Medications of ``context.draftOrders``, by ``Medication/id`` and by entry ``fullUrl``: a draft
    MedicationRequest may name the Medication ordered with it either way."""
    if not isinstance(draft_orders, dict) or draft_orders.get("resourceType") != "Bundle" or not isinstance(draft_orders.get("entry"), list):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for entry in draft_orders["entry"]:
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or res.get("resourceType") != "Medication":
            continue
        if (ref := resource_ref(res)) is not None:
            out[ref] = res
        if isinstance(full_url := entry.get("fullUrl"), str) and full_url:
            out[full_url] = res
    return out


def _order_features(order: dict[str, Any], catalog: Catalog, medications: dict[str, dict[str, Any]]) -> tuple[set[str], dict[str, Any] | None]:
    concept = order.get("medicationCodeableConcept")
    med = None
    if concept is None:
        med = resolve_medication(order.get("medicationReference"), medications, order.get("contained"))
        concept = med.get("code") if med else None
    recognised = recognise_medication(catalog, concept, med)
    if recognised is None:
        return set(), None
    features = set(recognised.match.features) & ORDER_RISK_FEATURES.keys()
    if not given_intravenously(catalog, recognised.match, order):
        features -= IV_FEATURES
    return features, recognised.coding


#: The elements of a draft MedicationRequest that stay true when the drug ordered changes, copied into the ``update``
#: that replaces it. Everything else describes the old drug or would make the resource invalid, so it is left out:
#: ``contained`` (a Medication no longer referenced: FHIR invariant dom-3), ``text`` (a narrative of the old order),
#: ``medicationReference``, ``dosageInstruction`` (the prescriber sets the dose of the new drug), ``dispenseRequest``
#: (quantity and supply of the old product), ``substitution``, ``note``, ``doNotPerform``, ``statusReason``,
#: ``reported[x]``, ``supportingInformation``, ``performer``/``performerType`` (who administers depends on the drug),
#: ``recorder``, ``instantiates*`` (a protocol for the old drug), ``priorPrescription``, ``detectedIssue``,
#: ``eventHistory``, and ``meta``, ``implicitRules``, ``extension``, ``modifierExtension`` (their meaning is unknown
#: here, and a modifier extension could change the meaning of the new order).
#: Kept: the order's identity (``id``, ``identifier``, ``groupIdentifier``), its status and kind, whom and by whom it is
#: for, and why (``reasonCode``/``reasonReference``: the indication is what the alternative treats), what it fulfils
#: (``basedOn``), and ``insurance``.
_REPLACEMENT_ELEMENTS = (
    "resourceType",
    "id",
    "language",
    "identifier",
    "status",
    "intent",
    "category",
    "priority",
    "subject",
    "encounter",
    "authoredOn",
    "requester",
    "reasonCode",
    "reasonReference",
    "basedOn",
    "groupIdentifier",
    "courseOfTherapyType",
    "insurance",
)


def replacement_order(order: dict[str, Any], system: str, code: str, label: str) -> dict[str, Any]:
    """The draft ``order`` with its drug replaced by ``system|code``: only the elements that stay valid for another drug
    (``_REPLACEMENT_ELEMENTS``), and no dose (the prescriber sets it)."""
    replaced = copy.deepcopy({key: order[key] for key in _REPLACEMENT_ELEMENTS if key in order})
    replaced["medicationCodeableConcept"] = {"coding": [{"system": system, "code": code, "display": label}], "text": label}
    return replaced


_TRANSPLANT_BASES = frozenset({"kidney_transplant", "kidney_transplant_procedure"})


def patient_settings(outcome: Outcome) -> frozenset[str]:
    """The settings of ``order_alternatives.yaml``'s ``offer_when`` that describe this patient."""
    settings = set()
    if outcome.renal == "R2" and outcome.renal_bases - _TRANSPLANT_BASES:
        settings.add("kidney_failure")
    if outcome.renal_bases & _TRANSPLANT_BASES:
        settings.add("kidney_transplant")
    if outcome.renal == "R1":
        settings.add("ckd4")
    if outcome.established:
        settings.add("established_calciphylaxis")
    return frozenset(settings)


#: How a card names the settings of ``offer_when`` when it says an alternative is not offered in the patient's.
_SETTING_WORDS = {
    "kidney_failure": "kidney failure",
    "kidney_transplant": "after a kidney transplant",
    "ckd4": "CKD G4",
    "established_calciphylaxis": "established calciphylaxis",
}


def withheld_because(alt: OrderAlternative, settings: frozenset[str], outcome: Outcome, facts: CaseFacts, catalog: Catalog) -> list[str]:
    """Why ``alt`` is not proposed for this patient (short phrases, no patient values); empty when it is proposed."""
    if not settings.intersection(alt.offer_when):
        return ["offered only in " + " or ".join(_SETTING_WORDS[s] for s in alt.offer_when)]
    reasons = []
    if "hyperphosphatemia" in alt.requires and not outcome.hyperphosphatemia:
        # outcome.hyperphosphatemia is the M2 comparison itself (REFERENCE §2.3): the latest valid phosphate in the window
        # against the Thresholds value for the renal context (the lab's upper limit under 18), whose text its evidence carries.
        threshold = next((e.threshold for e in outcome.phosphate_evidence if e.threshold), None)
        reasons.append(f"latest phosphate not above {threshold.removeprefix('> ')}" if threshold else "no valid phosphate result in the window")
    for feature in alt.unless_current:
        if any(feature in m.features and m.current and facts.usable(m) for m in facts.medications):
            reasons.append(f"already on a {catalog.features[feature].display.lower()}")
    return reasons


def order_risk_cards(
    orders: list[dict[str, Any]],
    outcome: Outcome,
    facts: CaseFacts,
    ctx: CardContext,
    catalog: Catalog,
    medications: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """``facts``: the patient's (their current medications decide whether an alternative is withheld);
    ``medications``: the Medications a ``medicationReference`` may name (the draftOrders Bundle's, the prefetch's)."""
    renal = outcome.renal in ("R1", "R2")
    established = bool(outcome.established)
    if not (renal or established):
        return []
    why: list[Evidence] = [*outcome.renal_evidence] if renal else []
    why += [condition_evidence(c) for c in outcome.established]
    setting = "established calciphylaxis" if established else f"renal context {outcome.renal}"
    settings = patient_settings(outcome)
    cards = []
    for position, order in enumerate(orders):
        features, coding = _order_features(order, catalog, medications)
        if not features or coding is None:
            continue
        draft_ref = resource_ref(order)  # None: a draft without an id, which no action can name
        ref = draft_ref or "MedicationRequest/(draft)"
        drug = coding.get("display") or ORDER_RISK_FEATURES[sorted(features)[0]]
        kinds = ", ".join(ORDER_RISK_FEATURES[f] for f in sorted(features))
        iv_only = features <= IV_FEATURES
        alternatives = []
        withheld = ""
        for feature in sorted(features):
            if (alt := catalog.order_alternatives.get(feature)) is None:
                continue
            if reasons := withheld_because(alt, settings, outcome, facts, catalog):
                withheld += f"A switch to {alt.label} is not proposed: {'; '.join(reasons)}. "
            else:
                alternatives.append((feature, alt))
        suggestions: list[dict[str, Any]] = []
        unchangeable = ""
        if draft_ref is None:
            if alternatives or not iv_only:
                unchangeable = "This draft order has no id, so it cannot be changed or removed from this card. "
        else:
            for feature, alt in alternatives:
                updated = replacement_order(order, alt.system, alt.code, alt.label)
                suggestions.append(
                    {
                        "label": f"Replace with {alt.label} (set the dose)",
                        "uuid": stable_uuid(ctx, RULE_IDS["order"], ref, "replace", feature),
                        "actions": [{"type": "update", "description": f"Replace the draft order with {alt.label}. {alt.rationale}.", "resource": updated}],
                    }
                )
            if not iv_only:
                suggestions.append(
                    {
                        "label": "Remove this draft order",
                        "uuid": stable_uuid(ctx, RULE_IDS["order"], ref, "delete"),
                        "actions": [{"type": "delete", "description": f"Remove the draft order for {drug}", "resourceId": ref}],
                    }
                )
        named = f"The order for {drug} adds {kinds}" if coding.get("display") else f"This order adds {kinds}"
        body = (
            f"**{named}** in a patient with {setting}. "
            + (
                "Vitamin K antagonists, calcium-based binders and vitamin D are case-control risk factors for calciphylaxis. "
                if features - IV_FEATURES
                else ""
            )
            + (
                "Intravenous calcium or phosphate can cause extravasation calcinosis: monitor the IV site "
                "(evidence: case reports and case series only). "
                if features & IV_FEATURES
                else ""
            )
            + (withheld if draft_ref is not None else "")
            + unchangeable
            + "\n\n"
            + evidence_table(
                [
                    (
                        "Order under review",
                        Evidence(
                            label=drug,
                            value=order["status"] if isinstance(order.get("status"), str) and order["status"] else "draft",
                            reference=ref,
                            code=f"{coding.get('system')}|{coding['code']}" if coding.get("code") else None,
                        ),
                    )
                ]
                + [("Why it matters", e) for e in why]
            )
        )
        card = make_card(
            ctx,
            topic="medication-order-risk",
            rule_id=RULE_IDS["order"],
            indicator="info" if iv_only else "warning",
            summary=f"Order adds {kinds.split(',')[0]} for a patient with {setting}"[:139],
            body=body,
            suggestions=suggestions,
            uuid_parts=(ref, ",".join(sorted(features)), str(position)),
        )
        if suggestions:
            card["selectionBehavior"] = "at-most-one"
        cards.append(card)
    return cards
