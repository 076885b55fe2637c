"""References: the memo a caller keeps for subject references answers exactly what the plain lookup answers."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from service.cds.fhirutil import subject_reference

_REFERENCES = st.one_of(
    st.sampled_from(
        [
            "Patient/p1",
            "Patient/p2",
            "urn:uuid:1234",
            "urn:uuid:5678",
            "https://ehr.example/fhir/Patient/p3/_history/2",
            "Group/g1",
            "Practitioner/x",
            "#contained",
            "",
        ]
    ),
    st.text(max_size=20),
)
_SUBJECT = st.one_of(st.none(), st.integers(), st.builds(lambda r: {"reference": r}, _REFERENCES), st.just({"display": "no reference"}))


@given(
    resources=st.lists(
        st.fixed_dictionaries({}, optional={"subject": _SUBJECT, "patient": _SUBJECT}),
        max_size=12,
    ),
    aliases=st.sampled_from([{}, {"urn:uuid:1234": "Patient/p9", "urn:uuid:5678": "Medication/m1"}]),
)
def test_memoised_subject_references_match_the_plain_lookup(resources: list[dict[str, Any]], aliases: dict[str, str]) -> None:
    memo: dict[str, str | None] = {}
    for resource in resources:
        assert subject_reference(resource, aliases, memo) == subject_reference(resource, aliases)


def test_a_non_patient_subject_falls_through_to_patient_with_the_memo() -> None:
    memo: dict[str, str | None] = {}
    resource = {"subject": {"reference": "Group/g1"}, "patient": {"reference": "Patient/p1"}}
    assert subject_reference(resource, None, memo) == "Patient/p1"
    assert subject_reference(resource, None, memo) == "Patient/p1"  # answered from the memo the second time
    assert memo == {"Group/g1": None, "Patient/p1": "Patient/p1"}
