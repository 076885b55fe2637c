"""Property tests: whatever arrives, the parser returns events or raises InvalidNotification."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.fhir.notifications import (
    BackportNotification,
    InvalidNotification,
    ResourceChanged,
    dedup_key,
    parse_notification,
    parse_subscription_status,
)
from tests.service.fhir.conftest import NOTIFICATIONS

SEEDS = [json.loads(p.read_text()) for p in sorted(NOTIFICATIONS.glob("*.json"))]

FIELD_NAMES = st.sampled_from(
    [
        "resourceType",
        "type",
        "entry",
        "resource",
        "fullUrl",
        "parameter",
        "name",
        "part",
        "valueString",
        "valueReference",
        "reference",
        "valueCode",
        "id",
        "meta",
        "versionId",
        "lastUpdated",
        "request",
        "method",
        "url",
    ]
)
VALUES = st.sampled_from(
    [
        "Bundle",
        "history",
        "transaction",
        "Parameters",
        "subscription",
        "type",
        "notification-event",
        "event-number",
        "focus",
        "event-notification",
        "heartbeat",
        "Observation",
        "Observation/1",
        "DELETE",
        "1",
        "-1",
        "",
    ]
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | VALUES,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(FIELD_NAMES | st.text(max_size=8), children, max_size=6),
    max_leaves=40,
)


def _check(body: bytes, **kwargs: Any) -> None:
    try:
        events = parse_notification(body, **kwargs)
    except InvalidNotification as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return
    assert isinstance(events, list)
    for event in events:
        if isinstance(event, BackportNotification):
            for ev in event.events:
                assert dedup_key(ev).endswith(f"#{ev.event_number}")
        elif isinstance(event, ResourceChanged):
            assert dedup_key(event).startswith(f"{event.resource_type}/{event.id}/")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
@example({"resourceType": "Bundle", "type": []})  # once a TypeError (unhashable bundle type)
def test_random_json_only_raises_invalid_notification(value: Any) -> None:
    _check(orjson.dumps(value))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_invalid_notification(body: bytes) -> None:
    _check(body)
    with contextlib.suppress(InvalidNotification):
        parse_subscription_status(body)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_notifications(draw: st.DrawFn) -> Any:
    """A valid example with a few nodes replaced by random JSON (or deleted)."""
    doc = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON)
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutated_notifications(),
    st.sampled_from(["POST", "PUT", "DELETE"]),
    st.sampled_from([None, "", "Observation/phos-4471", "Observation", "x/y/z", "Bundle/b1"]),
    st.sampled_from([{}, {"X-Medplum-Subscription": "s"}, {"X-Medplum-Deleted-Resource": "Patient/1"}, {"x-medplum-deleted-resource": "?"}]),
)
def test_mutated_notifications_only_raise_invalid_notification(doc: Any, method: str, path: str | None, headers: dict[str, str]) -> None:
    _check(orjson.dumps(doc), method=method, path=path, headers=headers)
    with contextlib.suppress(InvalidNotification):
        parse_subscription_status(orjson.dumps(doc))
