"""Synchronous FHIR R4 REST client for the monitored server (reads, searches, write-back, bulk).

Spec references (FHIR R4 ``http.html`` unless noted):

* **read / vread** - ``GET [base]/[type]/[id]`` and ``.../_history/[vid]``; 404 is unknown,
  410 is deleted (both raise :class:`FhirNotFound`). **history** - ``GET [base]/[type]/[id]/_history``.
* **search** - ``GET [base]/[type]?params`` or ``POST [base]/[type]/_search`` (form body, which
  keeps patient ids out of URLs and access logs). Results are ``searchset`` Bundles; the next
  page is the Bundle link with ``relation = next``. The client follows at most ``max_pages``
  pages and only links under the base URL (same origin and base path, :func:`within_base`) - a next
  link elsewhere would receive the bearer token, so it is refused with :class:`FhirPermanentError`.
* **create / update** - ``POST [base]/[type]`` and ``PUT [base]/[type]/[id]``, with
  ``Prefer: return=representation``; optional ``If-Match`` (version-aware update) and
  ``If-None-Exist`` (conditional create).
* **conditional update** - ``PUT [base]/[type]?identifier=system|value``: no match creates,
  one match updates it, several matches fail with 412. This makes write-back idempotent.
* **operations** - ``[base]/([type]/([id]/))$name`` (GET or POST); the Subscriptions R5
  Backport IG's ``Subscription/[id]/$events`` and ``$status`` have helpers.
* **Bulk Data Access IG ($export)** - kick-off with ``Prefer: respond-async`` gives 202 and a
  ``Content-Location`` status URL; polling it yields 202 (``X-Progress``, ``Retry-After``)
  until 200 with a JSON manifest whose ``output`` lists NDJSON files. The access token is sent
  with file downloads only when ``requiresAccessToken`` is true (and only to the same origin).

Retries: 429, 502, 503, 504 and transport errors are retried up to ``max_retries`` times with
exponential backoff and jitter, or after the server's ``Retry-After`` (delta-seconds or
HTTP-date). A ``Retry-After`` longer than ``retry_after_max_s`` is not slept on: the call fails at
once with :class:`FhirTransientError` carrying ``retry_after_s`` so a task queue can reschedule.
Non-idempotent requests (POST create, unknown POST operations) are retried only when the server
cannot have processed them (429, 503, connection never established).

Timeouts: ``timeout_s`` bounds each phase of a request (connect, write, each read, pool wait),
which is what httpx offers for a synchronous client.

Errors never contain query strings or bodies (see :mod:`service.fhir.errors`).
"""

from __future__ import annotations

import logging
import random
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable
from urllib.parse import quote, unquote, urlencode, urljoin, urlsplit

import httpx
import orjson

from service.cds.fhirutil import last_updated_of, parse_datetime, version_of
from service.fhir.errors import (
    FhirAuthError,
    FhirError,
    FhirNotFound,
    FhirPermanentError,
    FhirTransientError,
    json_object,
    redact_url,
)
from service.tls import certificate_rejected, client_ssl_context, tls_problem

if TYPE_CHECKING:
    from service.config import Settings

__all__ = [
    "FHIR_JSON",
    "FhirClient",
    "Params",
    "StaticBearer",
    "TokenProvider",
    "client_from_settings",
    "escape_search_value",
    "parse_retry_after",
]

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
FHIR_NDJSON = "application/fhir+ndjson"
PRODUCT = "calcinosis-cds/0.1"
DEFAULT_USER_AGENT = f"{PRODUCT} (+httpx)"

#: Statuses worth retrying (rate limited, bad gateway, unavailable, gateway timeout).
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: Statuses that mean the server did not process the request, so even a POST may be resent.
UNPROCESSED_STATUSES = frozenset({429, 503})
#: Backport IG operations that only read (safe to retry when sent as POST).
_SAFE_OPERATIONS = frozenset({"$events", "$status", "$everything", "$validate"})

_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_RESOURCE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_OPERATION = re.compile(r"^\$?[A-Za-z][A-Za-z0-9\-_]{0,63}$")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")

ParamValue = str | int | float | bool | date | datetime
#: Search parameters: a mapping (a sequence value repeats the parameter) or (name, value) pairs.
Params = Mapping[str, ParamValue | Sequence[ParamValue] | None] | Sequence[tuple[str, ParamValue]]


# --- authentication ---------------------------------------------------------------------------
@runtime_checkable
class TokenProvider(Protocol):
    """Supplies bearer tokens. :class:`service.fhir.smart.SmartBackendAuth` is one."""

    def get_token(self) -> str: ...

    def invalidate(self, token: str | None = None) -> None: ...


class StaticBearer:
    """A fixed bearer token (``CDS_FHIR_AUTH_MODE=bearer``). A 401 is final: it cannot refresh."""

    refreshable = False

    def __init__(self, token: str) -> None:
        if not token:
            raise FhirAuthError("empty bearer token")
        self._token = token

    def get_token(self) -> str:
        return self._token

    def invalidate(self, token: str | None = None) -> None:
        return None

    def __repr__(self) -> str:  # never show the token
        return "StaticBearer(***)"


