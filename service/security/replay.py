"""The jti replay cache: each (issuer, jti) pair is accepted once until its token has expired.

``RedisReplayCache`` (``SET key NX`` with an expiry) is shared by every process of the service;
``MemoryReplayCache`` only protects one process and is meant for single-process deployments and tests.
Both fail closed: when the cache cannot answer, ``ReplayCacheError`` is raised and the token refused.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import redis


class ReplayCacheError(Exception):
    """The replay cache could not record a jti. ``str()`` is a short reason, safe to log."""


@runtime_checkable
class ReplayCache(Protocol):
    def first_use(self, issuer: str, jti: str, expires_at: float) -> bool:
        """Record ``(issuer, jti)`` until ``expires_at`` (epoch seconds).

        Returns True the first time, False if the pair was already recorded and has not yet expired.
        Raises ReplayCacheError when the pair cannot be recorded.
        """
        ...

    def available(self) -> bool:
        """Whether a pair could be recorded now (readiness: a signed call is refused when it cannot)."""
        ...


class MemoryReplayCache:
    """In-process replay cache: a dict plus an expiry heap, swept on every call, bounded in size."""

    def __init__(self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []

    def __len__(self) -> int:
        with self._lock:
            self._sweep(self._clock())
            return len(self._expiry)

    def first_use(self, issuer: str, jti: str, expires_at: float) -> bool:
        key = (issuer, jti)
        with self._lock:
            now = self._clock()
            self._sweep(now)
            current = self._expiry.get(key)
            if current is not None and current > now:
                return False
            if expires_at <= now:
                # Already expired: nothing to remember (the token itself is refused elsewhere).
                return True
            if current is None and len(self._expiry) >= self._max_entries:
                # Evicting live entries would reopen them to replay: refuse instead.
                raise ReplayCacheError("replay cache is full")
            self._expiry[key] = expires_at
            heapq.heappush(self._heap, (expires_at, key))
            return True

    def available(self) -> bool:
        return True

    def _sweep(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires_at, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expires_at:
                del self._expiry[key]


class RedisReplayCache:
    """Replay cache in Redis: ``SET <prefix><digest> 1 NX EX <seconds until expires_at>``."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "calcinosis-cds:jti:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._clock = clock

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "calcinosis-cds:jti:", timeout_s: float = 2.0) -> RedisReplayCache:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, prefix=prefix)

    def key(self, issuer: str, jti: str) -> str:
        """The Redis key of a pair (hashed: jti is sender-chosen and may be long)."""
        digest = hashlib.sha256(json.dumps([issuer, jti]).encode("utf-8")).hexdigest()
        return self._prefix + digest

    def first_use(self, issuer: str, jti: str, expires_at: float) -> bool:
        ttl = max(1, math.ceil(expires_at - self._clock()))
        try:
            created = self._client.set(self.key(issuer, jti), b"1", nx=True, ex=ttl)
        except redis.RedisError as exc:
            raise ReplayCacheError(f"replay cache unavailable ({type(exc).__name__})") from None
        return bool(created)

    def available(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self._client.close()
