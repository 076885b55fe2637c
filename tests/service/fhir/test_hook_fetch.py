"""The prefetch fallback fetcher against a FHIR server on a real socket (aiohttp's web server in the same loop):
paging by next links resolved against the server and never followed off it, bounded in pages; the EHR's token;
concurrent keys; every failure a short reason, never an exception."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from service.fhir.hook_fetch import FetchRefused, FetchResult, HookFetcher, check_fhir_server
from tests.service.api.support import closed_port_url

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bundle(ids: list[str], next_url: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "Observation", "id": i}, "search": {"mode": "match"}} for i in ids]
        + [{"resource": {"resourceType": "OperationOutcome", "issue": []}, "search": {"mode": "outcome"}}],
    }
    if next_url is not None:
        doc["link"] = [{"relation": "self", "url": "ignored"}, {"relation": "next", "url": next_url}]
    return doc


def fhir_json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/fhir+json")


async def serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/fhir"


def fetch(
    handler_for: Callable[[str], Handler],
    queries: dict[str, str] | Callable[[str], dict[str, str]] | None = None,
    *,
    rest: bool = False,
    max_pages: int = 5,
    timeout_s: float = 5,
    max_bytes: int = 1_000_000,
) -> dict[str, FetchResult]:
    """Start a server whose handler knows its own base URL, fetch ``queries`` (or ``queries(base)``) from it, stop
    both. ``rest``: they are the next links of prefetched searchsets (``fetch_rest``), not queries."""

    async def run() -> dict[str, FetchResult]:
        base_box: list[str] = []

        async def handler(request: web.Request) -> web.StreamResponse:
            return await handler_for(base_box[0])(request)

        runner, base = await serve(handler)
        base_box.append(base)
        fetcher = HookFetcher(timeout_s=timeout_s, max_pages=max_pages, max_bytes=max_bytes)
        asked = queries(base) if callable(queries) else queries or {"labs": "Observation?patient=p1"}
        try:
            return await (fetcher.fetch_rest if rest else fetcher.fetch_all)(base, "t0k3n", asked)
        finally:
            await fetcher.aclose()
            await runner.cleanup()

    return asyncio.run(run())


def pages_handler(pages: Callable[[str], dict[str, Any]], seen: list[str]) -> Callable[[str], Handler]:
    """Answer from ``pages(base)``, keyed by path and query, recording what was asked."""

    def for_base(base: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            key = request.path_qs
            seen.append(key)
            answers = pages(base)
            return fhir_json(answers[key]) if key in answers else fhir_json({"resourceType": "OperationOutcome"}, 404)

        return handler

    return for_base


def ids(result: FetchResult) -> list[str]:
    return [r["id"] for r in result.resources]


def test_relative_and_absolute_next_links_on_the_same_server_are_followed() -> None:
    seen: list[str] = []

    def pages(base: str) -> dict[str, Any]:
        shouting = base.replace("http://", "HTTP://")  # the same origin, written differently
        return {
            "/fhir/Observation?patient=p1": bundle(["a"], "Observation?patient=p1&page=2"),
            "/fhir/Observation?patient=p1&page=2": bundle(["b"], f"{shouting}/Observation?patient=p1&page=3"),
            "/fhir/Observation?patient=p1&page=3": bundle(["c"]),
        }

    result = fetch(pages_handler(pages, seen))["labs"]
    assert (ids(result), result.error, len(seen)) == (["a", "b", "c"], None, 3)


@pytest.mark.parametrize(
    "next_for",
    [
        lambda base: "http://elsewhere.invalid/fhir/Observation?page=2",  # another server
        lambda base: f"{base.replace('/fhir', '/fhir-other')}/Observation?page=2",  # another tenant's base, same host
        lambda base: f"{base}/../tenant2/Observation?page=2",  # resolved by the client to /tenant2/…
        lambda base: "%2e%2e/other/Observation?page=2",  # the same, encoded and relative
        lambda base: f"{base}/.%2E/other/Observation?page=2",
    ],
    ids=["another-server", "another-base-on-the-same-host", "dot-segments", "encoded-dot-segments", "mixed-dot-segments"],
)
def test_a_next_link_off_the_fhir_base_is_not_followed(next_for: Callable[[str], str]) -> None:
    """Neither another server nor another FHIR base on the same origin ever gets this EHR's token; the key is
    marked as fetched in part."""
    seen: list[str] = []

    def pages(base: str) -> dict[str, Any]:
        return {"/fhir/Observation?patient=p1": bundle(["a"], next_for(base))}

    result = fetch(pages_handler(pages, seen))["labs"]
    assert (ids(result), result.error, seen) == (["a"], None, ["/fhir/Observation?patient=p1"])
    assert result.cut == "a next link is not under fhirServer"


def test_the_rest_of_a_prefetched_searchset_is_fetched_from_its_next_link_under_the_base_only() -> None:
    """A paged prefetch: the pages after the first, from each key's next link (relative or absolute), never off the
    fhirServer base: that key gets a reason, and the EHR's token goes nowhere else."""
    seen: list[str] = []
    pages = {
        "/fhir/Observation?patient=p1&page=2": bundle(["b"], "Observation?patient=p1&page=3"),
        "/fhir/Observation?patient=p1&page=3": bundle(["c"]),
        "/fhir/Condition?patient=p1&page=2": bundle(["d"]),
    }

    def links(base: str) -> dict[str, str]:
        return {
            "observations": "Observation?patient=p1&page=2",
            "conditions": f"{base}/Condition?patient=p1&page=2",
            "medicationRequests": "http://elsewhere.invalid/fhir/MedicationRequest?page=2",
        }

    results = fetch(pages_handler(lambda _: pages, seen), links, rest=True)
    assert (ids(results["observations"]), results["observations"].error) == (["b", "c"], None)
    assert (ids(results["conditions"]), results["conditions"].error) == (["d"], None)
    assert (ids(results["medicationRequests"]), results["medicationRequests"].cut) == ([], "a next link is not under fhirServer")
    assert sorted(seen) == sorted(pages)


