"""Fetch the prefetch data an EHR did not send, from its ``fhirServer`` with its ``fhirAuthorization`` token.

CDS Hooks 2.0: a prefetch key that is absent (or holds an OperationOutcome) is fetched by the service;
``null`` means "no data" and is not refetched. Queries run concurrently, each with a timeout, following
``next`` links on the same origin up to a bound. ``fhirServer`` must be https and on the allowlist (no
server-side request forgery), except in development mode.

The client is aiohttp rather than the httpx the rest of ``service.fhir`` uses: a fallback call makes one
request per missing key, and on this path httpx's connection pool cost 8-17 ms of CPU per call of seven
requests against aiohttp's 1.5-2.1 ms (docs/benchmarks.md). The session is opened lazily on the event loop
that first uses it (the fetcher is built before uvicorn starts its loop) and closed by :meth:`aclose`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
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
    """Concurrent, bounded FHIR reads for one event loop at a time (``aclose`` on that loop when done).

    :param proxy: an HTTP proxy URL for every fetch (``CDS_HOOK_FETCH_PROXY``); None connects directly. The
        environment's proxy variables and ``.netrc`` are not consulted: aiohttp would read them on every request,
        in two thread-pool hops, and settings come only from ``service.config``.
    :param connector: a factory of the aiohttp connector; default a ``TCPConnector`` (at most 100 connections).
    """

    def __init__(
        self,
        *,
        timeout_s: float,
        max_pages: int,
        proxy: str | None = None,
        connector: Callable[[], aiohttp.BaseConnector] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.max_pages = max_pages
        self.proxy = proxy
        self._connector = connector
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or session.closed or self._loop is not loop:
            if session is not None and not session.closed and self._loop is not None and self._loop.is_closed():
                # left open on a loop that has ended (tests run one loop after another): its connections died
                # with that loop; mark it closed so nothing warns about it later
                connector = session.connector
                session.detach()
                if connector is not None:
                    await connector.close()
            session = aiohttp.ClientSession(
                connector=self._connector() if self._connector is not None else None,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers={"Accept": "application/fhir+json"},
                trust_env=False,
                raise_for_status=False,
            )
            self._session, self._loop = session, loop
        return session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed and self._loop is asyncio.get_running_loop():
            await session.close()

    async def fetch_all(self, base: str, token: str | None, queries: dict[str, str]) -> dict[str, FetchResult]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = await self._client()
        keys = list(queries)
        results = await asyncio.gather(*(self._fetch(client, base, queries[k], headers) for k in keys))
        return dict(zip(keys, results, strict=True))

    async def _fetch(self, client: aiohttp.ClientSession, base: str, query: str, headers: dict[str, str]) -> FetchResult:
        root = base.rstrip("/") + "/"
        server = origin_of(base)
        url: str | None = root + query.lstrip("/")
        result = FetchResult()
        try:
            async with asyncio.timeout(self.timeout_s * self.max_pages):
                pages = 0
                while url is not None and pages < self.max_pages:
                    async with client.get(url, headers=headers, allow_redirects=False, proxy=self.proxy) as response:
                        pages += 1
                        if response.status >= 300:  # redirects are not followed (the allowlist names the server)
                            result.error = f"HTTP {response.status}"
                            return result
                        body = await response.read()
                    doc = orjson.loads(body)
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
        except TimeoutError:  # aiohttp's timeouts are TimeoutError too
            result.error = "timed out"
        except aiohttp.ClientError as exc:
            result.error = f"unreachable ({type(exc).__name__})"
        except orjson.JSONDecodeError:
            result.error = "response is not JSON"
        except ValueError:  # a URL aiohttp/yarl cannot send (after the JSON error, which is a ValueError too)
            result.error = "not a valid request URL"
        return result
