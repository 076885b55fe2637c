"""The service called from a web page on another origin, in real headless Chromium, the way the CDS Hooks Sandbox
calls a local service: every call preflighted (``Authorization``, ``Content-Type``), a JWT on discovery, service
calls and feedback, ``draftOrders`` without a Bundle ``type``, feedback after a dismiss with a reason.

The browser enforces CORS itself, so this catches what a client that ignores CORS cannot: a response the page may not
read (an error without the CORS headers shows in the Sandbox as "No recommendations"), a preflight that fails, a
header the page may not send. The page reports what it could read to its own origin; the test checks that.

Needs Debian's ``chromium`` (``.ci/run`` installs it); skipped without it, except under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from tests.conftest import require_service
from tests.schema import assert_valid
from tests.service.api.support import (
    ORDER_SELECT,
    ORDER_SIGN,
    RISK,
    WARFARIN,
    Issuer,
    draft_order,
    high_risk_dialysis_patient,
    hook_request,
    sandbox_draft_orders,
    serve_in_thread,
    topics,
)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # this machine's network is closed: no calls home
    "--disable-component-update",
    "--disable-sync",
)

# The page: runs the calls it is given in order, then posts what it could read back to its own origin.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>cross-origin EHR</title></head><body>
<script>
const plan = __PLAN__;
async function run() {
  const results = {};
  for (const step of plan) {
    try {
      let body = step.body;
      if (step.feedbackFor) {  // dismiss the first card of an earlier step, with its second override reason
        const card = results[step.feedbackFor].json.cards[0];
        const reason = card.overrideReasons[1];
        body = {feedback: [{card: card.uuid, outcome: "overridden", outcomeTimestamp: new Date().toISOString(),
                            overrideReason: {reason: {code: reason.code, system: reason.system}}}]};
      }
      const init = {method: step.method, headers: {"Authorization": "Bearer " + step.token}, mode: "cors"};
      if (body !== undefined) {
        init.headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
      const response = await fetch(step.url, init);
      const text = await response.text();
      let parsed = null;
      try { parsed = JSON.parse(text); } catch (e) {}
      results[step.name] = {status: response.status, json: parsed,
                            contentType: response.headers.get("content-type")};
    } catch (e) {
      results[step.name] = {error: String(e)};  // a CORS failure looks like this to a page
    }
  }
  await fetch("/result", {method: "POST", body: JSON.stringify(results)});
}
run();
</script></body></html>
"""


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    require_service("Chromium", path is not None, "install Debian's chromium package (.ci/run does)")
    assert path is not None
    return path


@contextlib.contextmanager
def page_origin(page: str) -> Iterator[tuple[str, Callable[[float], dict[str, Any]]]]:
    """Serve ``page`` at ``/`` on its own origin (uvicorn on another port); yield its URL and a function that waits
    for the result the page posts to ``/result``."""
    posted: list[bytes] = []
    arrived = threading.Event()

    async def receive(request: Request) -> Response:
        posted.append(await request.body())
        arrived.set()
        return Response(status_code=204)

    site = Starlette(routes=[Route("/", lambda _: HTMLResponse(page)), Route("/result", receive, methods=["POST"])])

    def result(timeout_s: float) -> dict[str, Any]:
        assert arrived.wait(timeout_s), "the page did not report back"
        return dict(json.loads(posted[0]))

    with serve_in_thread(site) as origin:
        yield f"{origin}/", result


def run_page(page: str) -> dict[str, Any]:
    browser = chromium()
    with page_origin(page) as (url, result), tempfile.TemporaryDirectory() as profile:
        process = subprocess.Popen(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the renderer and GPU processes are stopped with it
        )
        try:
            return result(60)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="module")
def service(make_app: Callable[..., FastAPI]) -> Iterator[str]:
    """Production-like settings (JWT required, CORS for any origin as by default), on a real socket."""
    with serve_in_thread(make_app(dev_mode=False)) as origin:
        yield origin


