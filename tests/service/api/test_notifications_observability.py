"""The notification receiver leaves a trace of what it refuses: a wrong or missing channel secret is a 401 with one
value-free log line and a count (``fhir_notifications_total{result="unauthorized"}``), an unreachable ledger a 503
counted as ``ledger-unavailable``, and every answer is timed by result (``fhir_notification_request_seconds``)."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from tests.fakes.notifications import EventSpec, make_heartbeat, make_notification_bundle
from tests.integration.support import Samples, metric_samples

SECRET = "channel-secret-" + uuid.uuid4().hex


def samples(client: TestClient) -> Samples:
    return metric_samples(client.get("/metrics").text)


def counted(s: Samples, result: str, form: str = "unknown") -> float:
    return s.get(("fhir_notifications_total", (("form", form), ("result", result))), 0.0)


def timed(s: Samples, result: str) -> float:
    return s.get(("fhir_notification_request_seconds_count", (("result", result),)), 0.0)


def log_lines(captured: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in captured.splitlines() if line.startswith("{")]


def event_bundle() -> dict[str, object]:
    sub = f"obs-{uuid.uuid4().hex[:8]}"
    return make_notification_bundle(subscription=sub, events=[EventSpec(1, focus=f"Observation/{sub}-o")], content="id-only")


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(subscription_secret=SECRET)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [({"Authorization": "Bearer rotated-old-secret-value"}, "secret-mismatch"), ({}, "secret-missing")],
    ids=["wrong secret", "no header"],
)
def test_a_rejected_secret_is_logged_without_values_and_counted(
    client: TestClient, capsys: pytest.CaptureFixture[str], headers: dict[str, str], reason: str
) -> None:
    before = samples(client)
    body = json.dumps(event_bundle())
    capsys.readouterr()
    response = client.post("/fhir/notifications", content=body, headers={"Content-Type": "application/fhir+json", **headers})
    assert response.status_code == 401
    captured = capsys.readouterr().err

    rejected = [line for line in log_lines(captured) if line.get("event") == "notification_rejected"]
    assert len(rejected) == 1, captured
    assert rejected[0]["reason"] == reason and rejected[0]["level"] == "warning"
    assert "rotated-old-secret-value" not in captured and SECRET not in captured
    assert "Observation/" not in captured and "obs-" not in captured  # nothing of the body

    after = samples(client)
    assert counted(after, "unauthorized") == counted(before, "unauthorized") + 1
    assert timed(after, "unauthorized") == timed(before, "unauthorized") + 1


def test_an_accepted_notification_is_timed(client: TestClient) -> None:
    before = samples(client)
    response = client.post("/fhir/notifications", json=event_bundle(), headers={"Authorization": f"Bearer {SECRET}"})
    assert response.status_code == 200, response.text
    after = samples(client)
    assert timed(after, "accepted") == timed(before, "accepted") + 1
    assert counted(after, "accepted", "backport") == counted(before, "accepted", "backport") + 1


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound and never listened on: a connection to it is refused (a database that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_an_unreachable_ledger_is_a_counted_503(make_client: Callable[..., TestClient], closed_port: int) -> None:
    down = make_client(subscription_secret=SECRET, database_url=f"postgresql+psycopg://postgres@127.0.0.1:{closed_port}/cds?connect_timeout=2")
    before = samples(down)
    response = down.post("/fhir/notifications", json=event_bundle(), headers={"Authorization": f"Bearer {SECRET}"})
    assert response.status_code == 503, response.text
    after = samples(down)
    assert counted(after, "ledger-unavailable", "backport") == counted(before, "ledger-unavailable", "backport") + 1
    assert timed(after, "ledger-unavailable") == timed(before, "ledger-unavailable") + 1


def subscriptions_in(s: Samples, status: str) -> float:
    return s[("fhir_subscriptions", (("status", status),))]


def test_subscriptions_the_fhir_server_reports_in_error_are_a_gauge(make_client: Callable[..., TestClient]) -> None:
    """Read from the database at scrape time (each client here is a fresh API context on this module's database)."""
    sub = f"hb-{uuid.uuid4().hex[:8]}"
    auth = {"Authorization": f"Bearer {SECRET}"}
    failing = make_client(subscription_secret=SECRET)
    assert failing.post("/fhir/notifications", json=make_heartbeat(sub, status="error"), headers=auth).status_code == 200
    assert subscriptions_in(samples(failing), "error") == 1

    recovered = make_client(subscription_secret=SECRET)
    assert recovered.post("/fhir/notifications", json=make_heartbeat(sub, status="active"), headers=auth).status_code == 200
    after = samples(recovered)
    assert subscriptions_in(after, "error") == 0
    assert subscriptions_in(after, "active") >= 1
