"""Flatten Bundles and NDJSON content into resources and group them by patient.

Works for any Bundle type (transaction, collection, searchset, batch-response, history) and for
``urn:uuid:`` references as Synthea writes them. A resource whose patient cannot be determined is
reported, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from service.cds.fhirutil import PATIENT_SCOPED, last_updated_of, normalize_reference, resource_ref, subject_reference, version_of
from service.cds.model import Excluded


@dataclass
class PatientGroups:
    patients: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Medication resources, shared by every patient (medicationReference targets).
    medications: dict[str, dict[str, Any]] = field(default_factory=dict)
    unattributed: list[Excluded] = field(default_factory=list)
    other_types: dict[str, int] = field(default_factory=dict)


#: Only these can be the target of a reference we must resolve (subject → Patient, medicationReference → Medication).
_ALIASED = frozenset({"Patient", "Medication"})


def flatten(items: Iterable[Any], aliases: dict[str, str]) -> list[dict[str, Any]]:
    """Resources from resources/Bundles (nested Bundles too); records fullUrl aliases of Patients and Medications."""
    out: list[dict[str, Any]] = []
    stack = list(items)
    stack.reverse()
    while stack:
        item = stack.pop()
        if not isinstance(item, dict):
            continue
        if item.get("resourceType") != "Bundle":
            out.append(item)
            continue
        entries = item.get("entry")
        if not isinstance(entries, list):
            continue
        nested: list[dict[str, Any]] = []
        for entry in entries:
            res = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(res, dict):
                continue
            if isinstance(res.get("resourceType"), str) and res["resourceType"] in _ALIASED:
                full_url, ref = entry.get("fullUrl"), resource_ref(res)
                if isinstance(full_url, str) and ref is not None:
                    aliases[full_url] = ref
            nested.append(res)
        if any(r.get("resourceType") == "Bundle" for r in nested):
            nested.reverse()
            stack.extend(nested)
        else:
            out.extend(nested)
    return out


def _version_number(version: str) -> bool:
    """A versionId compared as a number: ASCII digits only ("²" is a digit to str.isdigit), and short enough."""
    return version.isascii() and version.isdigit() and len(version) <= 18


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Is ``a`` a newer version of the same resource than ``b``?"""
    va, vb = version_of(a), version_of(b)
    if va is not None and vb is not None and va != vb and _version_number(va) and _version_number(vb):
        return int(va) > int(vb)
    la, lb = last_updated_of(a), last_updated_of(b)
    if la is not None and lb is not None:
        return la > lb
    return False


def group_by_patient(items: Iterable[Any]) -> PatientGroups:
    aliases: dict[str, str] = {}
    resources = flatten(items, aliases)
    groups = PatientGroups()
    latest: dict[str, dict[str, Any]] = {}
    other = groups.other_types
    for res in resources:
        rtype = res.get("resourceType")
        if not isinstance(rtype, str) or (rtype not in PATIENT_SCOPED and rtype not in _ALIASED):
            if not isinstance(rtype, str):
                groups.unattributed.append(Excluded(reference="(unknown)", reason="not a FHIR resource (no resourceType)"))
            else:
                other[rtype] = other.get(rtype, 0) + 1
            continue
        ref = resource_ref(res)
        if ref is None:
            groups.unattributed.append(Excluded(reference=f"{rtype}/(no id)", reason="resource has no id"))
            continue
        prev = latest.get(ref)
        if prev is not None and not _newer(res, prev):
            continue
        latest[ref] = res
    by_target: dict[str, list[str]] = {}
    for alias, target in aliases.items():
        if target.startswith("Medication/"):
            by_target.setdefault(target, []).append(alias)
    subjects: dict[str, str | None] = {}  # every resource of a record names the same few subjects
    for key, res in latest.items():
        rtype = res["resourceType"]
        if rtype == "Patient":
            groups.patients.setdefault(key, []).append(res)
        elif rtype == "Medication":
            groups.medications[key] = res
            for alias in by_target.get(key, ()):
                groups.medications[alias] = res
        else:
            patient = subject_reference(res, aliases, subjects)
            if patient is None:
                groups.unattributed.append(Excluded(reference=key, reason="patient could not be determined from subject"))
                continue
            groups.patients.setdefault(patient, []).append(res)
    return groups


def resolve_medication(ref: Any, groups_medications: dict[str, dict[str, Any]], contained: list[Any] | None) -> dict[str, Any] | None:
    """Resolve MedicationRequest.medicationReference: contained ``#id``, Bundle fullUrl or ``Medication/id``."""
    if not isinstance(ref, dict):
        return None
    target = ref.get("reference")
    if not isinstance(target, str):
        return None
    if target.startswith("#") and isinstance(contained, list):
        for c in contained:
            if isinstance(c, dict) and c.get("id") == target[1:] and c.get("resourceType") == "Medication":
                return c
        return None
    if target in groups_medications:
        return groups_medications[target]
    norm = normalize_reference(target)
    return groups_medications.get(norm) if norm else None


#: The resources whose drug may be a ``medicationReference``.
MEDICATION_USERS = frozenset({"MedicationRequest", "MedicationStatement", "MedicationAdministration"})
#: A relative reference to a Medication, which the EHR's FHIR server can be asked for (a FHIR id: 1-64 of A-Z a-z 0-9 - .).
_RELATIVE_MEDICATION = re.compile(r"Medication/[A-Za-z0-9.\-]{1,64}", re.ASCII)


def unresolved_medications(resources: Iterable[dict[str, Any]], medications: dict[str, dict[str, Any]]) -> tuple[list[str], int]:
    """The Medications that ``resources`` name by ``medicationReference`` (without a ``medicationCodeableConcept``) and
    that neither ``medications`` nor their contained resources hold: the relative references (``Medication/id``, which
    can be read from a FHIR server), sorted and each once, and how many other references cannot be resolved."""
    fetchable: set[str] = set()
    other = 0
    for res in resources:
        if res.get("resourceType") not in MEDICATION_USERS or res.get("medicationCodeableConcept") is not None or "medicationReference" not in res:
            continue
        ref = res.get("medicationReference")
        if resolve_medication(ref, medications, res.get("contained")) is not None:
            continue
        target = ref.get("reference") if isinstance(ref, dict) else None
        if isinstance(target, str) and _RELATIVE_MEDICATION.fullmatch(target):
            fetchable.add(target)
        else:
            other += 1
    return sorted(fetchable), other
