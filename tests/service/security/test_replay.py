"""Replay caches: memory (expiry, bound, threads) and Redis (real server, NX + expiry)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from service.security import MemoryReplayCache, RedisReplayCache, ReplayCache, ReplayCacheError
from tests.conftest import require_service
from tests.service.security.support import FakeClock, unreachable_redis


def test_memory_first_use_then_replay() -> None:
    clock = FakeClock(1_000_000.0)
    cache = MemoryReplayCache(clock=clock)
    assert isinstance(cache, ReplayCache)
    assert cache.first_use("iss-a", "j1", clock.now + 100)
    assert not cache.first_use("iss-a", "j1", clock.now + 100)
    assert cache.first_use("iss-b", "j1", clock.now + 100)  # per issuer
    assert len(cache) == 2


def test_memory_entries_expire() -> None:
    clock = FakeClock(1_000_000.0)
    cache = MemoryReplayCache(clock=clock)
    assert cache.first_use("iss", "j", clock.now + 100)
    clock.advance(99)
    assert not cache.first_use("iss", "j", clock.now + 100)
    clock.advance(2)
    assert len(cache) == 0  # swept
    assert cache.first_use("iss", "j", clock.now + 100)


def test_memory_is_bounded_and_fails_closed() -> None:
    clock = FakeClock(1_000_000.0)
    cache = MemoryReplayCache(max_entries=3, clock=clock)
    for i in range(3):
        assert cache.first_use("iss", f"j{i}", clock.now + 10 + i)
    with pytest.raises(ReplayCacheError, match="full"):
        cache.first_use("iss", "j3", clock.now + 10)
    assert not cache.first_use("iss", "j0", clock.now + 10)  # a replay is still detected when full
    clock.advance(10.5)  # j0 expires and is swept: room for one more
    assert cache.first_use("iss", "j3", clock.now + 10)
    assert len(cache) == 3


def test_memory_is_thread_safe() -> None:
    cache = MemoryReplayCache()
    expires = time.time() + 60
    wins: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        result = cache.first_use("iss", "contended", expires)
        with lock:
            wins.append(result)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins.count(True) == 1 and wins.count(False) == 15


@pytest.mark.integration
def test_redis_first_use_then_replay() -> None:
    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1, socket_timeout=2)
    try:
        ok, why = bool(client.ping()), ""
    except redis.RedisError as exc:
        ok, why = False, type(exc).__name__
    require_service("Redis at 127.0.0.1:6379", ok, why)
    prefix = f"test-calcinosis-jti-{uuid.uuid4()}:"
    cache = RedisReplayCache(client, prefix=prefix)
    try:
        expires = time.time() + 120
        assert cache.first_use("iss-a", "j1", expires)
        assert not cache.first_use("iss-a", "j1", expires)
        assert cache.first_use("iss-b", "j1", expires)
        assert 100 < client.ttl(cache.key("iss-a", "j1")) <= 121
        # Keys are hashed: a long jti does not make a long key, and pairs cannot collide by concatenation.
        assert len(cache.key("iss", "x" * 10_000)) == len(prefix) + 64
        assert cache.key("a:b", "c") != cache.key("a", "b:c")
        # An already-expired token is stored for at least a second, never with a non-positive expiry.
        assert cache.first_use("iss-a", "old", time.time() - 5)
    finally:
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()


def test_redis_down_raises_replay_cache_error() -> None:
    cache = RedisReplayCache(unreachable_redis())
    with pytest.raises(ReplayCacheError, match="unavailable"):
        cache.first_use("iss", "j", time.time() + 60)
