"""Typed errors of the FHIR layer.

Every message carries at most an HTTP method, a status code and a URL *without its query
string*: FHIR search queries hold patient ids and codes (``Observation?patient=123``), and
response bodies (OperationOutcome diagnostics, resources) can hold any PHI, so neither ever
reaches an exception message or a log line. Resource paths (``Patient/123``) are kept: they are
what an operator needs to find the failing call, and they are logged at the same level as the
rest of the request line in any FHIR server.

Hierarchy::

    FhirError
    ├── FhirTransientError      timeouts, connection errors, 429, 5xx (after retries)
    └── FhirPermanentError      4xx other than 429, invalid JSON, protocol violations
        ├── FhirNotFound        404 Not Found / 410 Gone (carries resource type and id)
        └── FhirAuthError       401/403, token endpoint refusals, unusable credentials
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

__all__ = [
    "FhirAuthError",
    "FhirError",
    "FhirNotFound",
    "FhirPermanentError",
    "FhirTransientError",
    "redact_url",
]


def redact_url(url: object) -> str:
    """A URL without its query string, fragment or userinfo (``http://h/fhir/Observation``).

    Accepts anything with a ``str()`` (``httpx.URL`` included). Never raises: an unparsable value
    is reduced to ``"<url>"`` rather than echoed.
    """
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<url>"
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        netloc = f"{netloc}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class FhirError(Exception):
    """Base of every error raised by :mod:`service.fhir`.

    ``status`` is the HTTP status when one was received; ``url`` is already redacted.
    """

    def __init__(self, message: str, *, status: int | None = None, url: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.url = redact_url(url) if url is not None else None


class FhirTransientError(FhirError):
    """Worth retrying later: timeout, connection failure, 429 or 5xx once retries are exhausted.

    ``retry_after_s`` is the server's last ``Retry-After`` hint (seconds), if it sent one, so a
    task queue can schedule the next attempt accordingly.
    """

    def __init__(self, message: str, *, status: int | None = None, url: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message, status=status, url=url)
        self.retry_after_s = retry_after_s


class FhirPermanentError(FhirError):
    """Retrying the same request will not help: a 4xx (other than 429) or an unusable response."""


class FhirNotFound(FhirPermanentError):
    """404 Not Found or 410 Gone (``gone=True``: the resource existed and was deleted)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = 404,
        url: str | None = None,
        resource_type: str | None = None,
        resource_id: str | None = None,
    ) -> None:
        super().__init__(message, status=status, url=url)
        self.resource_type = resource_type
        self.resource_id = resource_id

    @property
    def gone(self) -> bool:
        return self.status == 410


class FhirAuthError(FhirPermanentError):
    """401/403 from the FHIR server, or the SMART token endpoint refused the client."""


def json_object(resp: httpx.Response, url: str, what: str = "") -> dict[str, Any]:
    """The response body as a JSON object, or :class:`FhirPermanentError` (empty, not JSON, not an object) naming
    ``what`` and the redacted URL, never the body."""
    prefix = f"{what}: " if what else ""
    if not resp.content:
        raise FhirPermanentError(f"{prefix}empty body from {redact_url(url)}", status=resp.status_code, url=url)
    try:
        data = orjson.loads(resp.content)
    except orjson.JSONDecodeError as exc:
        raise FhirPermanentError(f"{prefix}invalid JSON from {redact_url(url)}", status=resp.status_code, url=url) from exc
    if not isinstance(data, dict):
        raise FhirPermanentError(f"{prefix}JSON from {redact_url(url)} is not an object", status=resp.status_code, url=url)
    return data
