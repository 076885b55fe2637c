"""Outage drill: the broker accepts connections but never answers (a hung Redis). The notification receiver
(``calcinosis-cds serve`` on this machine's PostgreSQL) answers 503 within seconds, so the FHIR server retries,
and keeps every event in the ledger for the sweeper; a notification that arrives while others wait on the broker
is not held behind them without limit. The broker is a real TCP listener that accepts and never answers
(tests/fakes/broker.py)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db.session import make_engine
from tests.fakes.broker import SilentBroker
from tests.fakes.databases import create_postgres_database, drop_postgres_database, require_postgres
from tests.fakes.notifications import EventSpec, make_notification_bundle
from tests.integration.conftest import stack_env
from tests.integration.support import Stack, metric_samples, run_cli

pytestmark = pytest.mark.integration

SOCKET_TIMEOUT_S = 1.0
ANSWER_WITHIN_S = 10.0  # a few socket timeouts, and a group commit ahead of it


@pytest.fixture
def hung_broker_api(tmp_path: Path) -> Iterator[tuple[Stack, SilentBroker]]:
    require_postgres()
    database_url = create_postgres_database("cds_it_hung_broker")
    with SilentBroker() as broker:
        env = stack_env(database_url, broker.url(15), tmp_path, None, CDS_BROKER_SOCKET_TIMEOUT_S=str(SOCKET_TIMEOUT_S), CDS_BROKER_PUBLISH_MAX_RETRIES="1")
        engine = make_engine(database_url, pool_size=1)
        stack = Stack(env=env, engine=engine, log_dir=tmp_path)
        try:
            migrated = run_cli(["migrate"], env)
            assert migrated.returncode == 0, migrated.stderr
            stack.start_api()
            yield stack, broker
        finally:
            stack.stop()
            engine.dispose()
            drop_postgres_database(database_url)


def id_only_event(subscription: str) -> dict[str, Any]:
    return make_notification_bundle(subscription=subscription, events=[EventSpec(1, focus=f"Observation/{subscription}-obs")], content="id-only")


def post(stack: Stack, body: dict[str, Any], out: dict[str, tuple[float, int | str]], key: str) -> None:
    started = time.monotonic()
    try:
        status: int | str = stack.notify(body).status_code  # the client waits up to 30 s
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    out[key] = (time.monotonic() - started, status)


def test_a_broker_that_never_answers_gets_503_within_seconds_and_the_events_wait_in_the_ledger(
    hung_broker_api: tuple[Stack, SilentBroker],
) -> None:
    stack, broker = hung_broker_api
    subscriptions = [f"hung-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    answers: dict[str, tuple[float, int | str]] = {}
    threads = [threading.Thread(target=post, args=(stack, id_only_event(s), answers, s)) for s in subscriptions[:3]]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the later notification arrives while the first three wait on the broker
    post(stack, id_only_event(subscriptions[3]), answers, subscriptions[3])
    for t in threads:
        t.join(60)

    assert broker.accepted >= 1, "the API never reached the broker"
    for subscription in subscriptions:
        elapsed, status = answers[subscription]
        assert status == 503, (subscription, status, elapsed)  # so the FHIR server retries
        assert elapsed < ANSWER_WITHIN_S, (subscription, elapsed)

    # Committed before the publish was tried: queued in the ledger, where the sweeper finds them.
    events = stack.rows("SELECT subscription, status FROM inbound_events WHERE kind = 'backport-event'")
    assert sorted(e["subscription"].rsplit("/", 1)[-1] for e in events) == sorted(subscriptions)
    assert {e["status"] for e in events} == {"queued"}

    readiness = stack.http.get(f"{stack.api_url}/readyz", timeout=10.0)
    assert readiness.status_code == 503 and readiness.json()["checks"]["broker"] is False

    # Counted and timed, not only logged: an alert can fire on them.
    samples = metric_samples(stack.http.get(f"{stack.api_url}/metrics", timeout=10.0).text)
    assert samples[("fhir_notifications_total", (("form", "backport"), ("result", "broker-unavailable")))] == 4
    assert samples[("fhir_notification_request_seconds_count", (("result", "broker-unavailable"),))] == 4
