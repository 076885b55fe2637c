"""Parsing of inbound subscription notifications into typed events (pure: no I/O, no clock).

Forms understood (``parse_notification``):

(a) **R4 rest-hook, no payload** (``Subscription.channel.payload`` absent): the server POSTs an
    empty body - a ping meaning "something matching your criteria changed; go and look".
    → :class:`EmptyPing`.
(b) **R4 rest-hook with payload** (``payload = application/fhir+json``): HAPI FHIR sends
    ``PUT {endpoint}/{type}/{id}`` with the resource as body; other servers POST the resource.
    → :class:`ResourceChanged`. A plain ``transaction`` / ``batch`` / ``collection`` Bundle of
    resources gives one event per entry (``DELETE`` entries → :class:`ResourceDeleted`). HAPI's
    optional delete delivery (``DELETE {endpoint}/{type}/{id}``) → :class:`ResourceDeleted`.
(c) **Subscriptions R5 Backport IG, R4 form**: a Bundle of type ``history`` whose first entry is
    a ``Parameters`` resource conforming to *backport-subscription-status-r4* (parameters
    ``subscription``, ``topic``, ``status``, ``type``, ``events-since-subscription-start``,
    ``notification-event`` with parts ``event-number``, ``timestamp``, ``focus``,
    ``additional-context``; ``error``). ``type`` is one of ``handshake``, ``heartbeat``,
    ``event-notification``, ``query-status`` or ``query-event`` (the latter two are what the
    ``$status`` and ``$events`` operations return). Payload content is ``empty`` (no focus, no
    further entries), ``id-only`` (focus references; entries with ``fullUrl`` and no resource) or
    ``full-resource`` (entries carry the resources). → :class:`BackportNotification`.
(d) **Medplum**: a bare resource POSTed with ``X-Medplum-Subscription`` /
    ``X-Medplum-Interaction`` headers and, when the Subscription has a secret, ``X-Signature``
    = hex HMAC-SHA256 of the raw body. Deletes carry ``X-Medplum-Deleted-Resource: Type/id`` and
    body ``{}``. → :class:`ResourceChanged` / :class:`ResourceDeleted`.

Authentication is separate from parsing: call :func:`verify_shared_secret` (the secret the
server sends in ``Subscription.channel.header``) and/or :func:`verify_medplum_signature` first. The size
limit is the receiving route's (``service.api.cds_hooks.read_body``), before the body is read.

Anything malformed raises :class:`InvalidNotification` whose ``reason`` is a fixed phrase: it
never quotes the payload, which may hold PHI.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlsplit

import orjson

from service.fhir.client import split_reference, within_base

if TYPE_CHECKING:
    from pydantic import SecretStr

    from service.config import Settings

__all__ = [
    "BACKPORT_STATUS_PROFILE",
    "NOTIFICATION_TYPES",
    "BackportNotification",
    "EmptyPing",
    "InvalidNotification",
    "Notification",
    "NotificationEvent",
    "ResourceChanged",
    "ResourceDeleted",
    "dedup_key",
    "parse_notification",
    "parse_subscription_status",
    "subscription_key",
    "verify_medplum_signature",
    "verify_shared_secret",
    "with_subscription_key",
]

BACKPORT_STATUS_PROFILE = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"
NOTIFICATION_TYPES = frozenset({"handshake", "heartbeat", "event-notification", "query-status", "query-event"})
NotificationType = Literal["handshake", "heartbeat", "event-notification", "query-status", "query-event"]
PayloadContent = Literal["empty", "id-only", "full-resource"]

_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_RESOURCE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE_SLASH_ID = re.compile(r"^([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})$")
_SUBSCRIPTION_PATH = re.compile(r"^Subscription/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?/?$")
_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_PLAIN_BUNDLE_TYPES = frozenset({"transaction", "batch", "collection"})
_MAX_ENTRIES = 100_000
#: Event numbers and counts are stored as 64-bit signed integers (the ledger's and subscription state's BIGINT).
MAX_EVENT_NUMBER = 2**63 - 1
#: A Backport subscription reference is stored as sent (at most 512 characters) and is the start of ledger keys
#: that append up to 45 characters ("#gap#{first}-{last}") within their own 512: real references
#: ("https://host/fhir/Subscription/{id}", ids at most 64 characters) are far shorter.
MAX_SUBSCRIPTION_REFERENCE = 400
MAX_TOPIC = 512  # the subscription state's topic column
MAX_STATUS = 32  # the subscription state's status column (FHIR: requested, active, error, off, entered-in-error)


# --- events -----------------------------------------------------------------------------------
class InvalidNotification(ValueError):
    """The notification cannot be understood. ``reason`` never contains payload data."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class EmptyPing:
    """An R4 rest-hook without payload: re-query the subscription's criteria."""

    subscription_id: str | None = None


