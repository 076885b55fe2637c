"""Fixtures of the use-case tests: the database fixtures (SQLite and PostgreSQL), and the monitor's context on them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.queue import TaskQueue
from service.terminology.catalog import Catalog
from service.usecases.monitor import MonitorContext
from tests.fakes.databases import db_engine, db_session_factory, db_url, pg_database  # noqa: F401

#: ``make_monitor(queue)``: a MonitorContext on the test database (both dialects) that sends to ``queue``.
MakeMonitor = Callable[[TaskQueue], MonitorContext]


@pytest.fixture
def make_monitor(db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path) -> MakeMonitor:  # noqa: F811
    def make(queue: TaskQueue) -> MonitorContext:
        return MonitorContext.from_settings(Settings(data_dir=tmp_path), catalog=catalog, sessions=db_session_factory, queue=queue)

    return make
