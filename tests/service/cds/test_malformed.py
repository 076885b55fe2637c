"""A resource with an element of a type FHIR does not allow is left out with a reason, and the rest of the record is
still evaluated: never an exception out of the core (it was a 500 for the hook call, a traceback from the CLI, and
a patient whose monitoring failed on every evaluation). From the fuzzing review."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.cds.engine import Evaluation
from service.cds.fhirutil import parse_datetime
from service.cds.grouping import group_by_patient
from tests import builders as b

ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.text(max_size=4), max_size=2),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
)


def record() -> list[dict[str, Any]]:
    """A high-risk dialysis patient with one resource of every kind the core reads."""
    order = b.med_request("11289", route_text="oral")
    order["contained"] = [{"resourceType": "Medication", "id": "m1", "code": {"text": "x"}}]
    return [
        b.esrd(),
        *b.renal_panel(ca=10.8, p=6.2, alb=2.8, pth=700),
        order,
        b.med_admin("1908", days=2),
        b.med_statement("1897", status="active"),
        b.procedure("302497006"),
        b.patient(),
    ]


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every element path of a resource (dict keys and list indexes)."""
    found: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        found.append((*prefix, key))
        found.extend(paths(child, (*prefix, key)))
    return found


def replaced(resource: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_in_any_element_never_raises(run: Callable[..., Evaluation], data: st.DataObject) -> None:
    resources = record()
    index = data.draw(st.integers(min_value=0, max_value=len(resources) - 2), label="resource")  # not the Patient
    target = resources[index]
    path = data.draw(st.sampled_from([p for p in paths(target) if p[0] not in ("id", "subject")]), label="path")
    resources[index] = replaced(target, path, data.draw(ODD_VALUES, label="value"))

    ev = run(*resources, with_patient=False)

    assert ev.assessment.renal_context == "R2"  # the rest of the record still counts
    assert ev.assessment.calciphylaxis.tier in ("low", "moderate", "high")


def test_a_list_where_a_code_system_belongs_excludes_only_that_resource(run: Callable[..., Evaluation]) -> None:
    bad = b.condition("44054006", rid="c-bad")
    bad["code"]["coding"][0]["system"] = [b.SNOMED]
    bad_status = b.med_request("11289")
    bad_status["status"] = ["active"]
    ev = run(b.esrd(), *b.renal_panel(), bad, bad_status)
    assert ev.assessment.renal_context == "R2"
    reasons = {e.reference: e.reason for e in ev.assessment.excluded}
    assert reasons[f"MedicationRequest/{bad_status['id']}"] == "malformed resource (TypeError)"


def test_a_resource_type_that_is_not_a_string_is_ignored_when_grouping() -> None:
    groups = group_by_patient([b.bundle({"resourceType": ["Observation"], "id": "x"}, b.esrd())])
    assert list(groups.patients) == ["Patient/p1"]
    assert [e.reason for e in groups.unattributed] == ["not a FHIR resource (no resourceType)"]


def test_year_one_and_year_9999_with_an_offset_are_not_instants_we_can_use() -> None:
    assert parse_datetime("0001-01-01T00:00:00+01:00") is None
    assert parse_datetime("9999-12-31T23:59:59-10:00") is None


def test_a_leap_second_is_read_as_the_second_before_it() -> None:
    assert parse_datetime("2025-06-28T23:59:60Z") == parse_datetime("2025-06-28T23:59:59Z")


def test_an_observation_at_the_edge_of_time_is_excluded_not_fatal(run: Callable[..., Evaluation]) -> None:
    edge = b.obs(b.CA, 9.0, when="0001-01-01T00:00:00+01:00")
    ev = run(b.esrd(), *b.renal_panel(), edge)
    assert ev.assessment.renal_context == "R2"
    assert any(e.reference == f"Observation/{edge['id']}" for e in ev.assessment.excluded)


def test_a_version_id_of_unicode_digits_is_not_compared_as_a_number() -> None:
    """Two copies of one resource in a request: "²" is a digit to str.isdigit but not to int()."""
    first, second, third = b.obs(b.P, 6.0, rid="o-p"), b.obs(b.P, 4.0, rid="o-p"), b.obs(b.P, 5.0, rid="o-p")
    first["meta"] = {"versionId": "²", "lastUpdated": "2025-06-01T00:00:00Z"}
    second["meta"] = {"versionId": "1", "lastUpdated": "2025-06-02T00:00:00Z"}
    third["meta"] = {"versionId": "1" * 5000, "lastUpdated": "2025-06-03T00:00:00Z"}
    groups = group_by_patient([b.bundle(first, second, third)])
    (kept,) = groups.patients["Patient/p1"]
    assert kept["valueQuantity"]["value"] == 5.0  # the newest by lastUpdated


def test_zero_and_negative_results_are_excluded(run: Callable[..., Evaluation]) -> None:
    negative, zero = b.obs(b.P, -7.5, days=1), b.obs(b.CA, 0, days=1)
    ev = run(b.esrd(), *b.renal_panel(days=5), negative, zero)
    reasons = {e.reference: e.reason for e in ev.assessment.excluded}
    assert reasons[f"Observation/{negative['id']}"] == "valueQuantity.value is not positive"
    assert reasons[f"Observation/{zero['id']}"] == "valueQuantity.value is not positive"
    assert ev.assessment.metastatic_calcification.ca_x_p is not None
    assert ev.assessment.metastatic_calcification.ca_x_p.value > 0  # from the valid panel