@dataclass(frozen=True, slots=True)
class ResourceChanged:
    """A created or updated resource delivered in full."""

    resource_type: str
    id: str
    version_id: str | None
    last_updated: str | None
    resource: dict[str, Any] = field(repr=False, compare=False)
    subscription_id: str | None = None
    interaction: str | None = None  # create / update when the sender says so (Medplum, Bundle request)

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"


@dataclass(frozen=True, slots=True)
class ResourceDeleted:
    """A deletion (Medplum ``X-Medplum-Deleted-Resource``, HAPI delete delivery, Bundle DELETE)."""

    resource_type: str
    id: str
    subscription_id: str | None = None

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    """One ``notification-event`` of a Backport notification.

    ``focus_reference`` is the reference as sent (often absolute); ``focus_type`` / ``focus_id``
    are parsed from it when it has the ``Type/id`` shape. ``resource`` is set for full-resource
    payloads.
    """

    subscription: str
    event_number: int
    timestamp: str | None
    focus_reference: str | None
    resource: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    additional_context: tuple[str, ...] = ()

    @property
    def focus_type(self) -> str | None:
        parsed = split_reference(self.focus_reference)
        return parsed[0] if parsed else None

    @property
    def focus_id(self) -> str | None:
        parsed = split_reference(self.focus_reference)
        return parsed[1] if parsed else None


@dataclass(frozen=True, slots=True)
class BackportNotification:
    """A Subscriptions R5 Backport notification Bundle (R4 ``Parameters`` status form)."""

    subscription: str
    topic: str | None
    type: NotificationType
    status: str | None
    events_since_start: int | None
    events: tuple[NotificationEvent, ...]
    content: PayloadContent
    errors: tuple[str, ...] = ()

    @property
    def subscription_id(self) -> str | None:
        """The logical id of the Subscription (``…/Subscription/{id}``), if the reference has one."""
        parsed = split_reference(self.subscription)
        return parsed[1] if parsed and parsed[0] == "Subscription" else None


Notification = EmptyPing | ResourceChanged | ResourceDeleted | BackportNotification


# --- authentication ---------------------------------------------------------------------------
def _lower_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    if headers is None:
        return {}
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _secret_bytes(secret: SecretStr | str | bytes | None) -> bytes | None:
    if secret is None:
        return None
    if isinstance(secret, bytes):
        value = secret
    elif isinstance(secret, str):
        value = secret.encode("utf-8")
    else:
        value = secret.get_secret_value().encode("utf-8")
    return value or None


def verify_shared_secret(headers: Mapping[str, str] | None, settings: Settings) -> bool:
    """Check ``settings.subscription_header`` carries ``settings.subscription_secret``.

    FHIR R4 ``Subscription.channel.header`` lets the subscriber choose a header the server
    repeats on every notification; the value may be the secret itself or ``Bearer <secret>``.
    Both candidates are always compared with :func:`hmac.compare_digest`, so timing reveals
    neither the secret nor which form matched. Fails closed: ``False`` when no secret is
    configured or the header is missing.
    """
    expected = _secret_bytes(settings.subscription_secret)
    if expected is None:
        return False
    value = _lower_headers(headers).get(settings.subscription_header.lower())
    if value is None:
        return False
    raw = value.strip().encode("utf-8")
    scheme, _, rest = value.strip().partition(" ")
    bearer = rest.strip().encode("utf-8") if scheme.lower() == "bearer" else b""
    exact = hmac.compare_digest(raw, expected)
    as_bearer = hmac.compare_digest(bearer, expected)
    return exact | as_bearer


