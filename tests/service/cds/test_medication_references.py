"""medicationReference targets the request does not hold: which a FHIR server can be asked for (a relative
``Medication/id`` only, so nothing but a Medication read is ever built from a reference), and the Medications a
draftOrders Bundle carries with its orders."""

from __future__ import annotations

from typing import Any

import pytest

from service.cds.grouping import unresolved_medications
from service.cds.orders import draft_medications

MEDICATION = {"resourceType": "Medication", "id": "med-1", "code": {"text": "a drug"}}


def request(target: str | None, **fields: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "MedicationRequest", "id": "mr", "subject": {"reference": "Patient/p1"}, **fields}
    if target is not None:
        res["medicationReference"] = {"reference": target}
    return res


@pytest.mark.parametrize(
    ("target", "fetchable"),
    [
        pytest.param("Medication/med-9", True, id="relative"),
        pytest.param("Medication/A.b-9", True, id="relative-every-id-character"),
        pytest.param("https://ehr.example/fhir/Medication/med-9", False, id="absolute"),
        pytest.param("Medication/med-9/_history/2", False, id="versioned"),
        pytest.param("Medication/../Patient/p1", False, id="path-traversal"),
        pytest.param("Medication/med-9?_format=xml", False, id="query"),
        pytest.param("Medication/" + "x" * 65, False, id="id-too-long"),
        pytest.param("urn:uuid:5f0c1d7e-2a4b-4c6d-8e9f-0a1b2c3d4e5f", False, id="full-url-not-in-the-request"),
        pytest.param("#missing", False, id="contained-missing"),
        pytest.param("Substance/s1", False, id="not-a-medication"),
    ],
)
def test_only_a_relative_medication_reference_can_be_fetched(target: str, fetchable: bool) -> None:
    assert unresolved_medications([request(target)], {}) == (([target], 0) if fetchable else ([], 1))


def test_references_the_request_resolves_or_that_do_not_matter_are_not_wanted() -> None:
    resources = [
        request("Medication/med-1"),  # in the request
        request("#c1", contained=[{**MEDICATION, "id": "c1"}]),
        request("Medication/med-2", medicationCodeableConcept={"text": "coded too"}),  # the code is read, not the reference
        request(None),
        {"resourceType": "Observation", "id": "o1", "medicationReference": {"reference": "Medication/med-3"}},
        request("Medication/med-4"),
        {**request("Medication/med-4"), "resourceType": "MedicationStatement"},
        {**request("Medication/med-5"), "resourceType": "MedicationAdministration"},
    ]
    assert unresolved_medications(resources, {"Medication/med-1": MEDICATION}) == (["Medication/med-4", "Medication/med-5"], 0)


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
