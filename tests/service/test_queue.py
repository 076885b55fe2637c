"""Publishing a task is bounded in time: a Redis broker that accepts connections and never answers fails a send within
seconds (CDS_BROKER_SOCKET_TIMEOUT_S) instead of blocking its caller without limit, whether the connection is new or
one that worked a moment ago. A real TCP listener (tests/fakes/broker.py) and the machine's Redis, database 15."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.config import Settings
from service.queue import TASK_PROCESS_EVENT, CeleryQueue
from service.terminology.catalog import Catalog
from service.usecases.monitor import MonitorContext
from tests.conftest import require_service
from tests.fakes.broker import SilentBroker

REDIS = ("127.0.0.1", 6379)
TEST_DB = 15  # this file's own Redis database; only its "ingest" list is touched


def timed_send(queue: CeleryQueue, event_id: int) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        queue.send(TASK_PROCESS_EVENT, [event_id])
    except Exception as exc:  # kombu's OperationalError, redis' TimeoutError, ...: any broker client's error
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def concurrently(queue: CeleryQueue, n: int, limit_s: float) -> list[tuple[float, BaseException | None] | None]:
    """``n`` sends at once from threads (as the API's thread pool does); None for a send still blocked after ``limit_s``."""
    results: list[tuple[float, BaseException | None] | None] = [None] * n

    def run(i: int) -> None:
        results[i] = timed_send(queue, i)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + limit_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return results


def queue_for(url: str, tmp_path: Path, catalog: Catalog) -> CeleryQueue:
    """The queue the API, the workers and the CLI publish with: the monitor's, built from the settings."""
    settings = Settings(data_dir=tmp_path, broker_url=url, broker_socket_timeout_s=1.0, broker_publish_max_retries=1)
    queue = MonitorContext.from_settings(settings, catalog=catalog).queue
    assert isinstance(queue, CeleryQueue)
    return queue


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    client = redis.Redis(host=REDIS[0], port=REDIS[1], db=TEST_DB, socket_connect_timeout=1, socket_timeout=2)
    try:
        ok, why = bool(client.ping()), ""
    except redis.RedisError as exc:
        ok, why = False, type(exc).__name__
    require_service("Redis at 127.0.0.1:6379", ok, why)
    client.delete("ingest")
    yield client
    client.delete("ingest")
    client.close()


def test_a_broker_that_accepts_and_never_answers_fails_each_send_within_seconds(tmp_path: Path, catalog: Catalog) -> None:
    with SilentBroker() as broker:
        queue = queue_for(broker.url(TEST_DB), tmp_path, catalog)
        try:
            results = concurrently(queue, 3, limit_s=15)
            assert all(r is not None for r in results), f"a send still blocked after 15 s: {results}"
            for elapsed, error in filter(None, results):
                assert error is not None, "sent to a broker that never answers?"
                assert elapsed < 6, elapsed
            assert broker.accepted >= 1  # it did connect: this is the hung broker, not a refused connection
            later = timed_send(queue, 99)  # the next caller is not stuck behind the first ones either
            assert later[1] is not None and later[0] < 6, later
        finally:
            broker.close()
            queue.close()


def test_a_broker_that_stops_answering_on_a_working_connection_fails_the_send_within_seconds(tmp_path: Path, catalog: Catalog, redis_db: redis.Redis) -> None:
    with SilentBroker(upstream=REDIS) as broker:
        queue = queue_for(broker.url(TEST_DB), tmp_path, catalog)
        try:
            elapsed, error = timed_send(queue, 1)
            assert error is None, error
            assert redis_db.llen("ingest") == 1  # relayed to the real Redis: the pooled connection works

            broker.freeze()
            results = concurrently(queue, 3, limit_s=20)
            assert all(r is not None for r in results), f"a send still blocked after 20 s: {results}"
            for elapsed, error in filter(None, results):
                assert error is not None
                assert elapsed < 10, elapsed
            assert redis_db.llen("ingest") == 1
        finally:
            broker.close()
            queue.close()