def verify_medplum_signature(raw_body: bytes, headers: Mapping[str, str] | None, secret: SecretStr | str | bytes | None) -> bool:
    """Check Medplum's ``X-Signature``: hex HMAC-SHA256 of the exact raw body keyed with the
    Subscription's secret (extension ``subscription-secret``). ``False`` when the secret or
    header is missing or malformed. Verify before parsing: the HMAC covers the bytes as sent."""
    key = _secret_bytes(secret)
    signature = _lower_headers(headers).get("x-signature")
    if key is None or signature is None:
        return False
    signature = signature.strip()
    if not _HEX.match(signature):
        return False
    expected = hmac.new(key, raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode("ascii"), signature.lower().encode("ascii"))


# --- parsing ----------------------------------------------------------------------------------
def parse_notification(
    body: bytes | str,
    headers: Mapping[str, str] | None = None,
    *,
    method: str = "POST",
    path: str | None = None,
    subscription_id: str | None = None,
) -> list[Notification]:
    """Turn one inbound request into typed events.

    :param body: the raw request body.
    :param headers: request headers (any case).
    :param method: HTTP method (HAPI uses ``PUT`` for payloads, ``DELETE`` for delete delivery).
    :param path: the part of the request path after the receiver's endpoint, e.g.
        ``Observation/123`` for HAPI's ``PUT {endpoint}/Observation/123``; checked against the
        body's resource when both are present.
    :param subscription_id: which subscription the endpoint belongs to, if the receiver knows
        (e.g. from its own URL); Medplum's ``X-Medplum-Subscription`` is used otherwise.
    :raises InvalidNotification: on anything malformed.
    """
    raw = body.encode("utf-8") if isinstance(body, str) else body
    if not isinstance(raw, bytes | bytearray):
        raise InvalidNotification("body is not bytes")
    hdrs = _lower_headers(headers)
    sub_id = subscription_id or _clean(hdrs.get("x-medplum-subscription"))
    path_ref = _path_reference(path)
    verb = (method or "POST").upper()

    if verb == "DELETE":
        if path_ref is None:
            raise InvalidNotification("DELETE notification without Type/id in the path")
        return [ResourceDeleted(path_ref[0], path_ref[1], sub_id)]

    deleted = hdrs.get("x-medplum-deleted-resource")
    if deleted is not None:
        match = _TYPE_SLASH_ID.match(deleted.strip())
        if match is None:
            raise InvalidNotification("X-Medplum-Deleted-Resource is not Type/id")
        return [ResourceDeleted(match.group(1), match.group(2), sub_id)]

    if not raw.strip():
        if path_ref is not None:
            raise InvalidNotification("empty body on a resource path")
        return [EmptyPing(sub_id)]

    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidNotification("body is not valid JSON") from None
    if b"\\u0000" in raw and _contains_nul(data):  # the escape is the only way a NUL gets into valid JSON
        raise InvalidNotification("a string contains U+0000 (FHIR strings may not)")
    if not isinstance(data, dict):
        raise InvalidNotification("JSON body is not an object")
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str) or not _RESOURCE_TYPE.match(resource_type):
        raise InvalidNotification("body has no valid resourceType")

    interaction = _clean(hdrs.get("x-medplum-interaction"))
    if resource_type == "Bundle":
        if path_ref is not None and path_ref[0] != "Bundle":
            raise InvalidNotification("path does not match the body's resource")
        bundle_type = data.get("type")
        if not isinstance(bundle_type, str):
            raise InvalidNotification("Bundle.type is not a string")
        if bundle_type == "history" or _first_is_status(data):
            if bundle_type != "history":
                raise InvalidNotification("notification bundle type is not history")
            return [_parse_backport(data)]
        if bundle_type in _PLAIN_BUNDLE_TYPES and path_ref is None:
            return _parse_plain_bundle(data, sub_id)
        if path_ref is None:
            raise InvalidNotification("unsupported bundle type")
    return [_resource_changed(data, path_ref, sub_id, interaction)]