def test_a_page_on_another_origin_reads_discovery_cards_errors_and_sends_feedback(service: str, issuer: Issuer) -> None:
    patient = high_risk_dialysis_patient()
    warfarin = draft_order("draft-warfarin", WARFARIN, patient.pid)
    base = f"{service}/cds-services"

    def step(name: str, url: str, body: Any = None, *, method: str = "POST", token: str | None = None, **extra: Any) -> dict[str, Any]:
        planned = {"name": name, "method": method, "url": url, "token": token or issuer.token(url), **extra}
        if body is not None:
            planned["body"] = body
        return planned

    select_context = {"draftOrders": sandbox_draft_orders(warfarin), "selections": ["MedicationRequest/draft-warfarin"]}
    plan = [
        step("discovery", base, method="GET"),
        step("patient-view", f"{base}/{RISK}", hook_request(RISK, patient.pid, prefetch=patient.prefetch())),
        step("order-select", f"{base}/{ORDER_SELECT}", hook_request(ORDER_SELECT, patient.pid, prefetch=patient.prefetch(), **select_context)),
        step(
            "order-sign",
            f"{base}/{ORDER_SIGN}",
            hook_request(ORDER_SIGN, patient.pid, prefetch=patient.prefetch(), draftOrders=sandbox_draft_orders(warfarin)),
        ),
        step("feedback", f"{base}/{RISK}/feedback", feedbackFor="patient-view"),
        # errors must be readable too: the Sandbox (and an EHR's page) shows them only if CORS allows it
        step("bad-token", f"{base}/{RISK}", hook_request(RISK, patient.pid, prefetch=patient.prefetch()), token="not-a-jwt"),
        step("wrong-hook", f"{base}/{RISK}", hook_request(ORDER_SIGN, patient.pid, prefetch=patient.prefetch())),
        step("no-data", f"{base}/{RISK}", hook_request(RISK, patient.pid)),
        step("unknown-service", f"{base}/no-such-service", hook_request(RISK, patient.pid, prefetch=patient.prefetch())),
    ]
    seen = run_page(PAGE.replace("__PLAN__", json.dumps(plan)))

    assert {name: r.get("error") for name, r in seen.items()} == dict.fromkeys((s["name"] for s in plan), None), (
        "every response, errors included, must be readable by a page on another origin"
    )
    status = {name: r["status"] for name, r in seen.items()}
    assert status == {
        "discovery": 200,
        "patient-view": 200,
        "order-select": 200,
        "order-sign": 200,
        "feedback": 200,
        "bad-token": 401,
        "wrong-hook": 400,
        "no-data": 412,
        "unknown-service": 404,
    }

    assert_valid(seen["discovery"]["json"], "DiscoveryResponse")
    for name in ("patient-view", "order-select", "order-sign"):
        assert_valid(seen[name]["json"], "CDSResponse")
    view, select, sign = (topics(seen[name]["json"]) for name in ("patient-view", "order-select", "order-sign"))
    assert select == ["medication-order-risk"]
    assert view and "medication-order-risk" not in view
    assert sign[0] == "medication-order-risk" and set(view) <= set(sign)

    for name in ("bad-token", "wrong-hook", "no-data", "unknown-service"):
        outcome = seen[name]["json"]
        assert outcome["resourceType"] == "OperationOutcome", name
        assert seen[name]["contentType"].startswith(("application/fhir+json", "application/json")), name
    assert "not-a-jwt" not in json.dumps(seen["bad-token"]["json"]), "a 401 never echoes the token"


def test_the_page_gets_nothing_it_may_not_read_when_its_origin_is_not_allowed(make_app: Callable[..., FastAPI], issuer: Issuer) -> None:
    """With an origin allowlist that does not include the page, the browser itself withholds the answer."""
    with serve_in_thread(make_app(dev_mode=False, cors_origins=["https://ehr.example.org"])) as origin:
        url = f"{origin}/cds-services"
        plan = [{"name": "discovery", "method": "GET", "url": url, "token": issuer.token(url)}]
        seen = run_page(PAGE.replace("__PLAN__", json.dumps(plan)))
    assert "error" in seen["discovery"], seen["discovery"]
