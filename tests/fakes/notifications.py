"""Builders of Subscriptions R5 Backport IG notification Bundles (R4 form) for tests.

Shapes follow the IG (STU 1.1): a ``history`` Bundle whose first entry is a ``Parameters``
resource claiming the *backport-subscription-status-r4* profile, with ``request`` filled in as a
``GET .../Subscription/{id}/$status`` and ``response.status = 200`` (the IG fills ``request`` /
``response`` to satisfy the history-Bundle invariants bdl-3 / bdl-4). Event parameters use
``valueString`` for ``event-number`` and ``events-since-subscription-start``, as the R4 profile
does. Payload content:

* ``empty`` - events carry ``event-number`` and ``timestamp`` only; no further entries.
* ``id-only`` - events carry ``focus``; one entry per focus with ``fullUrl`` and
  ``request``/``response`` but no ``resource``.
* ``full-resource`` - as id-only, plus the ``resource`` in each entry.

Example::

    bundle = make_notification_bundle(
        subscription="cds-labs",
        events=[EventSpec(7, focus=observation_dict)],
        events_since_start=7,
        content="full-resource",
    )
    httpx.post(receiver_url, json=bundle)
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

BACKPORT_STATUS_PROFILE = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"
BACKPORT_NOTIFICATION_PROFILE = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification-r4"
DEFAULT_BASE_URL = "https://ehr.example.org/fhir"
DEFAULT_TOPIC = "https://calcinosis-cds.org/fhir/SubscriptionTopic/calcinosis-inputs"

Content = Literal["empty", "id-only", "full-resource"]
NotificationType = Literal["handshake", "heartbeat", "event-notification", "query-status", "query-event"]


@dataclass(frozen=True)
class EventSpec:
    """One notification event. ``focus`` is a resource (dict) or a reference string
    (``"Observation/1"`` or absolute); ``interaction`` sets the entry request method."""

    number: int
    focus: Mapping[str, Any] | str | None = None
    timestamp: str | None = None
    additional_context: Sequence[str] = field(default_factory=tuple)
    interaction: Literal["create", "update", "delete"] = "update"


def now_instant() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def subscription_reference(subscription: str, base_url: str = DEFAULT_BASE_URL) -> str:
    """``abc`` → ``{base}/Subscription/abc``; references are returned unchanged."""
    if "/" in subscription:
        return subscription
    return f"{base_url.rstrip('/')}/Subscription/{subscription}"


def _focus_reference(focus: Mapping[str, Any] | str, base_url: str) -> str:
    if isinstance(focus, str):
        return focus if "://" in focus else f"{base_url.rstrip('/')}/{focus}"
    return f"{base_url.rstrip('/')}/{focus['resourceType']}/{focus['id']}"


def _as_spec(event: EventSpec | int | Mapping[str, Any]) -> EventSpec:
    if isinstance(event, EventSpec):
        return event
    if isinstance(event, int):
        return EventSpec(event)
    return EventSpec(**dict(event))


def make_status_parameters(
    *,
    subscription: str,
    type: NotificationType = "event-notification",
    status: str = "active",
    topic: str | None = DEFAULT_TOPIC,
    events_since_start: int | None = None,
    events: Sequence[EventSpec | int | Mapping[str, Any]] = (),
    content: Content = "id-only",
    base_url: str = DEFAULT_BASE_URL,
    errors: Sequence[str] = (),
    status_id: str | None = None,
) -> dict[str, Any]:
    """The ``Parameters`` SubscriptionStatus (backport-subscription-status-r4)."""
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": subscription_reference(subscription, base_url)}},
    ]
    if topic is not None:
        params.append({"name": "topic", "valueCanonical": topic})
    params.append({"name": "status", "valueCode": status})
    params.append({"name": "type", "valueCode": type})
    if events_since_start is not None:
        params.append({"name": "events-since-subscription-start", "valueString": str(events_since_start)})
    for raw in events:
        ev = _as_spec(raw)
        parts: list[dict[str, Any]] = [
            {"name": "event-number", "valueString": str(ev.number)},
            {"name": "timestamp", "valueInstant": ev.timestamp or now_instant()},
        ]
        if content != "empty" and ev.focus is not None:
            parts.append({"name": "focus", "valueReference": {"reference": _focus_reference(ev.focus, base_url)}})
            parts.extend({"name": "additional-context", "valueReference": {"reference": ctx}} for ctx in ev.additional_context)
        params.append({"name": "notification-event", "part": parts})
    for code in errors:
        params.append(
            {
                "name": "error",
                "valueCodeableConcept": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/subscription-error", "code": code}]},
            }
        )
    return {
        "resourceType": "Parameters",
        "id": status_id or str(uuid.uuid4()),
        "meta": {"profile": [BACKPORT_STATUS_PROFILE]},
        "parameter": params,
    }


def make_notification_bundle(
    *,
    subscription: str,
    type: NotificationType = "event-notification",
    status: str = "active",
    topic: str | None = DEFAULT_TOPIC,
    events: Sequence[EventSpec | int | Mapping[str, Any]] = (),
    events_since_start: int | None = None,
    content: Content = "id-only",
    base_url: str = DEFAULT_BASE_URL,
    errors: Sequence[str] = (),
    bundle_id: str | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """A complete Backport notification Bundle (``history``); see the module docstring.

    ``events_since_start`` defaults to the highest event number (or 0 with no events).
    """
    specs = [_as_spec(e) for e in events]
    if events_since_start is None:
        events_since_start = max((e.number for e in specs), default=0)
    status_params = make_status_parameters(
        subscription=subscription,
        type=type,
        status=status,
        topic=topic,
        events_since_start=events_since_start,
        events=specs,
        content=content,
        base_url=base_url,
        errors=errors,
    )
    sub_ref = subscription_reference(subscription, base_url)
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"urn:uuid:{status_params['id']}",
            "resource": status_params,
            "request": {"method": "GET", "url": f"{sub_ref}/$status"},
            "response": {"status": "200"},
        }
    ]
    if content != "empty":
        seen: set[str] = set()
        for ev in specs:
            if ev.focus is None:
                continue
            full_url = _focus_reference(ev.focus, base_url)
            if full_url in seen:
                continue
            seen.add(full_url)
            relative = full_url.removeprefix(base_url.rstrip("/") + "/")
            method, code = {"create": ("POST", "201"), "update": ("PUT", "200"), "delete": ("DELETE", "204")}[ev.interaction]
            entry: dict[str, Any] = {
                "fullUrl": full_url,
                "request": {"method": method, "url": relative.split("/")[0] if method == "POST" else relative},
                "response": {"status": code},
            }
            if content == "full-resource" and isinstance(ev.focus, Mapping) and ev.interaction != "delete":
                entry["resource"] = dict(ev.focus)
            entries.append(entry)
    return {
        "resourceType": "Bundle",
        "id": bundle_id or str(uuid.uuid4()),
        "meta": {"profile": [BACKPORT_NOTIFICATION_PROFILE]},
        "type": "history",
        "timestamp": timestamp or now_instant(),
        "entry": entries,
    }


def make_handshake(subscription: str, **kwargs: Any) -> dict[str, Any]:
    """The handshake sent when a rest-hook Subscription is activated (no events)."""
    kwargs.setdefault("status", "requested")
    return make_notification_bundle(subscription=subscription, type="handshake", events=(), events_since_start=0, **kwargs)


def make_heartbeat(subscription: str, events_since_start: int = 0, **kwargs: Any) -> dict[str, Any]:
    """A heartbeat: no events, but ``events-since-subscription-start`` lets the receiver detect gaps."""
    return make_notification_bundle(subscription=subscription, type="heartbeat", events=(), events_since_start=events_since_start, **kwargs)


def make_status_bundle(statuses: Sequence[Mapping[str, Any]], *, base_url: str = DEFAULT_BASE_URL) -> dict[str, Any]:
    """The ``$status`` response: a searchset Bundle of status Parameters."""
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "searchset",
        "total": len(statuses),
        "entry": [{"fullUrl": f"urn:uuid:{p.get('id', uuid.uuid4())}", "resource": dict(p), "search": {"mode": "match"}} for p in statuses],
        "link": [{"relation": "self", "url": f"{base_url.rstrip('/')}/Subscription/$status"}],
    }
