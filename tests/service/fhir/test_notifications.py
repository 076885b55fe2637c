"""Parsing of every inbound notification form, authentication helpers and dedup keys."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from service.config import Settings
from service.fhir import notifications as n
from service.fhir.notifications import (
    BackportNotification,
    EmptyPing,
    InvalidNotification,
    NotificationEvent,
    ResourceChanged,
    ResourceDeleted,
    dedup_key,
    parse_notification,
    parse_subscription_status,
    verify_medplum_signature,
    verify_shared_secret,
)
from tests.fakes.fhir_server import FakeFhirServer
from tests.fakes.notifications import EventSpec, make_handshake, make_heartbeat, make_notification_bundle
from tests.service.fhir.conftest import NOTIFICATIONS, observation

SUB = "https://ehr.example.org/fhir/Subscription/cds-calcinosis"


def raw(name: str) -> bytes:
    return (NOTIFICATIONS / name).read_bytes()


def only(events: list[Any]) -> Any:
    assert len(events) == 1
    return events[0]


def test_example_files_are_valid_r4_resources() -> None:
    """The hand-written examples follow the IG shapes closely enough for the R4B models."""
    from fhir.resources.R4B import get_fhir_model_class

    for path in sorted(Path(NOTIFICATIONS).glob("*.json")):
        if path.name.startswith("medplum"):
            continue  # Medplum adds non-standard meta.project
        data = json.loads(path.read_text())
        get_fhir_model_class(data["resourceType"]).model_validate(data)


# --- (a) empty ping -------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"", b"  \n", ""])
def test_empty_body_is_a_ping(body: bytes | str) -> None:
    assert parse_notification(body) == [EmptyPing(None)]
    assert parse_notification(body, subscription_id="sub-9") == [EmptyPing("sub-9")]
    assert parse_notification(body, {"X-Medplum-Subscription": "mp-1"}) == [EmptyPing("mp-1")]


# --- (b) R4 rest-hook with payload ----------------------------------------------------------------
def test_hapi_put_of_a_resource() -> None:
    event = only(parse_notification(raw("r4-rest-hook-observation.json"), method="PUT", path="Observation/phos-4471"))
    assert isinstance(event, ResourceChanged)
    assert (event.resource_type, event.id, event.version_id, event.last_updated) == (
        "Observation",
        "phos-4471",
        "3",
        "2024-03-05T08:15:02.114Z",
    )
    assert event.resource["valueQuantity"]["value"] == 7.9
    assert dedup_key(event) == "Observation/phos-4471/_history/3"


def test_post_of_a_resource_and_path_mismatch() -> None:
    assert isinstance(only(parse_notification(raw("r4-rest-hook-observation.json"))), ResourceChanged)
    with pytest.raises(InvalidNotification, match="path does not match"):
        parse_notification(raw("r4-rest-hook-observation.json"), method="PUT", path="Observation/other")
    with pytest.raises(InvalidNotification, match="path is not Type/id"):
        parse_notification(raw("r4-rest-hook-observation.json"), method="PUT", path="Observation")
    no_id = json.dumps({"resourceType": "Observation", "status": "final"}).encode()
    assert only(parse_notification(no_id, method="PUT", path="/hook/Observation/from-path")).id == "from-path"
    with pytest.raises(InvalidNotification, match="no id"):
        parse_notification(no_id)


def test_hapi_delete_delivery() -> None:
    assert parse_notification(b"", method="DELETE", path="Observation/o9") == [ResourceDeleted("Observation", "o9")]
    with pytest.raises(InvalidNotification):
        parse_notification(b"", method="DELETE")


def test_plain_transaction_bundle_gives_one_event_per_entry() -> None:
    events = parse_notification(raw("r4-transaction-bundle.json"))
    assert [type(e).__name__ for e in events] == ["ResourceChanged", "ResourceChanged", "ResourceDeleted"]
    created, updated, deleted = events
    assert (created.id, created.interaction, updated.id, updated.interaction) == ("ca-1201", "create", "ckd-55", "update")
    assert dedup_key(updated) == "Condition/ckd-55/_lastUpdated/2024-03-05T08:20:01Z"
    assert deleted == ResourceDeleted("MedicationRequest", "mr-301")
    assert dedup_key(deleted) == "MedicationRequest/mr-301/_deleted"


# --- (c) Backport notifications -------------------------------------------------------------------
def test_handshake() -> None:
    note = only(parse_notification(raw("backport-handshake.json")))
    assert isinstance(note, BackportNotification)
    assert (note.type, note.status, note.events_since_start, note.events, note.content) == ("handshake", "requested", 0, (), "empty")
    assert note.subscription == SUB and note.subscription_id == "cds-calcinosis"
    assert note.topic == "https://calcinosis-cds.org/fhir/SubscriptionTopic/calcinosis-inputs"


def test_heartbeat() -> None:
    note = only(parse_notification(raw("backport-heartbeat.json")))
    assert (note.type, note.status, note.events_since_start, note.events) == ("heartbeat", "active", 41, ())


def test_event_notification_empty_content() -> None:
    note = only(parse_notification(raw("backport-event-empty.json")))
    assert (note.type, note.content, note.events_since_start) == ("event-notification", "empty", 42)
    event = only(list(note.events))
    assert event == NotificationEvent(SUB, 42, "2024-03-05T08:15:02.500Z", None)
    assert event.resource is None and event.focus_type is None
    assert dedup_key(event) == f"{SUB}#42"


def test_event_notification_id_only() -> None:
    note = only(parse_notification(raw("backport-event-id-only.json")))
    assert note.content == "id-only"
    event = only(list(note.events))
    assert event.focus_reference == "https://ehr.example.org/fhir/Observation/phos-4471"
    assert (event.focus_type, event.focus_id, event.resource) == ("Observation", "phos-4471", None)
    assert event.additional_context == ("https://ehr.example.org/fhir/Patient/pat-0193",)


def test_event_notification_full_resource() -> None:
    note = only(parse_notification(raw("backport-event-full-resource.json")))
    assert note.content == "full-resource" and note.events_since_start == 45
    first, second = note.events
    assert (first.event_number, first.focus_id, first.resource["resourceType"]) == (44, "ca-1201", "Observation")  # type: ignore[index]
    assert (second.event_number, second.focus_id, second.resource["meta"]["versionId"]) == (45, "ckd-55", "2")  # type: ignore[index]
    assert [dedup_key(e) for e in note.events] == [f"{SUB}#44", f"{SUB}#45"]


def test_query_status_and_query_event() -> None:
    status = only(parse_notification(raw("backport-query-status.json")))
    assert (status.type, status.status, status.errors, status.subscription_id) == ("query-status", "error", ("no-response",), "cds-calcinosis")
    query = only(parse_notification(raw("backport-query-event.json")))
    assert query.type == "query-event" and query.topic is None
    assert [(e.event_number, e.focus_id) for e in query.events] == [(43, "phos-4471"), (44, "ca-1201")]


@pytest.mark.parametrize("content", ["empty", "id-only", "full-resource"])
def test_builder_round_trip(content: str) -> None:
    obs = observation("o5", meta={"versionId": "2", "lastUpdated": "2024-01-01T00:00:00Z"})
    bundle = make_notification_bundle(
        subscription="s1",
        events=[EventSpec(9, focus=obs), EventSpec(10, focus="Condition/c1")],
        content=content,  # type: ignore[arg-type]
    )
    note = only(parse_notification(json.dumps(bundle)))
    assert note.content == content and [e.event_number for e in note.events] == [9, 10] and note.events_since_start == 10
    if content == "empty":
        assert all(e.focus_reference is None for e in note.events)
    else:
        assert [e.focus_id for e in note.events] == ["o5", "c1"]
    if content == "full-resource":
        assert note.events[0].resource == obs and note.events[1].resource is None
    assert only(parse_notification(json.dumps(make_handshake("s1")))).type == "handshake"
    assert only(parse_notification(json.dumps(make_heartbeat("s1", 12)))).events_since_start == 12


def test_fake_server_events_and_status_parse() -> None:
    with FakeFhirServer() as srv:
        srv.put(observation("o1"))
        srv.record_event("sub-a", "Observation/o1")
        srv.record_event("sub-a", observation("o2"))
        note = only(parse_notification(json.dumps(srv.notification_bundle("sub-a", content="full-resource"))))
        assert [e.resource["id"] for e in note.events if e.resource] == ["o1", "o2"]  # type: ignore[index]
        assert note.subscription_id == "sub-a"
        import httpx

        status = parse_subscription_status(httpx.get(f"{srv.base_url}/Subscription/sub-a/$status").content)
        assert only(status).type == "query-status" and status[0].events_since_start == 2
        events = parse_subscription_status(httpx.get(f"{srv.base_url}/Subscription/sub-a/$events?eventsSinceNumber=2").content)
        assert [e.event_number for e in only(events).events] == [2]
        assert not srv.errors


# --- (d) Medplum ----------------------------------------------------------------------------------
def test_medplum_resource_with_signature() -> None:
    body = raw("medplum-observation.json")
    secret = "medplum-shared-secret"
    headers = {
        "Content-Type": "application/fhir+json",
        "X-Medplum-Subscription": "6ee7ea6f-bc2f-4c8b-a4f6-f6c3d8e4a111",
        "X-Medplum-Interaction": "update",
        "X-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
    }
    assert verify_medplum_signature(body, headers, secret)
    assert verify_medplum_signature(body, headers, SecretStr(secret))
    event = only(parse_notification(body, headers))
    assert isinstance(event, ResourceChanged)
    assert (event.subscription_id, event.interaction, event.version_id) == (
        "6ee7ea6f-bc2f-4c8b-a4f6-f6c3d8e4a111",
        "update",
        "5b7c8d9e-0f1a-4b2c-8d3e-4f5a6b7c8d9e",
    )


def test_medplum_signature_bad_or_missing() -> None:
    body = raw("medplum-observation.json")
    good = hmac.new(b"s", body, hashlib.sha256).hexdigest()
    assert not verify_medplum_signature(body + b" ", {"X-Signature": good}, "s")  # body altered
    assert not verify_medplum_signature(body, {"X-Signature": good}, "other")  # wrong secret
    assert not verify_medplum_signature(body, {"x-signature": "zz" * 32}, "s")  # not hex
    assert not verify_medplum_signature(body, {}, "s")  # missing header
    assert not verify_medplum_signature(body, {"X-Signature": good}, None)  # no secret configured
    assert verify_medplum_signature(body, {"x-signature": good.upper()}, b"s")


def test_medplum_delete() -> None:
    headers = {"X-Medplum-Deleted-Resource": "Observation/abc", "X-Medplum-Interaction": "delete", "X-Medplum-Subscription": "s"}
    assert parse_notification(b"{}", headers) == [ResourceDeleted("Observation", "abc", "s")]
    with pytest.raises(InvalidNotification):
        parse_notification(b"{}", {"X-Medplum-Deleted-Resource": "../etc/passwd"})


# --- shared secret --------------------------------------------------------------------------------
def test_shared_secret_forms() -> None:
    settings = Settings(subscription_secret=SecretStr("hook-secret"))
    assert verify_shared_secret({"Authorization": "Bearer hook-secret"}, settings)
    assert verify_shared_secret({"authorization": "bearer  hook-secret "}, settings)
    assert verify_shared_secret({"AUTHORIZATION": "hook-secret"}, settings)
    assert not verify_shared_secret({"Authorization": "Bearer hook-secre"}, settings)
    assert not verify_shared_secret({"Authorization": "Basic hook-secret"}, settings)
    assert not verify_shared_secret({}, settings)
    custom = Settings(subscription_secret=SecretStr("x1"), subscription_header="X-Hook-Token")
    assert verify_shared_secret({"x-hook-token": "x1"}, custom)
    assert not verify_shared_secret({"Authorization": "Bearer x1"}, custom)
    assert not verify_shared_secret({"Authorization": "Bearer anything"}, Settings())  # fails closed


def test_shared_secret_uses_constant_time_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(n.hmac, "compare_digest", spy)
    settings = Settings(subscription_secret=SecretStr("hook-secret"))
    assert verify_shared_secret({"Authorization": "hook-secret"}, settings)
    assert not verify_shared_secret({"Authorization": "nope"}, settings)
    assert len(calls) == 4  # both forms are always compared, whichever matches
    assert all(b == b"hook-secret" for _, b in calls)


# --- limits and malformed input -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (raw("invalid-wrong-bundle-type.json"), "type is not history"),
        (raw("invalid-first-entry-not-parameters.json"), "first entry"),
        (raw("invalid-missing-event-number.json"), "event-number"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b'"text"', "not an object"),
        (b"{}", "resourceType"),
        (b'{"resourceType": "observation", "id": "1"}', "resourceType"),
        (b'{"resourceType": "Observation", "id": "has space"}', "valid FHIR id"),
        (b'{"resourceType": "Bundle", "type": "searchset", "entry": []}', "unsupported bundle type"),
        (b'{"resourceType": "Bundle", "type": "history", "entry": []}', "no entries"),
        (b'{"resourceType": "Bundle", "type": "history", "entry": {}}', "not an array"),
    ],
)
def test_malformed_inputs(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidNotification, match=reason) as err:
        parse_notification(body)
    assert err.value.reason == str(err.value)


def _status_bundle(**replace: Any) -> bytes:
    bundle = json.loads(raw("backport-event-id-only.json"))
    params = bundle["entry"][0]["resource"]["parameter"]
    for name, value in replace.items():
        name = name.replace("_", "-")
        params[:] = [p for p in params if p["name"] != name]
        if value is not None:
            params.append({"name": name, **value})
    return json.dumps(bundle).encode()


@pytest.mark.parametrize(
    ("replace", "reason"),
    [
        ({"subscription": None}, "no subscription"),
        ({"type": None}, "no type"),
        ({"type": {"valueCode": "something-else"}}, "unknown notification type"),
        ({"events_since_subscription_start": {"valueString": "-1"}}, "non-negative"),
        ({"events_since_subscription_start": {"valueString": "many"}}, "non-negative"),
        ({"subscription": {"valueReference": {"display": "no reference"}}}, "literal reference"),
        ({"notification_event": {"part": [{"name": "event-number", "valueString": "1"}, {"name": "focus", "valueReference": 5}]}}, "Reference"),
    ],
)
def test_malformed_status_parameters(replace: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidNotification, match=reason):
        parse_notification(_status_bundle(**replace))


def _with_event_number(value: object) -> bytes:
    bundle = json.loads(raw("backport-event-id-only.json"))
    params = bundle["entry"][0]["resource"]["parameter"]
    events = [p for p in params if p["name"] == "notification-event"]
    params[:] = [p for p in params if p["name"] != "notification-event"] + events[:1]
    events[0]["part"] = [p for p in events[0]["part"] if p["name"] != "event-number"] + [{"name": "event-number", "valueInteger64": value}]
    return json.dumps(bundle).encode()


@pytest.mark.parametrize("value", [1e19, 2**63, 10**30, "9" * 19])
def test_an_event_number_past_a_64_bit_integer_is_invalid(value: object) -> None:
    """The ledger stores event numbers as BIGINT: a larger one is a permanent error (400), not a database failure."""
    with pytest.raises(InvalidNotification, match="non-negative 64-bit integer"):
        parse_notification(_with_event_number(value))


@pytest.mark.parametrize("value", [2**63 - 1, 9.0e18, "999999999999999999"])
def test_an_event_number_within_a_64_bit_integer_is_accepted(value: object) -> None:
    (notification,) = parse_notification(_with_event_number(value))
    assert notification.events[0].event_number == int(value)


@pytest.mark.parametrize(
    ("replace", "reason"),
    [
        ({"subscription": {"valueReference": {"reference": SUB + "x" * (n.MAX_SUBSCRIPTION_REFERENCE - len(SUB) + 1)}}}, "subscription reference"),
        ({"topic": {"valueCanonical": "https://ehr.example.org/topic/" + "t" * 500}}, "topic is over 512"),
        ({"status": {"valueCode": "a" * 33}}, "status is over 32"),
    ],
    ids=["subscription", "topic", "status"],
)
def test_references_and_codes_longer_than_their_columns_are_invalid(replace: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidNotification, match=reason):
        parse_notification(_status_bundle(**replace))


def test_the_longest_subscription_reference_still_fits_every_ledger_key() -> None:
    from service.db.models import DEDUP_KEY_LEN, SUBSCRIPTION_LEN

    longest = SUB + "x" * (n.MAX_SUBSCRIPTION_REFERENCE - len(SUB))
    (notification,) = parse_notification(_status_bundle(subscription={"valueReference": {"reference": longest}}))
    assert notification.subscription == longest
    assert len(longest) <= SUBSCRIPTION_LEN
    assert len(f"{longest}#gap#{n.MAX_EVENT_NUMBER}-{n.MAX_EVENT_NUMBER}") <= DEDUP_KEY_LEN


@pytest.mark.parametrize(
    "body",
    [
        observation("o1") | {"note": [{"text": "a\u0000b"}]},
        observation("o1") | {"extension": [{"url": "x", "valueString": "\u0000"}]},
        observation("o1") | {"a\u0000": 1},
        json.loads(raw("backport-event-full-resource.json")) | {"id": "b\u0000"},
    ],
    ids=["resource", "nested", "member name", "backport"],
)
def test_a_nul_character_anywhere_is_invalid(body: dict[str, Any]) -> None:
    """FHIR strings may not contain U+0000 (PostgreSQL's JSONB cannot store it): refused, never retried."""
    with pytest.raises(InvalidNotification, match="U\\+0000"):
        parse_notification(json.dumps(body).encode())


def test_an_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    body = json.dumps(observation("o1") | {"note": [{"text": "C:\\u0000"}]}).encode()
    assert b"\\\\u0000" in body
    (changed,) = parse_notification(body)
    assert changed.resource["note"][0]["text"] == "C:\\u0000"


def test_a_backport_entry_with_an_invalid_id_is_invalid() -> None:
    bundle = json.loads(raw("backport-event-full-resource.json"))
    entry = bundle["entry"][1]
    entry["resource"]["id"] = "x" * 65
    entry.pop("fullUrl", None)
    with pytest.raises(InvalidNotification, match="entry resource id"):
        parse_notification(json.dumps(bundle).encode())


def test_reasons_never_quote_payload() -> None:
    secret_value = "PATIENT-NAME-JANE-DOE"
    bodies = [
        json.dumps({"resourceType": "Observation", "id": secret_value + " x"}),
        json.dumps({"resourceType": secret_value}),
        _status_bundle(type={"valueCode": secret_value}).decode(),
        "{" + secret_value,
    ]
    for body in bodies:
        with pytest.raises(InvalidNotification) as err:
            parse_notification(body)
        assert secret_value not in str(err.value)


def test_dedup_key_without_version_or_timestamp_hashes_canonical_json() -> None:
    a = only(parse_notification(b'{"resourceType":"Patient","id":"p","active":true,"gender":"female"}'))
    b = only(parse_notification(b'{"gender":"female","id":"p","resourceType":"Patient","active":true}'))
    c = only(parse_notification(b'{"resourceType":"Patient","id":"p","active":false}'))
    assert dedup_key(a) == dedup_key(b) != dedup_key(c)
    assert dedup_key(a).startswith("Patient/p/_sha256/")
    with pytest.raises(TypeError):
        dedup_key(EmptyPing())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reference", "key"),
    [
        ("Subscription/s1", "Subscription/s1"),
        ("https://fhir.example.org/r4/Subscription/s1", "Subscription/s1"),
        ("HTTPS://FHIR.example.org/r4/Subscription/s1/_history/3", "Subscription/s1"),
        ("https://fhir.example.org/r4x/Subscription/s1", "https://fhir.example.org/r4x/Subscription/s1"),  # another server
        ("https://other.example.org/r4/Subscription/s1", "https://other.example.org/r4/Subscription/s1"),
        ("topic-sub", "topic-sub"),
    ],
)
def test_subscription_key_is_relative_under_the_configured_server(reference: str, key: str) -> None:
    from service.fhir.notifications import subscription_key

    assert subscription_key(reference, "https://fhir.example.org/r4/") == key
