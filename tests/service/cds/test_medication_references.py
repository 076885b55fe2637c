"""medicationReference targets: the Medications a draftOrders Bundle carries with its orders."""

from __future__ import annotations

from typing import Any

from service.cds.orders import draft_medications

MEDICATION = {"resourceType": "Medication", "id": "med-1", "code": {"text": "a drug"}}


def request(target: str | None, **fields: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "MedicationRequest", "id": "mr", "subject": {"reference": "Patient/p1"}, **fields}
    if target is not None:
        res["medicationReference"] = {"reference": target}
    return res


def test_draft_medications_by_id_and_by_full_url() -> None:
    unnamed = {"resourceType": "Medication", "code": {"text": "no id"}}
    bundle = {
        "resourceType": "Bundle",
        "entry": [
            {"resource": request("Medication/med-1")},
            {"fullUrl": "https://ehr.example/fhir/Medication/med-1", "resource": MEDICATION},
            {"fullUrl": "urn:uuid:1", "resource": unnamed},
            {"resource": {"resourceType": "Medication"}},  # neither an id nor a fullUrl: cannot be named
            "not an entry",
        ],
    }
    assert draft_medications(bundle) == {"Medication/med-1": MEDICATION, "https://ehr.example/fhir/Medication/med-1": MEDICATION, "urn:uuid:1": unnamed}
    assert draft_medications(MEDICATION) == {} and draft_medications({"resourceType": "Bundle", "entry": "x"}) == {}
