"""CDS Hooks discovery: the four services (CONTRACT "HTTP") and prefetch templates generated from the mappings.

Templates stay within the spec's recommended query subset (type search by ``patient`` and ``code`` tokens,
``_sort``) and well under the 2,048 characters every EHR accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.cds.rules import REQUIRED_ANALYTES
from service.terminology.catalog import Catalog

LOINC = "http://loinc.org"
MAX_TEMPLATE_LENGTH = 2048


@dataclass(frozen=True)
class ServiceDef:
    id: str
    hook: str
    title: str
    description: str


SERVICES: tuple[ServiceDef, ...] = (
    ServiceDef(
        "calcinosis-risk",
        "patient-view",
        "Calciphylaxis and metastatic calcification risk",
        "Flags calciphylaxis risk tiers (renal context, vitamin K antagonists, mineral derangement, hypoalbuminemia, "
        "severe hyperparathyroidism), metastatic calcification risk (Ca×P), hypercalcemia and calcinosis context. "
        "Tiers are expert-opinion rules, not validated probabilities.",
    ),
    ServiceDef(
        "calcinosis-encounter",
        "encounter-start",
        "Calcification risk at encounter start",
        "The calcinosis-risk assessment at the start of an encounter (e.g. a dialysis session).",
    ),
    ServiceDef(
        "calcinosis-order-select",
        "order-select",
        "Calcification risk of a selected order",
        "Warns when a selected order adds warfarin, a calcium-based binder, vitamin D or IV calcium/phosphate for a "
        "patient in a renal context or with established calciphylaxis.",
    ),
    ServiceDef(
        "calcinosis-order-sign",
        "order-sign",
        "Calcification risk at order signing",
        "The medication order check of order-select plus the patient's calcification risk cards, at signing.",
    ),
)
SERVICES_BY_ID = {s.id: s for s in SERVICES}

#: Keys whose data the rules cannot do without: if unobtainable, the call is answered 412.
REQUIRED_KEYS = frozenset({"observations", "conditions", "medicationRequests"})

USAGE_REQUIREMENTS = (
    "Needs read access to the patient's Patient, Observation (calcium, phosphate, albumin, PTH, ALP, eGFR, BMI), "
    "Condition, MedicationRequest, MedicationStatement, MedicationAdministration, Medication (the drug a medication "
    "resource references) and Procedure resources, through the prefetch or fhirServer with fhirAuthorization. Calls "
    "are authenticated with a signed JWT (ES384 or RS384) from an issuer registered with the service."
)


def observation_code_tokens(catalog: Catalog) -> list[str]:
    """``system|code`` of every Observation code the rules need, any system (FHIR searches and subscription criteria)."""
    return sorted({f"{system}|{code}" for analyte in REQUIRED_ANALYTES for system, code in catalog.codes_for_analyte(analyte)})


def prefetch_templates(catalog: Catalog) -> dict[str, str]:
    codes = ",".join(t for t in observation_code_tokens(catalog) if t.startswith(f"{LOINC}|"))
    templates = {
        "patient": "Patient/{{context.patientId}}",
        "observations": f"Observation?patient={{{{context.patientId}}}}&code={codes}&_sort=-date",
        "conditions": "Condition?patient={{context.patientId}}",
        "medicationRequests": "MedicationRequest?patient={{context.patientId}}",
        "medicationStatements": "MedicationStatement?patient={{context.patientId}}",
        "medicationAdministrations": "MedicationAdministration?patient={{context.patientId}}",
        "procedures": "Procedure?patient={{context.patientId}}",
    }
    for key, template in templates.items():
        if len(template) > MAX_TEMPLATE_LENGTH:
            raise ValueError(f"prefetch template {key} is {len(template)} characters (limit {MAX_TEMPLATE_LENGTH})")
    return templates


def discovery_document(catalog: Catalog) -> dict[str, Any]:
    prefetch = prefetch_templates(catalog)
    return {
        "services": [
            {
                "hook": s.hook,
                "title": s.title,
                "description": s.description,
                "id": s.id,
                "prefetch": prefetch,
                "usageRequirements": USAGE_REQUIREMENTS,
            }
            for s in SERVICES
        ]
    }


def render_template(template: str, context: dict[str, Any], user: str | None = None) -> str | None:
    """Fill ``{{context.x}}`` tokens (and ``{{userPractitionerId}}``-style user tokens); None if a token has no value."""
    out = template
    while "{{" in out:
        start = out.index("{{")
        end = out.find("}}", start)
        if end < 0:
            return None
        token = out[start + 2 : end].strip()
        if token.startswith("context."):
            value = context.get(token[len("context.") :])
        elif token.startswith("user") and user:
            value = user
        else:
            value = None
        if not isinstance(value, str) or not value:
            return None
        out = out[:start] + value + out[end + 2 :]
    return out
