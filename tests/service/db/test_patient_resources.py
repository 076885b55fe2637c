"""Per-patient resource state: only a newer version is ever stored, deletions are guarded the same way."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker

from service.db.repositories import PatientResourceRepository, ResourceVersion, version_number
from service.db.session import session_scope

PATIENT = "Patient/p1"
FIXTURE_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _obs(rid: str, version: str | None) -> dict[str, object]:
    return {"resourceType": "Observation", "id": rid, "meta": {"versionId": version}, "valueQuantity": {"value": version}}


def _upsert(factory: sessionmaker[Session], rid: str, version: str | None, last_updated: datetime | None = None) -> bool:
    with session_scope(factory) as session:
        return PatientResourceRepository(session).upsert(
            resource_type="Observation",
            resource_id=rid,
            patient_ref=PATIENT,
            content=_obs(rid, version),
            version_id=version,
            last_updated=last_updated,
        )


def _stored(factory: sessionmaker[Session], rid: str) -> tuple[str | None, bool, dict[str, object] | None]:
    with session_scope(factory) as session:
        row = PatientResourceRepository(session).get("Observation", rid)
        assert row is not None
        return row.version_id, row.deleted, row.content


def test_version_number() -> None:
    assert version_number("12") == 12
    assert version_number(" 7 ") == 7
    assert version_number('W/"3"') is None
    assert version_number("abc") is None
    assert version_number("٣") is None  # non-ASCII digits are not versions
    assert version_number(str(2**63)) is None
    assert version_number(None) is None


@FIXTURE_SETTINGS
@given(order=st.integers(min_value=1, max_value=12).flatmap(lambda n: st.permutations(list(range(1, n + 1)))))
def test_out_of_order_numeric_versions_keep_the_highest(db_session_factory: sessionmaker[Session], order: list[int]) -> None:
    rid = uuid.uuid4().hex
    highest = 0
    for version in order:
        changed = _upsert(db_session_factory, rid, str(version))
        assert changed == (version > highest)
        highest = max(highest, version)
    version_id, deleted, content = _stored(db_session_factory, rid)
    assert version_id == str(len(order))
    assert not deleted
    assert content == _obs(rid, str(len(order)))


@FIXTURE_SETTINGS
@given(order=st.integers(min_value=1, max_value=8).flatmap(lambda n: st.permutations(list(range(n)))))
def test_opaque_versions_are_ordered_by_last_updated(
    db_session_factory: sessionmaker[Session], order: list[int], t0: datetime
) -> None:
    rid = uuid.uuid4().hex
    for i in order:
        _upsert(db_session_factory, rid, f"v-{i}", last_updated=t0 + timedelta(seconds=i))
    assert _stored(db_session_factory, rid)[0] == f"v-{len(order) - 1}"


def test_numeric_versions_win_over_last_updated(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    assert _upsert(db_session_factory, "o", "5", last_updated=t0)
    assert not _upsert(db_session_factory, "o", "4", last_updated=t0 + timedelta(hours=1))
    assert _upsert(db_session_factory, "o", "6", last_updated=t0 - timedelta(hours=1))
    assert _stored(db_session_factory, "o")[0] == "6"


def test_same_version_again_is_not_a_change(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    assert _upsert(db_session_factory, "o", "2", last_updated=t0)
    assert not _upsert(db_session_factory, "o", "2", last_updated=t0)
    assert _upsert(db_session_factory, "x", "etag-a")
    assert not _upsert(db_session_factory, "x", "etag-a")
    assert _upsert(db_session_factory, "x", "etag-b")  # opaque and undated: a different version is taken


def test_unversioned_resources_are_last_arrival_wins(db_session_factory: sessionmaker[Session]) -> None:
    assert _upsert(db_session_factory, "u", None)
    assert _upsert(db_session_factory, "u", None)


def test_deletion_is_guarded_by_version(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    _upsert(db_session_factory, "d", "3", last_updated=t0)
    with session_scope(db_session_factory) as session:
        repo = PatientResourceRepository(session)
        assert not repo.mark_deleted(resource_type="Observation", resource_id="d", version_id="2")  # older
        assert repo.mark_deleted(resource_type="Observation", resource_id="d", version_id="4")
        assert not repo.mark_deleted(resource_type="Observation", resource_id="d", version_id="4")  # repeated
    assert _stored(db_session_factory, "d") == ("4", True, None)
    assert not _upsert(db_session_factory, "d", "3")  # a late older version does not revive it
    assert _upsert(db_session_factory, "d", "5")  # re-created with a newer version
    assert _stored(db_session_factory, "d")[:2] == ("5", False)


def test_deleting_the_current_version_applies(db_session_factory: sessionmaker[Session]) -> None:
    _upsert(db_session_factory, "same", "3")
    with session_scope(db_session_factory) as session:
        assert PatientResourceRepository(session).mark_deleted(resource_type="Observation", resource_id="same", version_id="3")
    assert _stored(db_session_factory, "same")[1] is True


def test_unversioned_deletion_keeps_the_version_guard(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    _upsert(db_session_factory, "nv", "7", last_updated=t0)
    with session_scope(db_session_factory) as session:
        repo = PatientResourceRepository(session)
        assert repo.mark_deleted(resource_type="Observation", resource_id="nv")
        assert not repo.mark_deleted(resource_type="Observation", resource_id="nv")
        row = repo.get("Observation", "nv")
        assert row is not None
        assert (row.version_id, row.deleted, row.content, row.patient_ref) == ("7", True, None, PATIENT)
    assert not _upsert(db_session_factory, "nv", "6")
    assert _upsert(db_session_factory, "nv", "8")


def _delete_exact(factory: sessionmaker[Session], rid: str, version: str | None, deleted_by: datetime) -> bool:
    with session_scope(factory) as session:
        return PatientResourceRepository(session).mark_deleted(
            resource_type="Observation", resource_id=rid, version_id=version, last_updated=deleted_by, exact=True
        )


def test_an_exact_tombstone_at_the_deleted_version_refuses_versions_made_before_the_deletion(
    db_session_factory: sessionmaker[Session], t0: datetime
) -> None:
    """v1 stored, v2 made, deleted as v3 (the server's history): a late v2 stays out, a re-created v4 gets in."""
    _upsert(db_session_factory, "x", "1", last_updated=t0)
    with session_scope(db_session_factory) as session:
        assert PatientResourceRepository(session).mark_deleted(resource_type="Observation", resource_id="x")  # on receipt
    assert _delete_exact(db_session_factory, "x", "3", t0 + timedelta(minutes=5))
    assert not _delete_exact(db_session_factory, "x", "3", t0 + timedelta(minutes=5))  # repeated
    assert _stored(db_session_factory, "x") == ("3", True, None)
    assert not _upsert(db_session_factory, "x", "2", last_updated=t0 + timedelta(minutes=1))
    assert _upsert(db_session_factory, "x", "4", last_updated=t0 + timedelta(minutes=9))
    assert not _delete_exact(db_session_factory, "x", "3", t0 + timedelta(minutes=5))  # older than the re-creation
    assert _stored(db_session_factory, "x")[:2] == ("4", False)


def test_an_exact_tombstone_without_a_version_is_bounded_by_its_instant(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    """The deleted version unknown, only that the deletion happened no later than an instant: a version updated before
    it stays out whatever its versionId; one updated after it (a re-creation) gets in."""
    _upsert(db_session_factory, "y", "1", last_updated=t0)
    assert _delete_exact(db_session_factory, "y", None, t0 + timedelta(minutes=5))
    assert _stored(db_session_factory, "y") == (None, True, None)
    assert not _upsert(db_session_factory, "y", "2", last_updated=t0 + timedelta(minutes=1))
    assert _upsert(db_session_factory, "y", "4", last_updated=t0 + timedelta(minutes=6))
    assert _stored(db_session_factory, "y")[:2] == ("4", False)


def test_a_current_version_replaces_a_tombstone_of_its_own_version(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    """What the server answered to a read (``current``) undoes a deletion it does not confirm; never a newer tombstone."""
    _upsert(db_session_factory, "z", "1", last_updated=t0)
    version = ResourceVersion("Observation", "z", PATIENT, _obs("z", "1"), "1", t0)
    with session_scope(db_session_factory) as session:
        repo = PatientResourceRepository(session)
        assert repo.mark_deleted(resource_type="Observation", resource_id="z")  # keeps v1
        assert repo.upsert_many_tracked([version]) == [(False, None)]  # an ordinary delivery of v1 does not revive it
        assert repo.upsert_many_tracked([version], current=True) == [(True, None)]
        assert repo.upsert_many_tracked([version], current=True) == [(False, None)]  # live: only a newer version
    assert _stored(db_session_factory, "z")[:2] == ("1", False)
    assert _delete_exact(db_session_factory, "z", "2", t0 + timedelta(minutes=1))
    with session_scope(db_session_factory) as session:
        assert PatientResourceRepository(session).upsert_many_tracked([version], current=True) == [(False, None)]
    assert _stored(db_session_factory, "z")[:2] == ("2", True)


def test_deleting_an_unknown_resource_leaves_a_guarding_tombstone(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        assert PatientResourceRepository(session).mark_deleted(resource_type="Observation", resource_id="ghost", version_id="9")
    assert not _upsert(db_session_factory, "ghost", "8")
    assert _stored(db_session_factory, "ghost") == ("9", True, None)


def test_list_for_patient(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        repo = PatientResourceRepository(session)
        repo.upsert(resource_type="Observation", resource_id="b", patient_ref=PATIENT, content={"id": "b"}, version_id="1")
        repo.upsert(resource_type="Observation", resource_id="a", patient_ref=PATIENT, content={"id": "a"}, version_id="1")
        repo.upsert(resource_type="Condition", resource_id="c", patient_ref=PATIENT, content={"id": "c"}, version_id="1")
        repo.upsert(resource_type="Condition", resource_id="z", patient_ref="Patient/other", content={}, version_id="1")
        repo.mark_deleted(resource_type="Observation", resource_id="b", version_id="2")
    with session_scope(db_session_factory) as session:
        repo = PatientResourceRepository(session)
        assert [(r.resource_type, r.resource_id) for r in repo.list_for_patient(PATIENT)] == [
            ("Condition", "c"),
            ("Observation", "a"),
        ]
        assert [r.resource_id for r in repo.list_for_patient(PATIENT, resource_types=["Observation"], include_deleted=True)] == [
            "a",
            "b",
        ]
        assert repo.patients() == ["Patient/other", PATIENT]
        assert repo.get("Observation", "nope") is None


@pytest.mark.parametrize("content", [{"nested": {"list": [1, 2.5, "x", None, True]}}, {}])
def test_content_round_trips(db_session_factory: sessionmaker[Session], content: dict[str, object]) -> None:
    with session_scope(db_session_factory) as session:
        PatientResourceRepository(session).upsert(
            resource_type="Patient", resource_id="p1", patient_ref=PATIENT, content=content, version_id="1"
        )
    with session_scope(db_session_factory) as session:
        row = PatientResourceRepository(session).get("Patient", "p1")
        assert row is not None and row.content == content
