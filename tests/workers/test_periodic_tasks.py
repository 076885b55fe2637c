"""The beat tasks (sweep, reconcile) are counted and timed like every other task: with the database unreachable each
run is ``worker_tasks_total{result="failed"}`` and a ``task_failed`` line naming the error's type (not a traceback
Celery prints and no metric shows); on a working database each run is ``ok``. The task bodies run in this process
(no broker: what is under test is the task, not its delivery) on a real MonitorContext."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.logging import configure_logging
from service.queue import TASK_RECONCILE, TASK_SWEEP, MemoryQueue
from service.terminology.catalog import Catalog
from service.usecases.monitor import MonitorContext
from tests.fakes.databases import db_engine, db_session_factory, db_url, pg_database  # noqa: F401
from workers import context, tasks


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound and never listened on: a connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def unreachable_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, catalog: Catalog, closed_port: int) -> MonitorContext:
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{closed_port}/cds?connect_timeout=2",
        fhir_base_url=f"http://127.0.0.1:{closed_port}/fhir",  # reconcile only runs with a FHIR server configured
    )
    ctx = MonitorContext.from_settings(settings, catalog=catalog, queue=MemoryQueue())
    configure_logging("INFO", json=True)  # as context.get() does in a worker (once per process)
    monkeypatch.setattr(context, "get", lambda: ctx)
    return ctx


@pytest.mark.parametrize(("task", "name"), [(tasks.sweep, TASK_SWEEP), (tasks.reconcile, TASK_RECONCILE)], ids=["sweep", "reconcile"])
def test_a_periodic_task_that_cannot_reach_the_database_is_counted_failed(
    unreachable_database: MonitorContext, capsys: pytest.CaptureFixture[str], task: object, name: str
) -> None:
    failed, runs = sample("worker_tasks_total", task=name, result="failed"), sample("worker_task_seconds_count", task=name)
    capsys.readouterr()
    assert task() is None  # type: ignore[operator]
    assert sample("worker_tasks_total", task=name, result="failed") == failed + 1
    assert sample("worker_task_seconds_count", task=name) == runs + 1
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    (line,) = [x for x in lines if x.get("event") == "task_failed"]
    assert line["task"] == name and line["error"] == "OperationalError"


def test_a_sweep_that_works_is_counted_ok(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    catalog: Catalog,
    db_session_factory: sessionmaker[Session],  # noqa: F811
) -> None:
    ctx = MonitorContext.from_settings(Settings(data_dir=tmp_path), catalog=catalog, sessions=db_session_factory, queue=MemoryQueue())
    monkeypatch.setattr(context, "get", lambda: ctx)
    ok, runs = sample("worker_tasks_total", task=TASK_SWEEP, result="ok"), sample("worker_task_seconds_count", task=TASK_SWEEP)
    assert tasks.sweep() == {"events": 0, "patients": 0, "silent_subscriptions": 0, "writebacks": 0, "writebacks_given_up": 0, "writebacks_rechecked": 0}
    assert sample("worker_tasks_total", task=TASK_SWEEP, result="ok") == ok + 1
    assert sample("worker_task_seconds_count", task=TASK_SWEEP) == runs + 1
