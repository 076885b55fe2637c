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


# --- what cannot succeed later is not a 503 -----------------------------------------------------------------------------
AUTH = {"Authorization": f"Bearer {SECRET}"}


def _nul_resource() -> dict[str, object]:
    return {"resourceType": "Observation", "id": f"nul-{uuid.uuid4().hex[:8]}", "meta": {"versionId": "1"}, "status": "final",
            "code": {"text": "phosphate"}, "note": [{"text": "a\u0000b"}]}


def _event_number_past_bigint() -> dict[str, object]:
    bundle = event_bundle()
    params = bundle["entry"][0]["resource"]["parameter"]  # type: ignore[index]
    event = next(p for p in params if p["name"] == "notification-event")
    event["part"][0] = {"name": "event-number", "valueInteger64": 1e19}
    return bundle


def _long_subscription() -> dict[str, object]:
    return make_notification_bundle(subscription="https://ehr.example.org/fhir/Subscription/" + "s" * 600,
                                    events=[EventSpec(1, focus="Observation/o1")], content="id-only")


@pytest.mark.parametrize(
    "body", [_nul_resource, _event_number_past_bigint, _long_subscription], ids=["U+0000 in a resource", "event-number 1e19", "subscription of 640 characters"]
)
def test_a_notification_postgresql_can_never_store_is_a_400_every_time(
    make_client: Callable[..., TestClient], pg_url: str, capsys: pytest.CaptureFixture[str], body: Callable[[], dict[str, object]]
) -> None:
    """A poison message is refused for what it is (400, counted invalid), not answered "retry" (503) for ever."""
    client = make_client(subscription_secret=SECRET, database_url=pg_url)
    before = samples(client)
    document = body()
    capsys.readouterr()
    for _ in range(2):  # the FHIR server's retry gets the same answer
        response = client.post("/fhir/notifications", json=document, headers=AUTH)
        assert response.status_code == 400, response.text
        assert response.json()["issue"][0]["code"] == "invalid"
        assert "sss" not in response.text and "a\\u0000b" not in response.text
    after = samples(client)
    assert counted(after, "invalid") == counted(before, "invalid") + 2
    assert not any(counted(after, r, f) > counted(before, r, f) for r in ("ledger-unavailable", "broker-unavailable")
                   for f in ("unknown", "backport", "r4-resource"))
    assert "sss" not in capsys.readouterr().err


def _stored_anyway(notification: object) -> Callable[..., list[object]]:
    """The parser replaced by one that lets ``notification`` through: what reaches the ledger if a check is missed."""
    return lambda *args, **kwargs: [notification]


@pytest.mark.parametrize(
    ("case", "dialect"),
    # SQLite stores U+0000, so that case is PostgreSQL's only (a skip would fail the run under CI=true).
    [(c, d) for c in ("U+0000", "event number", "subscription length") for d in ("sqlite", "postgresql") if (c, d) != ("U+0000", "sqlite")],
)
def test_a_value_the_ledger_refuses_is_a_400_even_past_the_parser(
    make_client: Callable[..., TestClient], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], dialect: str, case: str,
) -> None:
    """DataError (PostgreSQL), OverflowError (SQLite's 64-bit integers) and the ledger's own ValueError are permanent:
    400 with a value-free OperationOutcome, logged by type only, never "the task queue is unavailable"."""
    from service.api import notifications as receiver
    from service.fhir.notifications import BackportNotification, NotificationEvent, ResourceChanged

    overrides = {"database_url": request.getfixturevalue("pg_url")} if dialect == "postgresql" else {}
    client = make_client(subscription_secret=SECRET, **overrides)
    sub = f"https://ehr.example.org/fhir/Subscription/poison-{uuid.uuid4().hex[:8]}"
    if case == "U+0000":
        resource = _nul_resource()
        notification: object = ResourceChanged("Observation", str(resource["id"]), "1", None, resource)
    else:
        number = 10**19 if case == "event number" else 1
        if case == "subscription length":
            sub += "s" * 600
        event = NotificationEvent(sub, number, None, "Observation/o1")
        notification = BackportNotification(sub, None, "event-notification", "active", None, (event,), "id-only")
    monkeypatch.setattr(receiver, "parse_notification", _stored_anyway(notification))
    before = samples(client)
    capsys.readouterr()
    response = client.post("/fhir/notifications", json={"resourceType": "Observation"}, headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["issue"][0]["diagnostics"] == "invalid notification: a value cannot be stored (out of range or not allowed)"
    form = "r4-resource" if case == "U+0000" else "backport"
    assert counted(samples(client), "invalid", form) == counted(before, "invalid", form) + 1
    refused = [line for line in log_lines(capsys.readouterr().err) if line.get("event") == "notification_refused"]
    assert len(refused) == 1 and refused[0]["error"] in ("DataError", "OverflowError", "ValueError"), refused


class _DownBroker:
    def send(self, name: str, args: list[object], countdown: float | None = None) -> None:
        raise ConnectionError("broker down")


def test_a_broker_that_is_down_is_a_503_counted_as_such(make_client: Callable[..., TestClient], capsys: pytest.CaptureFixture[str]) -> None:
    client = make_client(subscription_secret=SECRET)
    client.app.state.ctx.monitor.queue = _DownBroker()  # type: ignore[attr-defined]
    before = samples(client)
    capsys.readouterr()
    response = client.post("/fhir/notifications", json=event_bundle(), headers=AUTH)
    assert response.status_code == 503, response.text
    assert counted(samples(client), "broker-unavailable", "backport") == counted(before, "broker-unavailable", "backport") + 1
    lines = [line for line in log_lines(capsys.readouterr().err) if line.get("event") == "broker_unavailable"]
    assert len(lines) == 1 and lines[0]["error"] == "ConnectionError"


def test_an_unexpected_error_is_a_500_not_a_broker_outage(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug of ours is counted result="error" and answered 500: a FHIR server is not told to retry it for ever, and
    on-call is not told the broker is down."""
    from service.usecases import monitor

    def bug(*args: object) -> None:
        raise KeyError("Observation/secret-patient-value")

    monkeypatch.setattr(monitor, "receive", bug)
    client = make_client(subscription_secret=SECRET)
    before = samples(client)
    capsys.readouterr()
    response = client.post("/fhir/notifications", json=event_bundle(), headers=AUTH)
    assert response.status_code == 500, response.text
    assert response.json()["issue"][0]["diagnostics"] == "internal error"
    after = samples(client)
    assert counted(after, "error", "backport") == counted(before, "error", "backport") + 1
    assert counted(after, "broker-unavailable", "backport") == counted(before, "broker-unavailable", "backport")
    assert timed(after, "error") == timed(before, "error") + 1
    captured = capsys.readouterr().err
    failed = [line for line in log_lines(captured) if line.get("event") == "notification_failed"]
    assert len(failed) == 1 and failed[0]["error"] == "KeyError" and failed[0]["level"] == "error"
    assert "secret-patient-value" not in captured
