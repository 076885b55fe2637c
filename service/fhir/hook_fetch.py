"""Fetch the prefetch data an EHR did not send, from its ``fhirServer`` with its ``fhirAuthorization`` token.

CDS Hooks 2.0: a prefetch key that is absent (or holds an OperationOutcome) is fetched by the service;
``null`` means "no data" and is not refetched. Queries run concurrently, each with a timeout, following
``next`` links on the same origin up to a bound. ``fhirServer`` must be https and on the allowlist (no
server-side request forgery), except in development mode.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import orjson

from service.fhir.client import entry_resources, next_link, origin_of


class FetchRefused(Exception):
    """The fhirServer is not allowed (scheme or allowlist)."""


@dataclass
class FetchResult:
    resources: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # short, value-free reason


def check_fhir_server(url: str, allowlist: list[str], dev_mode: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise FetchRefused("fhirServer is not an absolute http(s) URL")
    if dev_mode:
        return
    if parts.scheme != "https":
        raise FetchRefused("fhirServer must use https")
    normalized = url.rstrip("/") + "/"
    if not any(normalized.startswith(a.rstrip("/") + "/") for a in allowlist):
        raise FetchRefused("fhirServer is not on the allowlist")


class HookFetcher:
    def __init__(self, *, timeout_s: float, max_pages: int, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.timeout_s = timeout_s
        self.max_pages = max_pages
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), transport=transport, follow_redirects=False, headers={"Accept": "application/fhir+json"}
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch_all(self, base: str, token: str | None, queries: dict[str, str]) -> dict[str, FetchResult]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        keys = list(queries)
        results = await asyncio.gather(*(self._fetch(base, queries[k], headers) for k in keys))
        return dict(zip(keys, results, strict=True))

    async def _fetch(self, base: str, query: str, headers: dict[str, str]) -> FetchResult:
        root = base.rstrip("/") + "/"
        server = origin_of(base)
        url: str | None = root + query.lstrip("/")
        result = FetchResult()
        try:
            async with asyncio.timeout(self.timeout_s * self.max_pages):
                pages = 0
                while url is not None and pages < self.max_pages:
                    response = await self._client.get(url, headers=headers)
                    pages += 1
                    if response.status_code >= 400:
                        result.error = f"HTTP {response.status_code}"
                        return result
                    doc = orjson.loads(response.content)
                    if not isinstance(doc, dict):
                        result.error = "response is not a FHIR resource"
                        return result
                    url = None
                    if doc.get("resourceType") == "Bundle":
                        result.resources.extend(entry_resources(doc, include_included=True))
                        nxt = next_link(doc)
                        if nxt is not None:
                            nxt = urljoin(root, nxt)
                            url = nxt if origin_of(nxt) == server else None  # never follow a link off the server
                    elif doc.get("resourceType") == "OperationOutcome":
                        result.error = "server answered an OperationOutcome"
                    else:
                        result.resources.append(doc)
        except (TimeoutError, httpx.TimeoutException):
            result.error = "timed out"
        except httpx.HTTPError as exc:
            result.error = f"unreachable ({type(exc).__name__})"
        except orjson.JSONDecodeError:
            result.error = "response is not JSON"
        return result
