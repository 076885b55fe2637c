"""Structural validation of the few resources that can inform a decision, with fhir.resources (R4B models read R4 JSON).

Only resources that passed the code, status and window filters get here, so the cost stays small
(validating every Observation of a Synthea bundle would cost far more than parsing it).
What is validated is what the rules can read, plus the elements FHIR requires of the type: the narrative
(``text``, XHTML that fhir.resources checks at several milliseconds a resource), identifiers, performers,
notes, extensions and the like are never read and are left out (of a Patient: gender, birthDate and
deceased[x], not names or addresses). A malformed element the rules never read cannot make a value wrong, and
each nested element costs model construction time.
The returned message names fields, never values.
"""

from __future__ import annotations

import hashlib
import importlib
import threading
from collections import OrderedDict
from functools import cache
from typing import Any

import orjson
from pydantic import ValidationError


@cache
def _model(resource_type: str) -> Any:
    module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
    return getattr(module, resource_type)


_COMMON = ("resourceType", "id", "meta", "contained")
_MEDICATION = ("status", "medicationCodeableConcept", "medicationReference", "subject")
#: Per type: the elements extraction and the rules read (``service/cds/extract.py``), and those R4 requires. Only
#: these types can inform a decision; any other is not validated.
_USED: dict[str, tuple[str, ...]] = {
    "Patient": ("resourceType", "id", "meta", "gender", "birthDate", "deceasedBoolean", "deceasedDateTime", "active"),
    "Observation": (
        *_COMMON, "status", "code", "subject", "effectiveDateTime", "effectiveInstant", "effectivePeriod", "issued",
        "valueQuantity", "dataAbsentReason", "referenceRange",
    ),
    "Condition": (*_COMMON, "clinicalStatus", "verificationStatus", "category", "code", "subject", "onsetDateTime", "recordedDate"),
    "MedicationRequest": (*_COMMON, *_MEDICATION, "intent", "authoredOn", "dispenseRequest", "dosageInstruction"),
    "MedicationStatement": (*_COMMON, *_MEDICATION, "effectiveDateTime", "effectivePeriod", "dateAsserted", "dosage"),
    "MedicationAdministration": (*_COMMON, *_MEDICATION, "effectiveDateTime", "effectivePeriod", "dosage"),
    "Procedure": (*_COMMON, "status", "code", "subject", "performedDateTime", "performedPeriod"),
}


class _VerdictCache:
    """Verdicts by content digest: the same resource content always gets the same verdict, so a chart opened
    again, or a patient re-evaluated by the monitor, does not pay for model validation twice. Bounded (LRU)."""

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self._data: OrderedDict[bytes, str | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[bool, str | None]:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return True, self._data[key]
        return False, None

    def put(self, key: bytes, verdict: str | None) -> None:
        with self._lock:
            self._data[key] = verdict
            if len(self._data) > self.size:
                self._data.popitem(last=False)


_VERDICTS = _VerdictCache()


def validation_error(resource: dict[str, Any]) -> str | None:
    """None when the elements the rules read are valid FHIR R4 for the type, else a short value-free reason."""
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or rtype not in _USED:
        return None
    elements = _USED[rtype]
    used = {k: resource[k] for k in elements if k in resource}
    try:
        key = hashlib.blake2b(orjson.dumps(used, option=orjson.OPT_SORT_KEYS), digest_size=20).digest()
    except TypeError:  # not JSON-serialisable: cannot be FHIR JSON
        return f"invalid FHIR {rtype} (structure)"
    hit, verdict = _VERDICTS.get(key)
    if hit:
        return verdict
    verdict = _validate(rtype, used)
    _VERDICTS.put(key, verdict)
    return verdict


def _validate(rtype: str, used: dict[str, Any]) -> str | None:
    try:
        _model(rtype).model_validate(used)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in err["loc"][:3]) for err in exc.errors()})[:3]
        return f"invalid FHIR {rtype} ({', '.join(fields) or 'structure'})"
    except (TypeError, ValueError, KeyError) as exc:  # KeyError: fhir.resources on a contained resource of type ""
        return f"invalid FHIR {rtype} ({type(exc).__name__})"
    return None


_WARM_UP: tuple[dict[str, Any], ...] = (
    {"resourceType": "Patient", "id": "warm-up", "gender": "unknown"},
    {"resourceType": "Observation", "id": "warm-up", "status": "final", "code": {"text": "warm-up"}, "valueQuantity": {"value": 1}},
    {"resourceType": "Condition", "id": "warm-up", "subject": {"reference": "Patient/warm-up"}, "code": {"text": "warm-up"}},
    {"resourceType": "MedicationRequest", "id": "warm-up", "status": "active", "intent": "order",
     "medicationCodeableConcept": {"text": "warm-up"}, "subject": {"reference": "Patient/warm-up"}},
    {"resourceType": "MedicationStatement", "id": "warm-up", "status": "active", "medicationCodeableConcept": {"text": "warm-up"},
     "subject": {"reference": "Patient/warm-up"}},
    {"resourceType": "MedicationAdministration", "id": "warm-up", "status": "completed",
     "medicationCodeableConcept": {"text": "warm-up"}, "subject": {"reference": "Patient/warm-up"}, "effectiveDateTime": "2020-01-01"},
    {"resourceType": "Procedure", "id": "warm-up", "status": "completed", "subject": {"reference": "Patient/warm-up"}},
)


def warm_up() -> None:
    """Import the models and run each once (a first validation costs ~0.15 s of schema set-up per process):
    called at process start, so no request or task pays for it. The verdicts are not cached."""
    for resource in _WARM_UP:
        _validate(resource["resourceType"], resource)


def clear_verdicts() -> None:
    """Forget cached verdicts (benchmarks measure cold validation)."""
    _VERDICTS._data.clear()
