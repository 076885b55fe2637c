"""Fetch the prefetch data an EHR did not send, from its ``fhirServer`` with its ``fhirAuthorization`` token.

CDS Hooks 2.0: a prefetch key that is absent (or holds an OperationOutcome) is fetched by the service;
``null`` means "no data" and is not refetched. Queries run concurrently, each with a timeout, following
``next`` links under the fhirServer base (:func:`service.fhir.client.within_base`) up to a bound. ``fhirServer``
must be https and on the allowlist (no server-side request forgery), except in development mode.

The client is aiohttp rather than the httpx the rest of ``service.fhir`` uses: a fallback call makes one
request per missing key, and on this path httpx's connection pool cost 8-17 ms of CPU per call of seven
requests against aiohttp's 1.5-2.1 ms (docs/benchmarks.md). The session is opened lazily on the event loop
that first uses it (the fetcher is built before uvicorn starts its loop) and closed by :meth:`aclose`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson

from service.fhir.client import FHIR_JSON, PRODUCT, entry_resources, next_link, within_base
from service.tls import client_ssl_context, tls_problem

_OFF_BASE = "a next link is not under fhirServer"


class FetchRefused(Exception):
    """The fhirServer is not allowed (scheme or allowlist)."""


@dataclass
class FetchResult:
    resources: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # short, value-free reason
    cut: str | None = None  # why the pages after those fetched were not (value-free): the resources are a part


def check_fhir_server(url: str, allowlist: list[str], dev_mode: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise FetchRefused("fhirServer is not an absolute http(s) URL")
    if dev_mode:
        return
    if parts.scheme != "https":
        raise FetchRefused("fhirServer must use https")
    if not any(within_base(url, allowed) for allowed in allowlist):  # the rule next links follow too
        raise FetchRefused("fhirServer is not on the allowlist")


class HookFetcher:
    """Concurrent, bounded FHIR reads for one event loop at a time (``aclose`` on that loop when done).

    :param max_bytes: the largest response body read (compressed bodies are counted as decompressed); a larger one
        is an error for its key.
    :param proxy: an HTTP proxy URL for every fetch (``CDS_HOOK_FETCH_PROXY``); None connects directly. The
        environment's proxy variables and ``.netrc`` are not consulted: aiohttp would read them on every request,
        in two thread-pool hops, and settings come only from ``service.config``.
    :param ssl_context: the TLS trust of the default connector (:func:`service.tls.client_ssl_context`, the same
        as the httpx clients'; default: without an extra CA file).
    :param connector: a factory of the aiohttp connector; default a ``TCPConnector`` (at most 100 connections)
        with ``ssl_context``.
    """

    def __init__(
        self,
        *,
        timeout_s: float,
        max_pages: int,
        max_bytes: int = 20_000_000,
        proxy: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connector: Callable[[], aiohttp.BaseConnector] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.max_pages = max_pages
        self.max_bytes = max_bytes
        self.proxy = proxy
        context = ssl_context if ssl_context is not None else client_ssl_context(owner="aiohttp")
        self._connector = connector or (lambda: aiohttp.TCPConnector(ssl=context))
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or session.closed or self._loop is not loop:
            if session is not None and not session.closed and self._loop is not None and self._loop.is_closed():
                # left open on a loop that has ended (tests run one loop after another): mark it and its connector
                # closed; the sockets went with that loop
                connector = session.connector
                session.detach()
                if connector is not None:
                    await connector.close()
            session = aiohttp.ClientSession(
                connector=self._connector(),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers={"Accept": FHIR_JSON, "User-Agent": f"{PRODUCT} (+aiohttp)"},
                trust_env=False,
                raise_for_status=False,
            )
            self._session, self._loop = session, loop
        return session

    async def aclose(self) -> None:
        """Close the session; later fetches answer "shutting down" for every key instead of opening another."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and not session.closed and self._loop is asyncio.get_running_loop():
            await session.close()

    async def fetch_all(self, base: str, token: str | None, queries: dict[str, str]) -> dict[str, FetchResult]:
        """Each query (relative to ``base``), with its ``next`` pages."""
        root = base.rstrip("/") + "/"
        return await self._gather(root, token, {k: root + q.lstrip("/") for k, q in queries.items()})

    async def fetch_rest(self, base: str, token: str | None, next_links: dict[str, str]) -> dict[str, FetchResult]:
        """The pages after the first of searchsets the EHR prefetched (CDS Hooks 2.0 lets prefetch results be
        paged): from each one's ``next`` link, which must lie under ``base`` like every page followed."""
        root = base.rstrip("/") + "/"
        return await self._gather(root, token, {k: urljoin(root, link) for k, link in next_links.items()})

    async def _gather(self, root: str, token: str | None, urls: dict[str, str]) -> dict[str, FetchResult]:
        if self._closed:
            return {k: FetchResult(error="the service is shutting down") for k in urls}
        if not urls:
            return {}
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = await self._client()
        keys = list(urls)
        results = await asyncio.gather(*(self._fetch(client, root, urls[k], headers) for k in keys))
        return dict(zip(keys, results, strict=True))

    async def _fetch(self, client: aiohttp.ClientSession, root: str, first: str, headers: dict[str, str]) -> FetchResult:
        """``first`` and its ``next`` pages, each only under ``root`` (the token goes nowhere else) and at most
        ``max_pages``; where either stops the chain, ``cut`` says so."""
        url: str | None = first
        result = FetchResult()
        try:
            async with asyncio.timeout(self.timeout_s * self.max_pages):
                pages = 0
                while url is not None:
                    if pages == self.max_pages:
                        result.cut = f"more than {self.max_pages} pages"
                        break
                    if not within_base(url, root):
                        result.cut = _OFF_BASE
                        break
                    async with client.get(url, headers=headers, allow_redirects=False, proxy=self.proxy) as response:
                        pages += 1
                        if response.status >= 300:  # redirects are not followed (the allowlist names the server)
                            result.error = f"HTTP {response.status}"
                            return result
                        body = await self._read(response)
                    if body is None:
                        result.error = f"response larger than {self.max_bytes} bytes"
                        return result
                    doc = orjson.loads(body)
                    if not isinstance(doc, dict):
                        result.error = "response is not a FHIR resource"
                        return result
                    url = None
                    if doc.get("resourceType") == "Bundle":
                        result.resources.extend(entry_resources(doc, include_included=True))
                        nxt = next_link(doc)
                        url = urljoin(root, nxt) if nxt is not None else None
                    elif doc.get("resourceType") == "OperationOutcome":
                        result.error = "server answered an OperationOutcome"
                    else:
                        result.resources.append(doc)
        except TimeoutError:  # aiohttp's timeouts are TimeoutError too
            result.error = "timed out"
        except (aiohttp.ClientError, OSError) as exc:  # OSError: a socket or TLS error aiohttp did not wrap
            problem = tls_problem(exc)
            result.error = f"unreachable ({problem or type(exc).__name__})"
        except orjson.JSONDecodeError:
            result.error = "response is not JSON"
        except (ValueError, RuntimeError) as exc:
            # ValueError: a URL or header aiohttp/yarl refuses to send (checked after the JSON error, a ValueError
            # too); RuntimeError: the session was closed between two pages at shutdown
            result.error = f"request could not be made ({type(exc).__name__})"
        return result

    async def _read(self, response: aiohttp.ClientResponse) -> bytes | None:
        """The body, or None past ``max_bytes`` (announced or counted while reading)."""
        if response.content_length is not None and response.content_length > self.max_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)
