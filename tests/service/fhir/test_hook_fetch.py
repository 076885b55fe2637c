"""Prefetch fallback paging: next links resolved against the server, never followed off it, bounded in pages."""

from __future__ import annotations

import asyncio

import httpx

from service.fhir.hook_fetch import HookFetcher

BASE = "https://ehr.example.org/fhir"


def bundle(ids: list[str], next_url: str | None = None) -> dict:
    doc: dict = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "Observation", "id": i}, "search": {"mode": "match"}} for i in ids]
        + [{"resource": {"resourceType": "OperationOutcome", "issue": []}, "search": {"mode": "outcome"}}],
    }
    if next_url is not None:
        doc["link"] = [{"relation": "self", "url": "ignored"}, {"relation": "next", "url": next_url}]
    return doc


def fetch(pages: dict[str, dict], max_pages: int = 5) -> tuple[list[str], str | None, list[str]]:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json=pages[request.url.path + ("?" + request.url.query.decode() if request.url.query else "")])

    async def run():
        fetcher = HookFetcher(timeout_s=5, max_pages=max_pages, transport=httpx.MockTransport(handler))
        try:
            return (await fetcher.fetch_all(BASE, "t", {"labs": "Observation?patient=p1"}))["labs"]
        finally:
            await fetcher.aclose()

    result = asyncio.run(run())
    return [r["id"] for r in result.resources], result.error, seen


def test_relative_and_absolute_next_links_on_the_same_server_are_followed() -> None:
    ids, error, seen = fetch({
        "/fhir/Observation?patient=p1": bundle(["a"], "Observation?patient=p1&page=2"),
        "/fhir/Observation?patient=p1&page=2": bundle(["b"], "HTTPS://EHR.example.org:443/fhir/Observation?patient=p1&page=3"),
        "/fhir/Observation?patient=p1&page=3": bundle(["c"]),
    })
    assert (ids, error, len(seen)) == (["a", "b", "c"], None, 3)


def test_a_next_link_to_another_server_is_not_followed() -> None:
    ids, error, seen = fetch({"/fhir/Observation?patient=p1": bundle(["a"], "https://elsewhere.example.com/fhir/Observation?page=2")})
    assert (ids, error, len(seen)) == (["a"], None, 1)


def test_paging_stops_at_max_pages() -> None:
    pages = {"/fhir/Observation?patient=p1": bundle(["a"], "Observation?patient=p1&page=2")}
    pages["/fhir/Observation?patient=p1&page=2"] = bundle(["b"], "Observation?patient=p1")  # a loop
    ids, error, seen = fetch(pages, max_pages=3)
    assert (ids, error, len(seen)) == (["a", "b", "a"], None, 3)
