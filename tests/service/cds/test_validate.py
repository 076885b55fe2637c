"""Structural validation: the elements the rules read, verdicts cached by content."""

from __future__ import annotations

from service.cds import validate
from tests.builders import CA, obs, patient


def test_verdict_cached_by_content(monkeypatch) -> None:
    validate.clear_verdicts()
    calls: list[str] = []
    real = validate._validate
    monkeypatch.setattr(validate, "_validate", lambda rtype, used: calls.append(rtype) or real(rtype, used))
    good = obs(CA, 9.0, rid="same")
    assert validate.validation_error(good) is None
    assert validate.validation_error(dict(good)) is None  # same content: served from the cache
    bad = obs(CA, 9.0, rid="same")
    bad["subject"] = {"reference": "Patient/p1", "display": ["x"]}
    assert validate.validation_error(bad) == "invalid FHIR Observation (subject.display)"  # other content: validated
    assert validate.validation_error(bad) == "invalid FHIR Observation (subject.display)"
    assert calls == ["Observation", "Observation"]


def test_narrative_and_unused_patient_elements_are_not_validated() -> None:
    p = patient()
    p["text"] = {"status": "generated", "div": "not xhtml"}
    p["name"] = "not a list of HumanName"
    assert validate.validation_error(p) is None
    p["birthDate"] = "not a date"
    assert validate.validation_error(p) == "invalid FHIR Patient (birthDate)"


def test_unknown_types_are_not_validated() -> None:
    assert validate.validation_error({"resourceType": "Claim", "nonsense": 1}) is None


def test_only_read_and_required_elements_are_validated() -> None:
    o = obs(CA, 9.0, rid="trimmed")
    o["performer"] = "not a list of references"
    o["note"] = {"text": ["not a string"]}
    o["extension"] = 42
    assert validate.validation_error(o) is None  # never read: cannot make a value wrong
    o["valueQuantity"] = {"value": "nine"}
    assert validate.validation_error(o) == "invalid FHIR Observation (valueQuantity.value)"
    del o["valueQuantity"]
    del o["status"]  # required by FHIR R4
    assert validate.validation_error(o).startswith("invalid FHIR Observation (")


def test_warm_up_examples_are_valid_and_not_cached() -> None:
    validate.clear_verdicts()
    for resource in validate._WARM_UP:
        assert validate._validate(resource["resourceType"], resource) is None  # a failing example would warn nobody
    validate.warm_up()
    assert len(validate._VERDICTS._data) == 0
