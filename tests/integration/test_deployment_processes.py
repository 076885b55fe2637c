"""Issue 5: the processes the container image and the Helm chart start (``migrate``, ``serve``, ``worker``, ``beat``:
the chart's ``args``) run on this machine's PostgreSQL and Redis; ``/readyz`` turns unready when Redis (the
broker) stops and ready again when it is back, and the pipeline works again afterwards.

The API binds 127.0.0.1 here instead of the chart's 0.0.0.0; everything else is the chart's command line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.db.session import make_engine
from tests.fakes.databases import create_postgres_database, drop_postgres_database, require_postgres
from tests.integration.conftest import require_redis, stack_env
from tests.integration.support import (
    Samples,
    Stack,
    collection,
    flush_redis_db,
    free_port,
    high_risk,
    metric_samples,
    new_pid,
    redis_ping,
    redis_stopped,
    run_cli,
    start_redis,
    wait_until,
)

pytestmark = pytest.mark.integration
CELERY_HEADER = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+: [A-Z]+/")  # "[2026-11-22 19:00:53,827: INFO/MainProcess] …"

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
    # After Celery's banner, every line of the worker and beat is one JSON object, Celery's own lines included.
    for process in (*stack.workers, stack.beat):
        lines = process.log().splitlines()
        objects = [json.loads(line) for line in lines if line.startswith("{")]
        assert not [line for line in lines if CELERY_HEADER.match(line)], process.name
        assert any(o["event"].endswith((" ready.", "beat: Starting...")) and o["level"] == "info" for o in objects), process.name


def test_a_prefork_worker_serves_the_metrics_of_all_its_pool_processes(deployed: Stack) -> None:
    """``CDS_WORKER_METRICS_PORT`` (the chart sets it): evaluations, write-backs and task outcomes counted in the pool
    processes are served by the worker's main process, summed over them."""
    stack = deployed
    assert run_cli(["migrate"], stack.env).returncode == 0
    metrics_port = free_port()
    base = stack.log_dir / "tmp"
    base.mkdir()
    stack.start_api()
    stack.env.update(CDS_WORKER_METRICS_PORT=str(metrics_port), CDS_WORKER_METRICS_HOST="127.0.0.1", TMPDIR=str(base))
    worker = stack.start_worker("--queues", "ingest,evaluate,writeback", "--concurrency", "2")
    pool = {str(pid) for pid in worker.children()}
    assert len(pool) == 2

    pids = [new_pid("metrics") for _ in range(6)]
    for pid in pids:
        assert stack.notify(collection(*high_risk(pid))).status_code == 200
    for pid in pids:
        stack.wait_assessment(pid, lambda a: a["metastatic_calcification"]["tier"] == "high")
    stored = sum(stack.evaluations(pid) for pid in pids)

    def settled() -> Samples | None:
        # the last task may still be finishing after its assessment was stored
        seen = metric_samples(stack.http.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5.0).text)
        return seen if seen.get(("evaluations_total", (("trigger", "monitor"),))) == stored else None

    seen = wait_until(settled, timeout=15, what=f"evaluations_total to reach the {stored} stored evaluations")
    ok = {dict(labels)["task"]: value for (name, labels), value in seen.items() if name == "worker_tasks_total" and ("result", "ok") in labels}
    assert ok.get("cds.evaluate.patient", 0) >= len(pids), ok  # (the API applied the notifications itself)
    shared = base / f"calcinosis-worker-metrics-{metrics_port}"  # the worker's own, under the temporary directory
    counted_in = {path.stem.rsplit("_", 1)[1] for path in shared.glob("counter_*.db")}
    # The tasks were counted in pool processes (the main process runs none), yet the main process served them.
    assert counted_in and counted_in <= pool, (pool, counted_in)
    worker.stop()
    assert worker.popen.returncode == 0, worker.log()[-2000:]  # a warm shutdown, the metrics server with it
