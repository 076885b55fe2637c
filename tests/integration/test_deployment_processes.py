"""Issue 5: the processes the container image and the Helm chart start (``migrate``, ``serve``, ``worker``, ``beat``:
the chart's ``args``) run on this machine's PostgreSQL and Redis; ``/readyz`` turns unready when Redis (the
broker) stops and ready again when it is back, and the pipeline works again afterwards.

The API binds 127.0.0.1 here instead of the chart's 0.0.0.0; everything else is the chart's command line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.db.session import make_engine
from tests.fakes.databases import create_postgres_database, drop_postgres_database, require_postgres
from tests.integration.conftest import require_redis, stack_env
from tests.integration.support import (
    Stack,
    collection,
    flush_redis_db,
    free_port,
    high_risk,
    new_pid,
    redis_ping,
    redis_stopped,
    run_cli,
    start_redis,
    wait_until,
)

pytestmark = pytest.mark.integration

BROKER_URL = "redis://127.0.0.1:6379/8"  # not the shared stack's database


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[Stack]:
    require_postgres()
    require_redis()
    database_url = create_postgres_database("cds_it_deploy")
    flush_redis_db(BROKER_URL)
    env = stack_env(database_url, BROKER_URL, tmp_path, None, CDS_WRITEBACK_ENABLED="false")
    engine = make_engine(database_url, pool_size=1)
    stack = Stack(env=env, engine=engine, log_dir=tmp_path)
    try:
        yield stack
    finally:
        stack.stop()
        engine.dispose()
        if not redis_ping():
            start_redis()
        flush_redis_db(BROKER_URL)
        drop_postgres_database(database_url)


def readiness(stack: Stack) -> tuple[int, dict[str, object]]:
    resp = stack.http.get(f"{stack.api_url}/readyz", timeout=5.0)
    return resp.status_code, resp.json()


def test_image_commands_run_and_readyz_follows_redis(deployed: Stack) -> None:
    stack = deployed
    for _ in range(2):  # the pre-install/pre-upgrade Job may run again: migrating is idempotent
        migrated = run_cli(["migrate"], stack.env)
        assert migrated.returncode == 0, migrated.stderr
        assert migrated.stdout.startswith("database at revision")

    stack.start_api(port=free_port())
    stack.start_worker("--queues", "ingest,evaluate,writeback", "--concurrency", "1")
    stack.start_beat()

    status, body = readiness(stack)
    assert status == 200, body
    assert body["status"] == "ready"
    assert body["checks"] == {"database": True, "broker": True, "mappings": True, "replay_cache": True}

    before = new_pid("deploy")
    assert stack.notify(collection(*high_risk(before))).status_code == 200
    stack.wait_assessment(before, lambda a: a["metastatic_calcification"]["tier"] == "high")

    with redis_stopped():
        status, body = wait_until(lambda: (r := readiness(stack))[0] == 503 and r, timeout=10, what="/readyz to turn unready")
        assert body["status"] == "unready"
        assert body["checks"] == {"database": True, "broker": False, "mappings": True, "replay_cache": True}
        assert stack.http.get(f"{stack.api_url}/healthz").status_code == 200, "liveness does not depend on Redis"
    status, body = wait_until(lambda: (r := readiness(stack))[0] == 200 and r, timeout=10, what="/readyz to be ready again")
    assert body["status"] == "ready"

    after = new_pid("deploy")
    resp = wait_until(lambda: (r := stack.notify(collection(*high_risk(after)))).status_code == 200 and r, timeout=20)
    assert resp.status_code == 200
    stack.wait_assessment(after, lambda a: a["metastatic_calcification"]["tier"] == "high", timeout=40)
    assert stack.api is not None and stack.api.alive()
    assert all(w.alive() for w in stack.workers), "the worker survived the Redis restart"
    assert stack.beat is not None and stack.beat.alive()
