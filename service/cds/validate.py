"""Structural validation of the few resources that can inform a decision, with fhir.resources (R4B models read R4 JSON).

Only resources that passed the code, status and window filters get here, so the cost stays small
(validating every Observation of a Synthea bundle would cost far more than parsing it).
What is validated is what the rules can read: the narrative (``text``, XHTML that fhir.resources checks
at several milliseconds a resource) is never read and is left out; of a Patient only the elements used
(gender, birthDate, deceased[x]) are validated, not names, addresses or extensions.
The returned message names fields, never values.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from pydantic import ValidationError

_MODULES = {
    "Observation": "observation",
    "Condition": "condition",
    "MedicationRequest": "medicationrequest",
    "MedicationStatement": "medicationstatement",
    "MedicationAdministration": "medicationadministration",
    "Procedure": "procedure",
    "Patient": "patient",
    "RiskAssessment": "riskassessment",
    "Bundle": "bundle",
    "ServiceRequest": "servicerequest",
}


@cache
def _model(resource_type: str) -> Any:
    module = importlib.import_module(f"fhir.resources.R4B.{_MODULES[resource_type]}")
    return getattr(module, resource_type)


_PATIENT_USED = ("resourceType", "id", "meta", "gender", "birthDate", "deceasedBoolean", "deceasedDateTime", "active")


def _used_elements(resource: dict[str, Any]) -> dict[str, Any]:
    if resource.get("resourceType") == "Patient":
        return {k: resource[k] for k in _PATIENT_USED if k in resource}
    if "text" in resource:
        return {k: v for k, v in resource.items() if k != "text"}
    return resource


def validation_error(resource: dict[str, Any]) -> str | None:
    """None when the elements the rules read are valid FHIR R4 for the type, else a short value-free reason."""
    rtype = resource.get("resourceType")
    if rtype not in _MODULES:
        return None
    try:
        _model(rtype).model_validate(_used_elements(resource))
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in err["loc"][:3]) for err in exc.errors()})[:3]
        return f"invalid FHIR {rtype} ({', '.join(fields) or 'structure'})"
    except (TypeError, ValueError) as exc:
        return f"invalid FHIR {rtype} ({type(exc).__name__})"
    return None
