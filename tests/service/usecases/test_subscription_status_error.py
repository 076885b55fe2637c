"""A Backport notification or heartbeat in which the FHIR server reports the subscription ``status=error`` is not a
sign of life: it is logged (the subscription's id only) and leaves the silent-subscription check armed, so the sweeper
starts a recovery search once the heartbeat timeout has passed; a heartbeat with any other status keeps it quiet."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import InboundEvent
from service.db.repositories import Repositories
from service.db.session import session_scope
from service.fhir.notifications import parse_notification
from service.logging import configure_logging
from service.queue import MemoryQueue
from service.terminology.catalog import Catalog
from service.usecases.monitor import MonitorContext, receive, sweep
from tests.fakes.notifications import make_heartbeat

TIMEOUT_S = 1


@pytest.fixture
def ctx(db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path) -> MonitorContext:
    configure_logging("INFO", json=True)  # once per process, as the API and the workers do at start
    settings = Settings(data_dir=tmp_path, heartbeat_timeout_s=TIMEOUT_S)
    return MonitorContext.from_settings(settings, catalog=catalog, sessions=db_session_factory, queue=MemoryQueue())


def heartbeat(ctx: MonitorContext, status: str) -> None:
    body = json.dumps(make_heartbeat("sub-err", events_since_start=3, status=status)).encode()
    receive(ctx, parse_notification(body, {}), "backport")


def recovery_keys(ctx: MonitorContext) -> list[str]:
    with session_scope(ctx.sessions) as session:
        return list(session.scalars(select(InboundEvent.dedup_key).where(InboundEvent.kind == "recovery")))


def test_an_error_heartbeat_is_logged_and_does_not_keep_the_silent_check_quiet(ctx: MonitorContext, capsys: pytest.CaptureFixture[str]) -> None:
    heartbeat(ctx, "active")
    assert sweep(ctx)["silent_subscriptions"] == 0
    time.sleep(TIMEOUT_S + 0.2)

    capsys.readouterr()
    heartbeat(ctx, "error")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    (warning,) = [x for x in lines if x.get("event") == "subscription_status_error"]
    assert warning["level"] == "warning"
    assert warning["subscription"] == "https://ehr.example.org/fhir/Subscription/sub-err"

    counts = sweep(ctx)
    assert counts["silent_subscriptions"] == 1  # the recovery search of a subscription that delivers nothing
    assert [k.split("#")[1] for k in recovery_keys(ctx)] == ["silent"]
    with session_scope(ctx.sessions) as session:
        assert Repositories(session).subscriptions.counts_by_status()["error"] == 1


def test_a_heartbeat_with_another_status_is_a_sign_of_life(ctx: MonitorContext) -> None:
    heartbeat(ctx, "active")
    time.sleep(TIMEOUT_S + 0.2)
    heartbeat(ctx, "active")
    assert sweep(ctx)["silent_subscriptions"] == 0
    with session_scope(ctx.sessions) as session:
        counts = Repositories(session).subscriptions.counts_by_status()
    assert counts["active"] == 1 and counts["error"] == 0
