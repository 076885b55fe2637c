"""Builders for FHIR R4 JSON used across tests. Codes appear here (test data), never in production Python."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from service.fhir.notifications import ResourceChanged

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
CPT = "http://www.ama-assn.org/go/cpt"

NOW = datetime(2025, 7, 1, tzinfo=UTC)
PATIENT = "Patient/p1"

# Commonly used codes (REFERENCE §3)
CA = "17861-6"
CA_MOL = "2000-8"
ICA = "1995-0"
P = "2777-1"
P_MOL = "14879-1"
ALB = "1751-7"
PTH = "2731-8"
PTH_MOL = "14866-8"
ALP = "6768-6"
EGFR = "33914-3"
BMI = "39156-5"
WEIGHT = "29463-7"
HEIGHT = "8302-2"
CA_CORR_REPORTED = "46099-8"

_ids = itertools.count(1)


def _id(prefix: str) -> str:
    return f"{prefix}{next(_ids)}"


def ago(days: float = 0, hours: float = 0, now: datetime = NOW) -> str:
    return (now - timedelta(days=days, hours=hours)).isoformat().replace("+00:00", "Z")


def patient(pid: str = "p1", gender: str | None = "male", birth: str | None = "1960-01-01") -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "Patient", "id": pid}
    if gender:
        res["gender"] = gender
    if birth:
        res["birthDate"] = birth
    return res


def obs(
    code: str,
    value: float | int | str | None,
    unit: str = "mg/dL",
    *,
    days: float = 1,
    hours: float = 0,
    when: str | None = None,
    status: str = "final",
    subject: str = PATIENT,
    system: str = LOINC,
    extra_codings: list[dict[str, Any]] | None = None,
    ref_high: tuple[float, str] | None = None,
    rid: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    codings = [*(extra_codings or []), {"system": system, "code": code}]
    res: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid or _id("o"),
        "status": status,
        "code": {"coding": codings},
        "subject": {"reference": subject},
        "effectiveDateTime": when or ago(days, hours),
    }
    if value is not None:
        res["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    if ref_high is not None:
        res["referenceRange"] = [{"high": {"value": ref_high[0], "unit": ref_high[1], "system": UCUM, "code": ref_high[1]}}]
    res.update(fields)
    return res


def condition(
    code: str,
    system: str = SNOMED,
    *,
    display: str | None = None,
    text: str | None = None,
    clinical: str | None = "active",
    verification: str | None = "confirmed",
    subject: str = PATIENT,
    category: str | None = None,
    rid: str | None = None,
) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display:
        coding["display"] = display
    res: dict[str, Any] = {
        "resourceType": "Condition",
        "id": rid or _id("c"),
        "code": {"coding": [coding]},
        "subject": {"reference": subject},
        "onsetDateTime": ago(400),
    }
    if text:
        res["code"]["text"] = text
    if clinical:
        res["clinicalStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": clinical}]}
    if verification:
        res["verificationStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": verification}]}
    if category:
        res["category"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": category}]}]
    return res


def med_request(
    code: str,
    *,
    status: str = "active",
    authored_days: float = 30,
    route: tuple[str, str] | None = None,
    route_text: str | None = None,
    subject: str = PATIENT,
    validity_end_days: float | None = None,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": _id("mr"),
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code}]},
        "subject": {"reference": subject},
        "authoredOn": ago(authored_days),
    }
    if route or route_text:
        r: dict[str, Any] = {}
        if route:
            r["coding"] = [{"system": route[0], "code": route[1]}]
        if route_text:
            r["text"] = route_text
        res["dosageInstruction"] = [{"route": r}]
    if validity_end_days is not None:
        res["dispenseRequest"] = {"validityPeriod": {"start": ago(authored_days), "end": ago(validity_end_days)}}
    return res


def med_statement(code: str, *, status: str = "completed", start_days: float = 400, end_days: float | None = None, subject: str = PATIENT) -> dict[str, Any]:
    period: dict[str, Any] = {"start": ago(start_days)}
    if end_days is not None:
        period["end"] = ago(end_days)
    return {
        "resourceType": "MedicationStatement",
        "id": _id("ms"),
        "status": status,
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code}]},
        "subject": {"reference": subject},
        "effectivePeriod": period,
    }


def med_admin(code: str, *, days: float = 2, route: tuple[str, str] | None = None, status: str = "completed", subject: str = PATIENT) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "MedicationAdministration",
        "id": _id("ma"),
        "status": status,
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code}]},
        "subject": {"reference": subject},
        "effectiveDateTime": ago(days),
    }
    if route:
        res["dosage"] = {"route": {"coding": [{"system": route[0], "code": route[1]}]}}
    return res


def procedure(code: str, system: str = SNOMED, *, days: float = 10, status: str = "completed", subject: str = PATIENT) -> dict[str, Any]:
    return {
        "resourceType": "Procedure",
        "id": _id("pr"),
        "status": status,
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": subject},
        "performedDateTime": ago(days),
    }


def renal_panel(ca: float = 9.0, p: float = 4.5, alb: float = 4.2, pth: float | None = 250, *, days: float = 3) -> list[dict[str, Any]]:
    """A complete, unremarkable dialysis panel (same draw)."""
    out = [obs(CA, ca, days=days), obs(P, p, days=days), obs(ALB, alb, "g/dL", days=days)]
    if pth is not None:
        out.append(obs(PTH, pth, "pg/mL", days=days))
    return out


def esrd() -> dict[str, Any]:
    return condition("46177005", display="End-stage renal disease")


def bundle(*resources: dict[str, Any], btype: str = "collection") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": btype, "entry": [{"resource": r} for r in resources]}


def changed(rid: str, patient: str = "p1", version: str = "1") -> ResourceChanged:
    """A total calcium result delivered as a full-resource notification, as the receiver parses it."""
    resource = obs(CA, 9.0, rid=rid, subject=f"Patient/{patient}", meta={"versionId": version})
    return ResourceChanged(resource_type="Observation", id=rid, version_id=version, last_updated=None, resource=resource)