# --- helpers ----------------------------------------------------------------------------------
def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds (fractions tolerated) or an HTTP-date.

    Returns ``None`` when absent or unparsable; never negative.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds and seconds != float("inf") else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def escape_search_value(value: str) -> str:
    r"""Escape FHIR search special characters in one token part (``\``, ``|``, ``,``, ``$``)."""
    return value.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$")


def _format_value(value: ParamValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _normalise_params(params: Params | None) -> list[tuple[str, str]]:
    if params is None:
        return []
    items: Any = params.items() if isinstance(params, Mapping) else params
    out: list[tuple[str, str]] = []
    for name, value in items:
        if value is None:
            continue
        if isinstance(value, list | tuple):
            out.extend((name, _format_value(v)) for v in value if v is not None)
        else:
            out.append((name, _format_value(value)))
    return out


def origin_of(url: str | httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: equal for ``HTTPS://Ehr`` and ``https://ehr:443``."""
    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def within_base(url: str, base: str) -> bool:
    """Whether ``url`` is on the FHIR server whose base URL is ``base``: the same origin and a path at or under the
    base's (HAPI pages at the base itself, ``/fhir?_getpages=…``). A next link that is not, whether on another host
    or on another base of the same host (another tenant), is never followed with the server's token. Nor is one with
    a dot segment (``/fhir/../tenant2``, ``/fhir/%2e%2e/…``): HTTP clients resolve those before sending."""
    if origin_of(url) != origin_of(base):
        return False
    base_path, path = urlsplit(base).path.rstrip("/"), urlsplit(url).path
    if any(segment in (".", "..") for segment in unquote(path).replace("\\", "/").split("/")):
        return False
    return path == base_path or path.startswith(base_path + "/")


def _check_type(resource_type: str) -> str:
    if not isinstance(resource_type, str) or not _RESOURCE_TYPE.match(resource_type):
        raise ValueError("invalid FHIR resource type")
    return resource_type


def _check_id(resource_id: str, what: str = "id") -> str:
    if not isinstance(resource_id, str) or not _RESOURCE_ID.match(resource_id):
        raise ValueError(f"invalid FHIR {what}")
    return resource_id


def _sanitize_progress(value: str | None) -> str | None:
    """``X-Progress`` is free text chosen by the server: keep it printable and short for logs."""
    if not value:
        return None
    return _PRINTABLE.sub("?", value)[:100]


# --- the client -------------------------------------------------------------------------------
class FhirClient:
    """Synchronous FHIR R4 client over httpx (thread-safe; use as a context manager).

    :param base_url: the FHIR base, e.g. ``https://ehr.example.org/fhir/R4``.
    :param auth: ``None``, a static bearer token string, or a :class:`TokenProvider`
        (e.g. :class:`~service.fhir.smart.SmartBackendAuth`). Tokens are only ever sent to the
        base URL's origin.
    :param timeout_s: per-phase timeout of each HTTP request.
    :param max_pages: search pages followed at most (first page included).
    :param max_retries: retries after the first attempt (so ``max_retries + 1`` attempts).
    :param backoff_s: first backoff delay; doubles each attempt, with jitter.
    :param retry_after_max_s: cap on any one retry delay (see module docstring).
    :param transport: an httpx transport (tests: ``httpx.MockTransport``).
    :param ssl_context: the TLS trust (:func:`service.tls.client_ssl_context`; default: without an extra CA file).
    :param sleep: injectable sleep (tests).
    :param clock: injectable monotonic clock for the bulk polling deadline (tests).
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: TokenProvider | str | None = None,
        timeout_s: float = 5.0,
        max_pages: int = 5,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        retry_after_max_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        close_auth: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not base_url or urlsplit(base_url).scheme not in {"http", "https"}:
            raise ValueError("FHIR base URL must be an absolute http(s) URL")
        self.base_url = base_url.rstrip("/")
        self._origin = origin_of(self.base_url)
        self._auth: TokenProvider | None = StaticBearer(auth) if isinstance(auth, str) else auth
        self._close_auth = close_auth
        self.timeout_s = timeout_s
        self.max_pages = max(1, max_pages)
        self.max_retries = max(0, max_retries)
        self._backoff_s = max(0.0, backoff_s)
        self._retry_after_max_s = max(0.0, retry_after_max_s)
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            headers={"Accept": FHIR_JSON, "User-Agent": user_agent},
            follow_redirects=False,
            verify=ssl_context if ssl_context is not None else client_ssl_context(),
        )

    # --- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()
        if self._close_auth:
            closer = getattr(self._auth, "close", None)
            if callable(closer):
                closer()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FhirClient({redact_url(self.base_url)!r})"

    # --- URLs ---------------------------------------------------------------------------------
    def url(self, *segments: str) -> str:
        """``base_url`` joined with percent-encoded path segments."""
        return "/".join([self.base_url, *(quote(s, safe="$-._~") for s in segments)])

    def is_same_origin(self, url: str | httpx.URL) -> bool:
        return origin_of(url) == self._origin

    # --- reads --------------------------------------------------------------------------------
    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """``GET [base]/[type]/[id]``."""
        url = self.url(_check_type(resource_type), _check_id(resource_id))
        resp = self._send("GET", url, idempotent=True)
        self._raise_for_status(resp, "GET", url, resource_type=resource_type, resource_id=resource_id)
        return self._resource(resp, url, expect_type=resource_type)

    def vread(self, resource_type: str, resource_id: str, version_id: str) -> dict[str, Any]:
        """``GET [base]/[type]/[id]/_history/[vid]``."""
        url = self.url(_check_type(resource_type), _check_id(resource_id), "_history", _check_id(version_id, "version id"))
        resp = self._send("GET", url, idempotent=True)
        self._raise_for_status(resp, "GET", url, resource_type=resource_type, resource_id=resource_id)
        return self._resource(resp, url, expect_type=resource_type)

    def history(self, resource_type: str, resource_id: str, *, count: int | None = None) -> dict[str, Any]:
        """``GET [base]/[type]/[id]/_history``: the history Bundle (newest version first; ``count`` is sent as
        ``_count``, the first page only). A deleted version is an entry with ``request.method = DELETE``."""
        url = self.url(_check_type(resource_type), _check_id(resource_id), "_history")
        params = [("_count", str(max(1, count)))] if count is not None else None
        resp = self._send("GET", url, params=params, idempotent=True)
        self._raise_for_status(resp, "GET", url, resource_type=resource_type, resource_id=resource_id)
        bundle = json_object(resp, url)
        if bundle.get("resourceType") != "Bundle":
            raise FhirPermanentError(f"history {redact_url(url)} did not return a Bundle", url=url)
        return bundle

    # --- search -------------------------------------------------------------------------------
    def search_bundle_pages(
        self,
        resource_type: str,
        params: Params | None = None,
        *,
        method: Literal["GET", "POST"] = "GET",
        max_pages: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield searchset Bundles page by page, following ``next`` links (under the base URL only)."""
        limit = max(1, max_pages if max_pages is not None else self.max_pages)
        query = _normalise_params(params)
        if method == "POST":
            url = self.url(_check_type(resource_type), "_search")
            resp = self._send(
                "POST",
                url,
                content=urlencode(query).encode("ascii"),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                idempotent=True,
            )
        else:
            url = self.url(_check_type(resource_type))
            resp = self._send("GET", url, params=query, idempotent=True)
        self._raise_for_status(resp, method, url)
        yield from self._pages(resp, url, resource_type, limit, "search")

    def history_type_pages(
        self, resource_type: str, since: datetime | str, *, count: int | None = None, max_pages: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """``GET [base]/[type]/_history?_since=…``: the history Bundles of every version of the type made after
        ``since``, deletions included (entries with ``request.method = DELETE`` and no resource), newest first,
        page by page (``count`` is sent as ``_count``). The last page yielded has a ``next`` link when ``max_pages``
        cut it. Servers that do not offer type-level history answer 4xx (:class:`FhirPermanentError`)."""
        limit = max(1, max_pages if max_pages is not None else self.max_pages)
        query = [("_since", _format_value(since))]
        if count is not None:
            query.append(("_count", str(max(1, count))))
        url = self.url(_check_type(resource_type), "_history")
        resp = self._send("GET", url, params=query, idempotent=True)
        self._raise_for_status(resp, "GET", url)
        yield from self._pages(resp, url, resource_type, limit, "history")

    def _pages(self, resp: httpx.Response, url: str, resource_type: str, limit: int, what: str) -> Iterator[dict[str, Any]]:
        """The Bundle of ``resp`` and those of its ``next`` links (under the base URL only), ``limit`` pages at most."""
        page = 1
        while True:
            bundle = json_object(resp, url)
            if bundle.get("resourceType") != "Bundle":
                raise FhirPermanentError(f"{what} {redact_url(url)} did not return a Bundle", url=url)
            yield bundle
            next_url = next_link(bundle)
            if next_url is None:
                return
            next_url = urljoin(self.base_url + "/", next_url)
            if not within_base(next_url, self.base_url):
                raise FhirPermanentError(
                    f"refusing to follow a next link off the FHIR base, to another origin or path ({redact_url(next_url)})", url=next_url
                )
            if page >= limit:
                # In the message: the JSON log format keeps no ``extra`` fields. The type and a count, never the query.
                log.warning("%s truncated at max_pages: %s after %d page(s)", what, resource_type, limit)
                return
            url = next_url
            resp = self._send("GET", url, idempotent=True)
            self._raise_for_status(resp, "GET", url)
            page += 1

    def search(
        self,
        resource_type: str,
        params: Params | None = None,
        *,
        method: Literal["GET", "POST"] = "GET",
        max_pages: int | None = None,
        include_included: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Yield the resources of a search (``search.mode = match``; ``include`` ones on request).

        OperationOutcome entries (``search.mode = outcome``) are skipped.
        """
        for bundle in self.search_bundle_pages(resource_type, params, method=method, max_pages=max_pages):
            yield from entry_resources(bundle, include_included=include_included)

    def history_since_pages(
        self,
        resource_type: str,
        since: datetime | str,
        params: Params | None = None,
        *,
        method: Literal["GET", "POST"] = "GET",
        max_pages: int | None = None,
        count: int | None = None,
        until: datetime | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The searchset pages of the resources of a type changed strictly after ``since`` (``_lastUpdated=gt…``; and
        at or before ``until`` when given), sorted by ``_lastUpdated`` ascending; ``count`` is sent as ``_count`` (page
        size: a server's default may be as small as 20). The last page yielded has a ``next`` link when ``max_pages``
        cut the search.

        Uses search rather than the ``_history`` interaction: history returns every version and deleted entries, while
        polling only needs each resource's current state."""
        query = [*_normalise_params(params), ("_lastUpdated", f"gt{_format_value(since)}")]
        if until is not None:
            query.append(("_lastUpdated", f"le{_format_value(until)}"))
        query.append(("_sort", "_lastUpdated"))
        if count is not None:
            query.append(("_count", str(max(1, count))))
        return self.search_bundle_pages(resource_type, query, method=method, max_pages=max_pages)

    # --- writes -------------------------------------------------------------------------------
    def create(self, resource_type: str, resource: Mapping[str, Any], *, if_none_exist: Params | None = None) -> dict[str, Any]:
        """``POST [base]/[type]``; with ``if_none_exist``, a conditional create (``If-None-Exist``)."""
        body = _checked_body(resource_type, resource, None)
        url = self.url(_check_type(resource_type))
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=representation"}
        if if_none_exist is not None:
            headers["If-None-Exist"] = urlencode(_normalise_params(if_none_exist))
        resp = self._send("POST", url, content=orjson.dumps(body), headers=headers, idempotent=if_none_exist is not None)
        self._raise_for_status(resp, "POST", url, resource_type=resource_type)
        return self._written(resp, url, resource_type)

    def update(self, resource_type: str, resource_id: str, resource: Mapping[str, Any], *, if_match: str | None = None) -> dict[str, Any]:
        """``PUT [base]/[type]/[id]`` (update, or create with a client id). ``if_match`` is a
        version id: the server rejects the write with 412 if the resource has moved on."""
        body = _checked_body(resource_type, resource, _check_id(resource_id))
        url = self.url(_check_type(resource_type), resource_id)
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=representation"}
        if if_match is not None:
            headers["If-Match"] = f'W/"{_check_id(if_match, "version id")}"'
        resp = self._send("PUT", url, content=orjson.dumps(body), headers=headers, idempotent=True)
        self._raise_for_status(resp, "PUT", url, resource_type=resource_type, resource_id=resource_id)
        return self._written(resp, url, resource_type)

    def conditional_update(self, resource_type: str, identifier_system: str, identifier_value: str, resource: Mapping[str, Any]) -> dict[str, Any]:
        """``PUT [base]/[type]?identifier=system|value``: create on no match, update on one match
        (412 → :class:`FhirPermanentError` on several). Repeating it is idempotent, which is what
        makes RiskAssessment write-back safe to retry."""
        if not identifier_system or not identifier_value:
            raise ValueError("conditional update needs an identifier system and value")
        body = _checked_body(resource_type, resource, None)
        url = self.url(_check_type(resource_type))
        token = f"{escape_search_value(identifier_system)}|{escape_search_value(identifier_value)}"
        resp = self._send(
            "PUT",
            url,
            params=[("identifier", token)],
            content=orjson.dumps(body),
            headers={"Content-Type": FHIR_JSON, "Prefer": "return=representation"},
            idempotent=True,
        )
        self._raise_for_status(resp, "PUT", url, resource_type=resource_type)
        return self._written(resp, url, resource_type)

    # --- operations ---------------------------------------------------------------------------
    def operation(
        self,
        name: str,
        *,
        resource_type: str | None = None,
        resource_id: str | None = None,
        params: Params | None = None,
        body: Mapping[str, Any] | None = None,
        method: Literal["GET", "POST"] = "GET",
        idempotent: bool | None = None,
    ) -> dict[str, Any]:
        """Invoke ``[base]/([type]/([id]/))$name``; returns the response resource.

        POST sends ``body`` (a Parameters resource) when given, else ``params`` as a Parameters
        resource of ``valueString`` parameters. GET sends ``params`` in the query.
        """
        if not _OPERATION.match(name):
            raise ValueError("invalid operation name")
        op = name if name.startswith("$") else f"${name}"
        segments: list[str] = []
        if resource_type is not None:
            segments.append(_check_type(resource_type))
            if resource_id is not None:
                segments.append(_check_id(resource_id))
        elif resource_id is not None:
            raise ValueError("resource_id needs resource_type")
        url = self.url(*segments, op)
        if method == "GET":
            resp = self._send("GET", url, params=_normalise_params(params), idempotent=idempotent is not False)
        else:
            safe = op in _SAFE_OPERATIONS if idempotent is None else idempotent
            payload = dict(body) if body is not None else _parameters_resource(_normalise_params(params))
            resp = self._send("POST", url, content=orjson.dumps(payload), headers={"Content-Type": FHIR_JSON}, idempotent=safe)
        self._raise_for_status(resp, method, url, resource_type=resource_type, resource_id=resource_id)
        return json_object(resp, url)

    def subscription_events(
        self,
        subscription_id: str,
        *,
        since: int | None = None,
        until: int | None = None,
        content: Literal["empty", "id-only", "full-resource"] | None = None,
    ) -> dict[str, Any]:
        """Backport IG ``Subscription/[id]/$events``: the notification Bundle (type ``history``,
        status type ``query-event``) for event numbers ``since..until`` (both inclusive)."""
        params: list[tuple[str, ParamValue]] = []
        if since is not None:
            params.append(("eventsSinceNumber", since))
        if until is not None:
            params.append(("eventsUntilNumber", until))
        if content is not None:
            params.append(("content", content))
        return self.operation("$events", resource_type="Subscription", resource_id=subscription_id, params=params)

    def subscription_status(self, subscription_id: str) -> dict[str, Any]:
        """Backport IG ``Subscription/[id]/$status``: a searchset Bundle of status Parameters."""
        return self.operation("$status", resource_type="Subscription", resource_id=subscription_id)

    # --- bulk data ----------------------------------------------------------------------------
    def bulk_kickoff(
        self,
        *,
        group_id: str | None = None,
        patient_level: bool = False,
        types: Sequence[str] | None = None,
        since: datetime | str | None = None,
        type_filters: Sequence[str] | None = None,
    ) -> str:
        """Start an export (system, ``Patient/$export`` or ``Group/[id]/$export``); return the
        absolute status URL from ``Content-Location``."""
        if group_id is not None:
            url = self.url("Group", _check_id(group_id), "$export")
        elif patient_level:
            url = self.url("Patient", "$export")
        else:
            url = self.url("$export")
        query: list[tuple[str, str]] = [("_outputFormat", FHIR_NDJSON)]
        if types:
            query.append(("_type", ",".join(_check_type(t) for t in types)))
        if since is not None:
            query.append(("_since", _format_value(since)))
        for f in type_filters or ():
            query.append(("_typeFilter", f))
        resp = self._send("GET", url, params=query, headers={"Prefer": "respond-async"}, idempotent=False)
        self._raise_for_status(resp, "GET", url)
        if resp.status_code != 202:
            raise FhirPermanentError(f"bulk kick-off {redact_url(url)} -> {resp.status_code}, expected 202", url=url)
        location = resp.headers.get("Content-Location")
        if not location:
            raise FhirPermanentError(f"bulk kick-off {redact_url(url)} returned no Content-Location", url=url)
        status_url = urljoin(self.base_url + "/", location)
        if not self.is_same_origin(status_url):
            raise FhirPermanentError(f"bulk status URL is on another origin ({redact_url(status_url)})", url=status_url)
        return status_url

    def bulk_wait(
        self,
        status_url: str,
        *,
        max_wait_s: float = 3600.0,
        poll_default_s: float = 2.0,
        poll_max_s: float = 120.0,
    ) -> dict[str, Any]:
        """Poll the status URL until the manifest is ready (honouring ``Retry-After``, logging
        ``X-Progress``). Raises :class:`FhirTransientError` if ``max_wait_s`` would be exceeded."""
        if not self.is_same_origin(status_url):
            raise FhirPermanentError(f"bulk status URL is on another origin ({redact_url(status_url)})", url=status_url)
        deadline = self._clock() + max_wait_s
        interval = poll_default_s
        while True:
            resp = self._send("GET", status_url, headers={"Accept": "application/json"}, idempotent=True)
            if resp.status_code == 202:
                progress = _sanitize_progress(resp.headers.get("X-Progress"))
                hinted = parse_retry_after(resp.headers.get("Retry-After"))
                delay = min(hinted if hinted is not None else interval, poll_max_s)
                interval = min(interval * 1.5, poll_max_s)
                if self._clock() + delay > deadline:
                    raise FhirTransientError(f"bulk export not complete within {max_wait_s:.0f}s ({redact_url(status_url)})", url=status_url)
                log.info("bulk export in progress", extra={"progress": progress, "retry_in_s": round(delay, 3)})
                self._sleep(delay)
                continue
            self._raise_for_status(resp, "GET", status_url)
            manifest = json_object(resp, status_url)
            if not isinstance(manifest.get("output"), list):
                raise FhirPermanentError(f"bulk manifest from {redact_url(status_url)} has no output array", url=status_url)
            errors = manifest.get("error")
            if isinstance(errors, list) and errors:
                log.warning("bulk export reported error files", extra={"error_files": len(errors)})
            return manifest

    def bulk_download(self, manifest: Mapping[str, Any], *, types: Sequence[str] | None = None, key: str = "output") -> Iterator[dict[str, Any]]:
        """Stream the resources of the manifest's NDJSON files (``key="error"`` for the
        OperationOutcome files)."""
        requires_token = manifest.get("requiresAccessToken") is True
        wanted = set(types) if types else None
        items = manifest.get(key) or []
        if not isinstance(items, list):
            raise FhirPermanentError(f"bulk manifest {key} is not an array")
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("url"), str):
                raise FhirPermanentError(f"bulk manifest {key} item has no url")
            if wanted is not None and item.get("type") not in wanted:
                continue
            file_url = urljoin(self.base_url + "/", item["url"])
            if requires_token and not self.is_same_origin(file_url):
                raise FhirPermanentError(f"bulk file needs the access token but is on another origin ({redact_url(file_url)})", url=file_url)
            yield from self._ndjson(file_url, with_auth=requires_token)

    def bulk_cancel(self, status_url: str) -> None:
        """``DELETE`` the status URL (cancel a running export, or release a finished one). Best effort."""
        if not self.is_same_origin(status_url):
            return
        try:
            resp = self._send("DELETE", status_url, idempotent=True)
        except FhirError as exc:
            log.warning("bulk export cleanup failed: %s", exc)
            return
        if resp.status_code >= 400 and resp.status_code != 404:
            log.warning("bulk export cleanup -> %s", resp.status_code)

    def bulk_export(
        self,
        *,
        group_id: str | None = None,
        patient_level: bool = False,
        types: Sequence[str] | None = None,
        since: datetime | str | None = None,
        type_filters: Sequence[str] | None = None,
        max_wait_s: float = 3600.0,
        poll_default_s: float = 2.0,
        poll_max_s: float = 120.0,
        cleanup: bool = True,
    ) -> Iterator[dict[str, Any]]:
        """Kick off, wait, download: yield every exported resource. With ``cleanup`` the job is
        deleted on the server afterwards (or cancelled if the caller stops early or it fails)."""
        status_url = self.bulk_kickoff(group_id=group_id, patient_level=patient_level, types=types, since=since, type_filters=type_filters)
        try:
            manifest = self.bulk_wait(status_url, max_wait_s=max_wait_s, poll_default_s=poll_default_s, poll_max_s=poll_max_s)
            yield from self.bulk_download(manifest, types=types)
        finally:
            if cleanup:
                self.bulk_cancel(status_url)

    # --- transport ----------------------------------------------------------------------------
    def _retry_delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self._retry_after_max_s)
        ceiling = min(self._backoff_s * (2**attempt), self._retry_after_max_s)
        return self._rng.uniform(ceiling / 2, ceiling)

    def _send(
        self,
        method: str,
        url: str,
        *,
        params: Sequence[tuple[str, str]] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool,
        with_auth: bool = True,
        stream: bool = False,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """Send with retries; return the final response (any status) or raise FhirTransientError.

        Auth headers are attached only for the base URL's origin. With ``stream=True`` the
        caller must close the returned response.
        """
        attach_auth = with_auth and self._auth is not None and self.is_same_origin(url)
        refreshed = False
        attempt = 0
        timeout = httpx.Timeout(timeout_s) if timeout_s is not None else None
        while True:
            req_headers = dict(headers or {})
            token: str | None = None
            try:
                if attach_auth:
                    assert self._auth is not None
                    token = self._auth.get_token()
                    req_headers["Authorization"] = f"Bearer {token}"
                request = self._http.build_request(
                    method,
                    url,
                    params=list(params) if params else None,
                    content=content,
                    headers=req_headers,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
                started = time.monotonic()
                resp = self._http.send(request, stream=stream)
            except FhirTransientError as exc:  # token endpoint hiccup
                if attempt >= self.max_retries:
                    raise
                delay = self._retry_delay(attempt, exc.retry_after_s)
                log.warning("retrying %s %s after token error in %.2fs", method, redact_url(url), delay)
                self._sleep(delay)
                attempt += 1
                continue
            except httpx.TransportError as exc:
                never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
                kind = "timeout" if isinstance(exc, httpx.TimeoutException) else tls_problem(exc) or type(exc).__name__
                # a rejected certificate fails the same way on every attempt: reported at once, not after backoffs
                if attempt >= self.max_retries or not (idempotent or never_sent) or certificate_rejected(exc):
                    raise FhirTransientError(f"{method} {redact_url(url)} failed: {kind}", url=url) from exc
                delay = self._retry_delay(attempt, None)
                log.warning(
                    "retrying %s %s after %s in %.2fs (retry %d/%d)",
                    method,
                    redact_url(url),
                    kind,
                    delay,
                    attempt + 1,
                    self.max_retries,
                )
                self._sleep(delay)
                attempt += 1
                continue

            status = resp.status_code
            log.debug("%s %s -> %d", method, redact_url(url), status, extra={"elapsed_ms": round((time.monotonic() - started) * 1000)})
            if status == 401 and token is not None and not refreshed and getattr(self._auth, "refreshable", True):
                resp.close()
                assert self._auth is not None
                self._auth.invalidate(token)
                refreshed = True
                continue
            if status in RETRY_STATUSES:
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                may_retry = idempotent or status in UNPROCESSED_STATUSES
                too_long = retry_after is not None and retry_after > self._retry_after_max_s
                if attempt < self.max_retries and may_retry and not too_long:
                    resp.close()
                    delay = self._retry_delay(attempt, retry_after)
                    log.warning(
                        "retrying %s %s after %d in %.2fs (retry %d/%d)",
                        method,
                        redact_url(url),
                        status,
                        delay,
                        attempt + 1,
                        self.max_retries,
                    )
                    self._sleep(delay)
                    attempt += 1
                    continue
            return resp

    def _raise_for_status(
        self,
        resp: httpx.Response,
        method: str,
        url: str,
        *,
        resource_type: str | None = None,
        resource_id: str | None = None,
    ) -> None:
        status = resp.status_code
        if status < 400:
            return
        resp.close()
        where = f"{method} {redact_url(url)} -> {status}"
        if status in (401, 403):
            raise FhirAuthError(where, status=status, url=url)
        if status in (404, 410):
            raise FhirNotFound(where, status=status, url=url, resource_type=resource_type, resource_id=resource_id)
        if status == 429 or status >= 500:
            raise FhirTransientError(where, status=status, url=url, retry_after_s=parse_retry_after(resp.headers.get("Retry-After")))
        raise FhirPermanentError(where, status=status, url=url)

    def _resource(self, resp: httpx.Response, url: str, *, expect_type: str | None = None) -> dict[str, Any]:
        data = json_object(resp, url)
        if expect_type is not None and data.get("resourceType") != expect_type:
            raise FhirPermanentError(f"{redact_url(url)} returned a different resource type", url=url)
        return data

    def _written(self, resp: httpx.Response, url: str, resource_type: str) -> dict[str, Any]:
        """The resource after a write: the body, or (``return=minimal`` servers) a vread of Location."""
        if resp.content and resp.content.strip():
            data = json_object(resp, url)
            if data.get("resourceType") == resource_type:
                return data
        location = resp.headers.get("Location") or resp.headers.get("Content-Location")
        if location:
            parts = urlsplit(urljoin(self.base_url + "/", location)).path.rstrip("/").split("/")
            if len(parts) >= 4 and parts[-2] == "_history" and parts[-4] == resource_type:
                return self.vread(resource_type, parts[-3], parts[-1])
            if len(parts) >= 2 and parts[-2] == resource_type:
                return self.read(resource_type, parts[-1])
        raise FhirPermanentError(f"write to {redact_url(url)} returned neither the resource nor a Location", url=url)

    def _ndjson(self, url: str, *, with_auth: bool) -> Iterator[dict[str, Any]]:
        resp = self._send("GET", url, headers={"Accept": FHIR_NDJSON}, idempotent=True, with_auth=with_auth, stream=True)
        try:
            self._raise_for_status(resp, "GET", url)
            for lineno, line in enumerate(resp.iter_lines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise FhirPermanentError(f"invalid NDJSON at line {lineno} of {redact_url(url)}", url=url) from exc
                if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
                    raise FhirPermanentError(f"NDJSON line {lineno} of {redact_url(url)} is not a resource", url=url)
                yield obj
        except httpx.TransportError as exc:
            raise FhirTransientError(f"GET {redact_url(url)} failed mid-download: {type(exc).__name__}", url=url) from exc
        finally:
            resp.close()


# --- module helpers ---------------------------------------------------------------------------
def next_link(bundle: Mapping[str, Any]) -> str | None:
    """The Bundle's first ``next`` link as written (possibly relative)."""
    links = bundle.get("link")
    if not isinstance(links, list):
        return None
    for link in links:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str) and link["url"]:
            return str(link["url"])
    return None


def _entries(bundle: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    entries = bundle.get("entry")
    if isinstance(entries, list):
        yield from (entry for entry in entries if isinstance(entry, dict))


def entry_resources(bundle: Mapping[str, Any], *, include_included: bool) -> Iterator[dict[str, Any]]:
    """The entries' resources, without search outcomes (and without ``include`` entries unless asked)."""
    for entry in _entries(bundle):
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        search = entry.get("search")
        mode = search.get("mode") if isinstance(search, dict) else None
        if mode == "outcome" or (mode == "include" and not include_included):
            continue
        if mode is None and resource.get("resourceType") == "OperationOutcome":
            continue
        yield resource


@dataclass(frozen=True)
class HistoryEntry:
    """One entry of a history Bundle: a version of a resource (with its ``resource``), or its deletion
    (``deleted``). ``version_id`` and ``modified`` are None when the entry does not say."""

    resource_id: str
    version_id: str | None
    modified: datetime | None
    deleted: bool
    resource: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # a version's content


_REFERENCE_TAIL = re.compile(r"(?:^|/)([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/([A-Za-z0-9\-.]{1,64}))?/?$")
_ETAG_VERSION = re.compile(r'^(?:W/)?"?([A-Za-z0-9\-.]{1,64})"?$')


def split_reference(reference: str | None) -> tuple[str, str, str | None] | None:
    """``Type``, ``id`` and optional version from a relative or absolute literal reference."""
    if not reference:
        return None
    match = _REFERENCE_TAIL.search(reference)
    if not match:
        return None
    return match.group(1), match.group(2), match.group(3)


def history_entries(bundle: Mapping[str, Any], resource_type: str) -> Iterator[HistoryEntry]:
    """The entries of a history Bundle that are versions or deletions of ``resource_type``, in Bundle order.

    A deletion has no resource: its id comes from ``request.url`` (``Type/id``, HAPI adds ``/_history/n``), else
    ``response.location`` or ``fullUrl``; its version from ``response.etag``, else one of those URLs; its time from
    ``response.lastModified``. Entries that name no id of the type are skipped."""
    for entry in _entries(bundle):
        request, response = entry.get("request"), entry.get("response")
        request = request if isinstance(request, dict) else {}
        response = response if isinstance(response, dict) else {}
        resource = entry.get("resource")
        if request.get("method") != "DELETE":
            if isinstance(resource, dict) and resource.get("resourceType") == resource_type and isinstance(resource.get("id"), str):
                yield HistoryEntry(resource["id"], version_of(resource), last_updated_of(resource), False, resource)
            continue
        rid, version = None, None
        etag = response.get("etag")
        if isinstance(etag, str) and (tag := _ETAG_VERSION.match(etag.strip())):
            version = tag.group(1)
        for url in (request.get("url"), response.get("location"), entry.get("fullUrl")):
            found = split_reference(url.split("?", 1)[0].strip()) if isinstance(url, str) else None
            if found is None or found[0] != resource_type or (rid is not None and found[1] != rid):
                continue
            rid, version = found[1], version or found[2]
        if rid is not None:
            yield HistoryEntry(rid, version, parse_datetime(response.get("lastModified")), True)


def _checked_body(resource_type: str, resource: Mapping[str, Any], resource_id: str | None) -> dict[str, Any]:
    if not isinstance(resource, Mapping):
        raise ValueError("resource must be a JSON object")
    if resource.get("resourceType") != resource_type:
        raise ValueError("resource.resourceType does not match the resource type of the call")
    body = dict(resource)
    if resource_id is not None:
        if body.get("id") not in (None, resource_id):
            raise ValueError("resource.id does not match the id of the call")
        body["id"] = resource_id
    return body


def _parameters_resource(params: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": n, "valueString": v} for n, v in params]}


def client_from_settings(
    settings: Settings,
    *,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> FhirClient:
    """A :class:`FhirClient` for ``CDS_FHIR_BASE_URL`` with the configured auth mode, timeout,
    page limit and retry policy. Raises ``ValueError`` when the settings are incomplete."""
    if not settings.fhir_base_url:
        raise ValueError("CDS_FHIR_BASE_URL is not set")
    ssl_context = client_ssl_context(settings.tls_ca_file)
    auth: TokenProvider | None = None
    if settings.fhir_auth_mode == "bearer":
        if settings.fhir_bearer_token is None or not settings.fhir_bearer_token.get_secret_value():
            raise ValueError("CDS_FHIR_AUTH_MODE=bearer needs CDS_FHIR_BEARER_TOKEN")
        auth = StaticBearer(settings.fhir_bearer_token.get_secret_value())
    elif settings.fhir_auth_mode == "smart-backend":
        from service.fhir.smart import SmartBackendAuth

        try:
            auth = SmartBackendAuth.from_settings(settings, transport=transport)
        except FhirAuthError as exc:
            raise ValueError(str(exc)) from exc
    return FhirClient(
        settings.fhir_base_url,
        auth=auth,
        timeout_s=settings.fhir_timeout_s,
        max_pages=settings.fhir_max_pages,
        max_retries=settings.fhir_max_retries,
        backoff_s=settings.fhir_retry_backoff_s,
        retry_after_max_s=settings.fhir_retry_after_max_s,
        transport=transport,
        sleep=sleep,
        close_auth=True,
        ssl_context=ssl_context,
    )