def _contains_nul(data: Any) -> bool:
    """Whether any string of the decoded JSON, member names included, holds U+0000 (iterative: no recursion limit)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value[:200] if value else None


def _path_reference(path: str | None) -> tuple[str, str] | None:
    if path is None:
        return None
    stripped = path.strip().strip("/")
    if not stripped:
        return None
    parts = stripped.split("/")
    if len(parts) < 2 or not _RESOURCE_TYPE.match(parts[-2]) or not _RESOURCE_ID.match(parts[-1]):
        raise InvalidNotification("path is not Type/id")
    return parts[-2], parts[-1]


def _meta(resource: Mapping[str, Any]) -> tuple[str | None, str | None]:
    meta = resource.get("meta")
    if meta is None:
        return None, None
    if not isinstance(meta, dict):
        raise InvalidNotification("resource meta is not an object")
    version = meta.get("versionId")
    updated = meta.get("lastUpdated")
    if version is not None and (not isinstance(version, str) or not _RESOURCE_ID.match(version)):
        raise InvalidNotification("meta.versionId is not a valid id")
    if updated is not None and not isinstance(updated, str):
        raise InvalidNotification("meta.lastUpdated is not a string")
    return version, updated


def _resource_changed(
    resource: dict[str, Any],
    path_ref: tuple[str, str] | None,
    sub_id: str | None,
    interaction: str | None,
) -> ResourceChanged:
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not _RESOURCE_TYPE.match(resource_type):
        raise InvalidNotification("resource has no valid resourceType")
    rid = resource.get("id")
    if rid is not None and (not isinstance(rid, str) or not _RESOURCE_ID.match(rid)):
        raise InvalidNotification("resource id is not a valid FHIR id")
    if path_ref is not None:
        if path_ref[0] != resource_type or (rid is not None and rid != path_ref[1]):
            raise InvalidNotification("path does not match the body's resource")
        rid = path_ref[1]
    if rid is None:
        raise InvalidNotification("resource has no id")
    version, updated = _meta(resource)
    return ResourceChanged(resource_type, rid, version, updated, resource, sub_id, interaction)


def _entries(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise InvalidNotification("Bundle.entry is not an array")
    if len(entries) > _MAX_ENTRIES:
        raise InvalidNotification("too many bundle entries")
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidNotification("Bundle entry is not an object")
    return entries


def _first_is_status(bundle: Mapping[str, Any]) -> bool:
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        return False
    first = entries[0].get("resource")
    if not isinstance(first, dict) or first.get("resourceType") != "Parameters":
        return False
    meta = first.get("meta")
    profiles = meta.get("profile") if isinstance(meta, dict) else None
    if isinstance(profiles, list) and BACKPORT_STATUS_PROFILE in profiles:
        return True
    params = first.get("parameter")
    return isinstance(params, list) and any(isinstance(p, dict) and p.get("name") == "subscription" for p in params)


def _parse_plain_bundle(bundle: dict[str, Any], sub_id: str | None) -> list[Notification]:
    out: list[Notification] = []
    for entry in _entries(bundle):
        request = entry.get("request")
        method = request.get("method") if isinstance(request, dict) else None
        if method == "DELETE":
            url = request.get("url") if isinstance(request, dict) else None
            ref = split_reference(url if isinstance(url, str) else None)
            if ref is None:
                raise InvalidNotification("DELETE entry without Type/id")
            out.append(ResourceDeleted(ref[0], ref[1], sub_id))
            continue
        resource = entry.get("resource")
        if resource is None:
            continue
        if not isinstance(resource, dict):
            raise InvalidNotification("Bundle entry resource is not an object")
        interaction = {"POST": "create", "PUT": "update"}.get(method) if isinstance(method, str) else None
        if resource.get("id") is None:
            ref = split_reference(entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None)
            if ref is not None and ref[0] == resource.get("resourceType"):
                out.append(_resource_changed(resource, (ref[0], ref[1]), sub_id, interaction))
                continue
        out.append(_resource_changed(resource, None, sub_id, interaction))
    return out


# --- Backport ---------------------------------------------------------------------------------
def _parameters(resource: Mapping[str, Any], what: str) -> list[dict[str, Any]]:
    params = resource.get("parameter", [])
    if not isinstance(params, list):
        raise InvalidNotification(f"{what} is not an array")
    for p in params:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise InvalidNotification(f"{what} item has no name")
    return params


def _single(params: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    found = [p for p in params if p["name"] == name]
    if len(found) > 1:
        raise InvalidNotification(f"parameter {name} repeated")
    return found[0] if found else None


def _string_value(param: Mapping[str, Any] | None, keys: tuple[str, ...], what: str) -> str | None:
    if param is None:
        return None
    for key in keys:
        if key in param:
            value = param[key]
            if not isinstance(value, str) or not value:
                raise InvalidNotification(f"{what} is not a non-empty string")
            return value
    raise InvalidNotification(f"{what} has no value")


def _reference_value(param: Mapping[str, Any] | None, what: str) -> str | None:
    if param is None:
        return None
    ref = param.get("valueReference")
    if ref is None:
        if "valueUri" in param or "valueCanonical" in param or "valueString" in param:
            return _string_value(param, ("valueUri", "valueCanonical", "valueString"), what)
        raise InvalidNotification(f"{what} has no reference")
    if not isinstance(ref, dict):
        raise InvalidNotification(f"{what} is not a Reference")
    value = ref.get("reference")
    if not isinstance(value, str) or not value:
        raise InvalidNotification(f"{what} has no literal reference")
    return value


def _count_value(param: Mapping[str, Any] | None, what: str) -> int | None:
    """An event count/number: ``valueString`` in the R4 profile, integer types tolerated."""
    if param is None:
        return None
    for key in ("valueString", "valueUnsignedInt", "valueInteger64", "valueInteger", "valuePositiveInt", "valueDecimal"):
        if key not in param:
            continue
        value = param[key]
        if isinstance(value, bool):
            break
        integral_float = isinstance(value, float) and value.is_integer()
        digit_string = isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18
        if not (isinstance(value, int) or integral_float or digit_string):
            break
        number = int(value)
        if not 0 <= number <= MAX_EVENT_NUMBER:
            break
        return number
    raise InvalidNotification(f"{what} is not a non-negative 64-bit integer")


def _parse_event(param: Mapping[str, Any], subscription: str) -> NotificationEvent:
    parts = param.get("part", [])
    if not isinstance(parts, list):
        raise InvalidNotification("notification-event part is not an array")
    for p in parts:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise InvalidNotification("notification-event part has no name")
    number = _count_value(_single(parts, "event-number"), "event-number")
    if number is None:
        raise InvalidNotification("notification-event without event-number")
    timestamp = _string_value(_single(parts, "timestamp"), ("valueInstant", "valueDateTime", "valueString"), "timestamp")
    focus = _reference_value(_single(parts, "focus"), "focus")
    context = tuple(ref for p in parts if p["name"] == "additional-context" if (ref := _reference_value(p, "additional-context")))
    return NotificationEvent(subscription, number, timestamp, focus, None, context)


def _entry_key(reference: str | None) -> str | None:
    parsed = split_reference(reference)
    return f"{parsed[0]}/{parsed[1]}" if parsed else reference


def _parse_backport(bundle: dict[str, Any]) -> BackportNotification:
    entries = _entries(bundle)
    if not entries:
        raise InvalidNotification("notification bundle has no entries")
    status_resource = entries[0].get("resource")
    if not isinstance(status_resource, dict) or status_resource.get("resourceType") != "Parameters":
        raise InvalidNotification("first entry is not a Parameters subscription status")
    params = _parameters(status_resource, "Parameters.parameter")

    subscription = _reference_value(_single(params, "subscription"), "subscription")
    if subscription is None:
        raise InvalidNotification("subscription status has no subscription")
    subscription = subscription.strip()
    if not subscription or len(subscription) > MAX_SUBSCRIPTION_REFERENCE:
        raise InvalidNotification(f"subscription reference is not 1..{MAX_SUBSCRIPTION_REFERENCE} characters")
    topic = _string_value(_single(params, "topic"), ("valueCanonical", "valueUri", "valueString"), "topic")
    if topic is not None and len(topic) > MAX_TOPIC:
        raise InvalidNotification(f"topic is over {MAX_TOPIC} characters")
    status = _string_value(_single(params, "status"), ("valueCode", "valueString"), "status")
    if status is not None and len(status) > MAX_STATUS:
        raise InvalidNotification(f"status is over {MAX_STATUS} characters")
    ntype = _string_value(_single(params, "type"), ("valueCode", "valueString"), "type")
    if ntype is None:
        raise InvalidNotification("subscription status has no type")
    if ntype not in NOTIFICATION_TYPES:
        raise InvalidNotification("unknown notification type")
    since_start = _count_value(_single(params, "events-since-subscription-start"), "events-since-subscription-start")
    errors = tuple(_error_codes(params))
    events = [_parse_event(p, subscription) for p in params if p["name"] == "notification-event"]
    seen: set[int] = set()
    for ev in events:
        if ev.event_number in seen:
            raise InvalidNotification("duplicate event-number")
        seen.add(ev.event_number)

    # Payload entries: index by Type/id (fullUrl, else the resource's own type/id).
    by_key: dict[str, dict[str, Any]] = {}
    id_only = False
    for entry in entries[1:]:
        resource = entry.get("resource")
        full_url = entry.get("fullUrl")
        if full_url is not None and not isinstance(full_url, str):
            raise InvalidNotification("entry fullUrl is not a string")
        if resource is None:
            if full_url:
                id_only = True
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise InvalidNotification("entry resource is not a resource")
        parsed = split_reference(full_url)
        rid = resource.get("id")
        if rid is not None and (not isinstance(rid, str) or not _RESOURCE_ID.match(rid)):
            raise InvalidNotification("entry resource id is not a valid FHIR id")
        _meta(resource)  # its versionId and lastUpdated are checked as for a resource delivered alone
        if parsed is not None:
            if parsed[0] != resource["resourceType"] or (rid is not None and rid != parsed[1]):
                raise InvalidNotification("entry resource does not match its fullUrl")
            key: str | None = f"{parsed[0]}/{parsed[1]}"
        else:
            key = f"{resource['resourceType']}/{rid}" if isinstance(rid, str) else None
        if key is not None:
            by_key[key] = resource

    resolved: list[NotificationEvent] = []
    for ev in events:
        resource = by_key.get(_entry_key(ev.focus_reference) or "") if ev.focus_reference else None
        resolved.append(NotificationEvent(ev.subscription, ev.event_number, ev.timestamp, ev.focus_reference, resource, ev.additional_context))

    content: PayloadContent
    if by_key:
        content = "full-resource"
    elif id_only or any(ev.focus_reference for ev in events):
        content = "id-only"
    else:
        content = "empty"
    return BackportNotification(
        subscription=subscription,
        topic=topic,
        type=cast(NotificationType, ntype),  # checked against NOTIFICATION_TYPES above
        status=status,
        events_since_start=since_start,
        events=tuple(sorted(resolved, key=lambda e: e.event_number)),
        content=content,
        errors=errors,
    )


def parse_subscription_status(body: bytes | str | Mapping[str, Any]) -> list[BackportNotification]:
    """Parse a ``$status`` / ``$events`` response (pure; the body as received or already decoded).

    ``$status`` returns a ``searchset`` Bundle of status ``Parameters`` (one per Subscription);
    ``$events`` returns a notification Bundle (``history``, type ``query-event``). A bare
    status ``Parameters`` is accepted too.
    """
    if isinstance(body, Mapping):
        data: Any = body
    else:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidNotification("body is not valid JSON") from None
    if not isinstance(data, Mapping):
        raise InvalidNotification("JSON body is not an object")
    rtype = data.get("resourceType")
    if rtype == "Parameters":
        return [_parse_backport({"resourceType": "Bundle", "type": "history", "entry": [{"resource": dict(data)}]})]
    if rtype != "Bundle":
        raise InvalidNotification("status response is not a Bundle")
    if data.get("type") == "history":
        return [_parse_backport(dict(data))]
    if data.get("type") != "searchset":
        raise InvalidNotification("unsupported bundle type")
    out = []
    for entry in _entries(data):
        resource = entry.get("resource")
        if isinstance(resource, dict) and resource.get("resourceType") == "Parameters":
            out.append(_parse_backport({"resourceType": "Bundle", "type": "history", "entry": [{"resource": resource}]}))
        elif resource is not None and not (isinstance(resource, dict) and resource.get("resourceType") == "OperationOutcome"):
            raise InvalidNotification("status entry is not a Parameters resource")
    return out


def _error_codes(params: list[dict[str, Any]]) -> list[str]:
    codes: list[str] = []
    for p in params:
        if p["name"] != "error":
            continue
        concept = p.get("valueCodeableConcept")
        codings = concept.get("coding") if isinstance(concept, dict) else None
        if not isinstance(codings, list):
            codes.append("unknown")
            continue
        for coding in codings:
            code = coding.get("code") if isinstance(coding, dict) else None
            codes.append(code[:64] if isinstance(code, str) else "unknown")
    return codes


# --- subscription keys ------------------------------------------------------------------------
def subscription_key(reference: str, base_url: str | None) -> str:
    """The one form a subscription is known by here (``subscription_state``, ledger keys, logs): ``Subscription/{id}``
    for a relative reference or an absolute one on ``base_url`` (``CDS_FHIR_BASE_URL``, as :func:`within_base`
    judges it; a version dropped), any other reference as it is. Backport notifications name their subscription by
    its absolute URL, ``subscriptions create`` by its id: both must reach one row."""
    ref = reference.strip()
    rest = ref
    if base_url and within_base(ref, base_url.strip()):
        rest = urlsplit(ref).path[len(urlsplit(base_url.strip()).path.rstrip("/")) + 1 :]
    match = _SUBSCRIPTION_PATH.match(rest)
    return f"Subscription/{match.group(1)}" if match else ref


def with_subscription_key(n: BackportNotification, base_url: str | None) -> BackportNotification:
    """The notification with its subscription, and each event's, in :func:`subscription_key`'s form (so the events'
    ledger keys, ``{subscription}#{number}``, are the same whichever form the server sent)."""
    key = subscription_key(n.subscription, base_url)
    if key == n.subscription and all(ev.subscription == key for ev in n.events):
        return n
    return replace(n, subscription=key, events=tuple(replace(ev, subscription=key) for ev in n.events))


# --- deduplication ----------------------------------------------------------------------------
def dedup_key(event: ResourceChanged | ResourceDeleted | NotificationEvent) -> str:
    """A stable key for at-least-once delivery: the same change delivered twice (retries,
    ``$events`` catch-up) maps to the same key.

    * Backport events: ``"{subscription}#{event_number}"`` (the receiver passes events through
      :func:`with_subscription_key`, so ``Subscription/{id}`` for a subscription on ``CDS_FHIR_BASE_URL``).
    * Resource payloads: ``"{Type}/{id}/_history/{versionId}"``; without a versionId,
      ``"{Type}/{id}/_lastUpdated/{meta.lastUpdated}"``; without either,
      ``"{Type}/{id}/_sha256/{digest}"`` of the canonical (key-sorted) JSON.
    * Deletions: ``"{Type}/{id}/_deleted"`` (the receiver appends the stored version the deletion applies to).
    """
    if isinstance(event, NotificationEvent):
        return f"{event.subscription}#{event.event_number}"
    if isinstance(event, ResourceDeleted):
        return f"{event.resource_type}/{event.id}/_deleted"
    if isinstance(event, ResourceChanged):
        if event.version_id:
            return f"{event.resource_type}/{event.id}/_history/{event.version_id}"
        if event.last_updated:
            return f"{event.resource_type}/{event.id}/_lastUpdated/{event.last_updated}"
        digest = hashlib.sha256(orjson.dumps(event.resource, option=orjson.OPT_SORT_KEYS)).hexdigest()
        return f"{event.resource_type}/{event.id}/_sha256/{digest}"
    raise TypeError("dedup_key needs a ResourceChanged, ResourceDeleted or NotificationEvent")
