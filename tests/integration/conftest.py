"""The shared integration stack: a fresh PostgreSQL database migrated with ``calcinosis-cds migrate``, a flushed
Redis database used as the Celery broker, the API (``calcinosis-cds serve``), one worker (``calcinosis-cds
worker``) and beat (``calcinosis-cds beat``, running the sweeper every 2 s), all real processes, and a
FakeFhirServer over real HTTP as the monitored FHIR server (write-back enabled).

Skipped when PostgreSQL or Redis is missing, except with ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.db.session import make_engine
from tests.conftest import require_service
from tests.fakes.databases import create_postgres_database, drop_postgres_database, require_postgres
from tests.fakes.fhir_server import FakeFhirServer
from tests.integration.support import (
    ADMIN_TOKEN,
    HMAC_SECRET,
    SHARED_SECRET,
    Stack,
    base_env,
    flush_redis_db,
    redis_ping,
    run_cli,
    start_redis,
)

BROKER_URL = "redis://127.0.0.1:6379/7"  # this folder's own Redis database; only it is ever flushed
MAX_NOTIFICATION_BYTES = 200_000
SWEEPER_STALE_AFTER_S = 4


def require_redis() -> None:
    if not redis_ping():
        start_redis_quietly()
    require_service("Redis", redis_ping(), "127.0.0.1:6379 does not answer PING")


def start_redis_quietly() -> None:
    """Start the machine's Redis if it is down (a previous run may have stopped it); never raises."""
    with contextlib.suppress(AssertionError, OSError, subprocess.SubprocessError):
        start_redis()


@pytest.fixture(scope="session")
def fake_fhir() -> Iterator[FakeFhirServer]:
    with FakeFhirServer(default_page_size=200) as srv:
        yield srv
        assert not srv.errors, srv.errors


def stack_env(database_url: str, broker_url: str, data_dir: Path, fhir_base_url: str | None, **extra: str) -> dict[str, str]:
    env = base_env(
        CDS_ENVIRONMENT="test",
        CDS_DATABASE_URL=database_url,
        CDS_BROKER_URL=broker_url,
        CDS_DATA_DIR=str(data_dir),
        CDS_DEV_MODE="false",
        CDS_SUBSCRIPTION_SECRET=SHARED_SECRET,
        CDS_MEDPLUM_HMAC_SECRET=HMAC_SECRET,
        CDS_ADMIN_TOKEN=ADMIN_TOKEN,
        CDS_WRITEBACK_ENABLED="true",
        CDS_FHIR_AUTH_MODE="none",
        CDS_FHIR_MAX_RETRIES="1",
        CDS_FHIR_RETRY_BACKOFF_S="0.1",
        CDS_FHIR_TIMEOUT_S="20",
        CDS_COALESCE_WINDOW_S="1.0",
        CDS_TASK_MAX_RETRIES="3",
        CDS_TASK_RETRY_BACKOFF_MAX_S="1",
        CDS_SWEEPER_INTERVAL_S="2",
        CDS_SWEEPER_STALE_AFTER_S=str(SWEEPER_STALE_AFTER_S),
        CDS_RECONCILE_INTERVAL_S="86400",
        CDS_MAX_NOTIFICATION_BYTES=str(MAX_NOTIFICATION_BYTES),
        CDS_DB_POOL_SIZE="3",
    )
    if fhir_base_url:
        env["CDS_FHIR_BASE_URL"] = fhir_base_url
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def stack(fake_fhir: FakeFhirServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_postgres()
    require_redis()
    data_dir = tmp_path_factory.mktemp("integration-stack")
    database_url = create_postgres_database("cds_it")
    flush_redis_db(BROKER_URL)
    env = stack_env(database_url, BROKER_URL, data_dir, fake_fhir.base_url)
    engine = make_engine(database_url, pool_size=2)
    s = Stack(env=env, engine=engine, log_dir=data_dir)
    try:
        migrated = run_cli(["migrate"], env)
        assert migrated.returncode == 0, migrated.stderr
        s.start_api()
        s.start_worker()
        s.start_beat()
        yield s
    finally:
        s.stop()
        engine.dispose()
        if not redis_ping():
            start_redis_quietly()
        if redis_ping():
            flush_redis_db(BROKER_URL)
        drop_postgres_database(database_url)


@pytest.fixture
def worker_alive(stack: Stack) -> Iterator[Stack]:
    """The stack, with a worker guaranteed running before and after the test (tests may kill theirs)."""
    stack.workers = [w for w in stack.workers if w.alive()]
    if not stack.workers:
        stack.start_worker()
    yield stack
    stack.workers = [w for w in stack.workers if w.alive()]
    if not stack.workers:
        stack.start_worker()