def test_a_next_link_to_the_base_itself_is_followed() -> None:
    """HAPI pages at the base URL (``/fhir?_getpages=…``), without the trailing slash."""
    seen: list[str] = []

    def pages(base: str) -> dict[str, Any]:
        return {
            "/fhir/Observation?patient=p1": bundle(["a"], f"{base}?_getpages=abc&_getpagesoffset=1"),
            "/fhir?_getpages=abc&_getpagesoffset=1": bundle(["b"]),
        }

    result = fetch(pages_handler(pages, seen))["labs"]
    assert (ids(result), result.error, len(seen)) == (["a", "b"], None, 2)


def test_paging_stops_at_max_pages() -> None:
    seen: list[str] = []
    pages = {
        "/fhir/Observation?patient=p1": bundle(["a"], "Observation?patient=p1&page=2"),
        "/fhir/Observation?patient=p1&page=2": bundle(["b"], "Observation?patient=p1"),  # a loop
    }
    result = fetch(pages_handler(lambda _base: pages, seen), max_pages=3)["labs"]
    assert (ids(result), result.error, len(seen)) == (["a", "b", "a"], None, 3)
    assert result.cut == "more than 3 pages"  # the rest is not silently dropped: the call's log line names it


def test_the_ehr_token_and_the_fhir_media_type_are_sent_and_a_read_is_one_resource() -> None:
    asked: list[tuple[str | None, str | None]] = []

    def for_base(_base: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            asked.append((request.headers.get("Authorization"), request.headers.get("Accept")))
            return fhir_json({"resourceType": "Patient", "id": "p1"})

        return handler

    result = fetch(for_base, {"patient": "Patient/p1"})["patient"]
    assert ([r["id"] for r in result.resources], result.error) == (["p1"], None)
    assert asked == [("Bearer t0k3n", "application/fhir+json")]


def test_keys_are_fetched_concurrently() -> None:
    """Each answer waits until all three requests have arrived: only concurrent requests can all succeed."""
    arrived = 0
    all_in = asyncio.Event()

    def for_base(_base: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            nonlocal arrived
            arrived += 1
            if arrived == 3:
                all_in.set()
            await asyncio.wait_for(all_in.wait(), timeout=2)
            return fhir_json(bundle([request.path.rsplit("/", 1)[-1]]))

        return handler

    results = fetch(for_base, {"labs": "Observation", "problems": "Condition", "procedures": "Procedure"})
    assert {k: (ids(r), r.error) for k, r in results.items()} == {
        "labs": (["Observation"], None),
        "problems": (["Condition"], None),
        "procedures": (["Procedure"], None),
    }


def test_each_failure_is_a_short_reason_and_the_other_keys_still_arrive() -> None:
    def for_base(base: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            kind = request.path.rsplit("/", 1)[-1]
            if kind == "ok":
                return fhir_json(bundle(["x"]))
            if kind == "forbidden":
                return fhir_json({"resourceType": "OperationOutcome"}, 403)
            if kind == "redirect":  # never followed, even to the same server
                raise web.HTTPFound(f"{base}/ok")
            if kind == "html":
                return web.Response(text="<html>login</html>", content_type="text/html")
            if kind == "array":
                return fhir_json([{"resourceType": "Observation"}])
            if kind == "outcome":
                return fhir_json({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing"}]})
            if kind == "big":  # announced too large
                return web.Response(body=b" " * 2_000, content_type="application/fhir+json")
            # "streamed": too large, without a Content-Length
            response = web.StreamResponse(headers={"Content-Type": "application/fhir+json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(4):
                await response.write(b" " * 600)
            await response.write_eof()
            return response

        return handler

    keys = ["ok", "forbidden", "redirect", "html", "array", "outcome", "big", "streamed"]
    results = fetch(for_base, {k: k for k in keys}, max_bytes=1_000)
    assert {k: r.error for k, r in results.items()} == {
        "ok": None,
        "forbidden": "HTTP 403",
        "redirect": "HTTP 302",
        "html": "response is not JSON",
        "array": "response is not a FHIR resource",
        "outcome": "server answered an OperationOutcome",
        "big": "response larger than 1000 bytes",
        "streamed": "response larger than 1000 bytes",
    }
    assert ids(results["ok"]) == ["x"]


def test_a_server_slower_than_the_timeout_is_timed_out() -> None:
    def for_base(_base: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(0.6)  # well past the 0.2 s timeout; the server's shutdown waits for it
            return fhir_json(bundle(["late"]))

        return handler

    result = fetch(for_base, {"labs": "Observation"}, timeout_s=0.2)["labs"]
    assert (result.resources, result.error) == ([], "timed out")


def test_a_server_that_refuses_connections_is_unreachable() -> None:
    async def run() -> FetchResult:
        fetcher = HookFetcher(timeout_s=2, max_pages=1)
        try:
            return (await fetcher.fetch_all(closed_port_url(), None, {"labs": "Observation"}))["labs"]
        finally:
            await fetcher.aclose()

    result = asyncio.run(run())
    assert (result.resources, result.error) == ([], "unreachable (ClientConnectorError)")


def test_one_fetcher_serves_one_loop_after_another() -> None:
    """Built before any loop runs (as the app builds it), then used from two loops in turn."""
    fetcher = HookFetcher(timeout_s=2, max_pages=1)

    async def once() -> list[str]:
        runner, base = await serve(lambda _r: fhir_json(bundle(["a"])))
        try:
            return ids((await fetcher.fetch_all(base, None, {"labs": "Observation"}))["labs"])
        finally:
            await runner.cleanup()

    async def once_and_close() -> list[str]:
        try:
            return await once()
        finally:
            await fetcher.aclose()

    assert asyncio.run(once()) == ["a"]  # left open: a later loop opens its own session
    assert asyncio.run(once_and_close()) == ["a"]


def test_a_configured_proxy_carries_every_fetch_and_the_environment_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the configured proxy (an HTTP server that answers absolute-form requests) can have answered for a host that
    is not this one. ``HTTP_PROXY`` names another recording server, which must see nothing: settings come from
    ``service.config``, not the environment."""
    asked: dict[str, list[str]] = {"configured": [], "environment": []}

    def recording(name: str) -> Handler:
        async def proxy(request: web.Request) -> web.StreamResponse:
            asked[name].append(str(request.url))
            return fhir_json(bundle([f"via-{name}"]))

        return proxy

    async def run(use_proxy: bool) -> FetchResult:
        configured, configured_base = await serve(recording("configured"))
        environment, environment_base = await serve(recording("environment"))
        monkeypatch.setenv("HTTP_PROXY", environment_base.removesuffix("/fhir"))
        monkeypatch.setenv("http_proxy", environment_base.removesuffix("/fhir"))
        target = closed_port_url() if not use_proxy else "http://ehr.example.org/fhir"
        fetcher = HookFetcher(timeout_s=2, max_pages=1, proxy=configured_base.removesuffix("/fhir") if use_proxy else None)
        try:
            return (await fetcher.fetch_all(target, "t", {"labs": "Observation?patient=p1"}))["labs"]
        finally:
            await fetcher.aclose()
            await configured.cleanup()
            await environment.cleanup()

    through = asyncio.run(run(True))
    assert (ids(through), through.error) == (["via-configured"], None)
    assert asked["configured"] == ["http://ehr.example.org/fhir/Observation?patient=p1"]

    direct = asyncio.run(run(False))  # no proxy configured: a direct connection, refused
    assert direct.error == "unreachable (ClientConnectorError)"
    assert asked == {"configured": ["http://ehr.example.org/fhir/Observation?patient=p1"], "environment": []}


def test_after_aclose_every_key_answers_shutting_down() -> None:
    async def run() -> dict[str, FetchResult]:
        fetcher = HookFetcher(timeout_s=1, max_pages=1)
        await fetcher.aclose()
        return await fetcher.fetch_all(closed_port_url(), None, {"labs": "Observation", "problems": "Condition"})

    assert {k: r.error for k, r in asyncio.run(run()).items()} == dict.fromkeys(("labs", "problems"), "the service is shutting down")


@pytest.mark.parametrize(
    ("server", "allowed"),
    [
        ("https://ehr.example.org/fhir", True),
        ("https://ehr.example.org/fhir/", True),
        ("https://EHR.example.org:443/fhir", True),  # the same origin, written differently
        ("https://ehr.example.org/fhir/tenant-a", True),  # under the allowlisted base
        ("https://ehr.example.org/fhir-other", False),  # a sibling base on the same host
        ("https://ehr.example.org", False),
        ("https://ehr.example.org.evil.example/fhir", False),
        ("https://ehr.example.org:8443/fhir", False),
        ("http://ehr.example.org/fhir", False),  # https only outside development mode
        ("ftp://ehr.example.org/fhir", False),
    ],
)
def test_the_fhir_server_must_be_under_an_allowlisted_base(server: str, allowed: bool) -> None:
    try:
        check_fhir_server(server, ["https://ehr.example.org/fhir/"], dev_mode=False)
        refused = None
    except FetchRefused as exc:
        refused = str(exc)
    assert (refused is None) == allowed, refused


def test_development_mode_accepts_any_http_server_but_not_another_scheme() -> None:
    check_fhir_server("http://127.0.0.1:8080/fhir", [], dev_mode=True)
    with pytest.raises(FetchRefused, match="absolute http"):
        check_fhir_server("file:///etc/passwd", [], dev_mode=True)
