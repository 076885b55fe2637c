"""JWK Sets of trusted CDS Clients: loading, caching, and refetching on key rotation.

A set is read from a URL (httpx) or a local file and cached for ``cache_s`` seconds. When a token
names a ``kid`` the cached set does not hold, the set is refetched once, but at most once per issuer
every ``min_refetch_s`` seconds, so a stream of tokens with invented ``kid`` values cannot make
this service hammer the issuer's endpoint. A failed load is not retried before ``min_refetch_s``
either; meanwhile the last good set (if any) keeps being used.

Only keys usable with the algorithms CDS Hooks allows are kept, each bound to exactly one algorithm
(EC P-384 to ES384, RSA to RS384), whatever the token header later claims.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from service.tls import client_ssl_context, tls_problem

log = logging.getLogger(__name__)

#: The only JWS algorithms accepted on CDS Hooks calls.
ALLOWED_ALGORITHMS: frozenset[str] = frozenset({"ES384", "RS384"})

# JWK members that only a private key has; a published set should not carry them, and if it does
# they are dropped so that a verification key is never a private key.
_PRIVATE_MEMBERS: frozenset[str] = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


MAX_JWKS_BYTES = 256_000


class JwksError(Exception):
    """No usable key could be found or loaded. ``str()`` is a short reason, safe to log."""


def loggable(value: object, limit: int = 80) -> str:
    """A short, escaped rendering of an untrusted value for log messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class JwksLocation:
    """Where a JWK Set lives: exactly one of ``url`` and ``file``."""

    url: str | None = None
    file: Path | None = None

    def __post_init__(self) -> None:
        if (self.url is None) == (self.file is None):
            raise ValueError("JwksLocation needs exactly one of url and file")

    def __str__(self) -> str:
        return self.url if self.url is not None else f"file {self.file}"


def algorithm_for_jwk(jwk: Mapping[str, Any]) -> str | None:
    """The one algorithm a JWK may verify, or None when the key is unusable for CDS Hooks."""
    use = jwk.get("use")
    if use is not None and use != "sig":
        return None
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return None
    kty = jwk.get("kty")
    if kty == "EC" and jwk.get("crv") == "P-384":
        expected = "ES384"
    elif kty == "RSA":
        expected = "RS384"
    else:
        return None
    alg = jwk.get("alg")
    if alg is not None and alg != expected:
        return None
    return expected


def parse_jwks(document: object) -> tuple[PyJWK, ...]:
    """The usable verification keys of a JWK Set document (unusable members are skipped)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWK Set (no 'keys' array)")
    keys: list[PyJWK] = []
    for member in document["keys"]:
        if not isinstance(member, dict):
            continue
        algorithm = algorithm_for_jwk(member)
        if algorithm is None:
            continue
        public = {name: value for name, value in member.items() if name not in _PRIVATE_MEMBERS}
        try:
            keys.append(PyJWK(public, algorithm=algorithm))
        except (PyJWTError, ValueError, TypeError):
            continue
    return tuple(keys)


def read_jwks_file(path: Path, max_bytes: int = MAX_JWKS_BYTES) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise JwksError(f"cannot read JWK Set file ({type(exc).__name__})") from None
    if len(raw) > max_bytes:
        raise JwksError("JWK Set file too large")
    return raw


def check_jwks_file(path: Path) -> None:
    """Refuse, at start-up, a configured JWK Set file that could not verify any call: unreadable, not JSON, not a
    JWK Set, or without an ES384/RS384 key. (It is read again when keys are looked up, so it can be replaced.)"""
    try:
        document = json.loads(read_jwks_file(path))
    except (ValueError, RecursionError):
        raise JwksError("JWK Set file is not valid JSON") from None
    if not parse_jwks(document):
        raise JwksError("JWK Set file holds no ES384/RS384 signing key")


@dataclass(frozen=True)
class _KeySet:
    keys: tuple[PyJWK, ...]
    loaded_at: float

    def find(self, kid: str | None) -> PyJWK | None:
        if kid is None:
            # The spec requires kid; a token without one is accepted only when the choice is unambiguous.
            return self.keys[0] if len(self.keys) == 1 else None
        for key in self.keys:
            if key.key_id == kid:
                return key
        return None


class JwksProvider:
    """Thread-safe cache of JWK Sets, keyed by location, with per-issuer refetch rate limiting."""

    def __init__(
        self,
        *,
        cache_s: float,
        min_refetch_s: float = 30.0,
        timeout_s: float = 5.0,
        http_client: httpx.Client | None = None,
        max_bytes: int = MAX_JWKS_BYTES,
        clock: Callable[[], float] = time.monotonic,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._cache_s = cache_s
        self._min_refetch_s = min_refetch_s
        self._timeout_s = timeout_s
        self._http = http_client
        self._owns_http = http_client is None
        self._max_bytes = max_bytes
        self._clock = clock
        self._ssl_context = ssl_context
        self._state_lock = threading.Lock()
        self._location_locks: dict[JwksLocation, threading.Lock] = {}
        self._sets: dict[JwksLocation, _KeySet] = {}
        self._failed_at: dict[JwksLocation, float] = {}
        self._last_fetch: dict[str, float] = {}

    # --- public ------------------------------------------------------------------------------
    def signing_key(self, issuer: str, location: JwksLocation, kid: str | None) -> PyJWK:
        """The key ``kid`` of ``issuer``'s set at ``location``; raises JwksError when there is none."""
        with self._lock_for(location):
            keyset = self._current(issuer, location)
            key = keyset.find(kid)
            if key is not None:
                return key
            if kid is None:
                raise JwksError(f"token has no kid and the JWK Set of {issuer} does not hold exactly one usable key")
            if self._may_refetch(issuer):
                log.info("unknown kid %s for issuer %s: refetching %s", loggable(kid), issuer, location)
                keyset = self._load(issuer, location, stale=keyset)
                key = keyset.find(kid)
                if key is not None:
                    return key
            raise JwksError(f"no usable key with kid {loggable(kid)} for issuer {issuer}")

    def close(self) -> None:
        if self._owns_http and self._http is not None:
            self._http.close()
            self._http = None

    # --- cache -------------------------------------------------------------------------------
    def _lock_for(self, location: JwksLocation) -> threading.Lock:
        with self._state_lock:
            lock = self._location_locks.get(location)
            if lock is None:
                lock = self._location_locks[location] = threading.Lock()
            return lock

    def _may_refetch(self, issuer: str) -> bool:
        with self._state_lock:
            last = self._last_fetch.get(issuer)
            return last is None or self._clock() - last >= self._min_refetch_s

    def _current(self, issuer: str, location: JwksLocation) -> _KeySet:
        now = self._clock()
        with self._state_lock:
            keyset = self._sets.get(location)
            failed_at = self._failed_at.get(location)
        if keyset is not None and now - keyset.loaded_at < self._cache_s:
            return keyset
        if failed_at is not None and now - failed_at < self._min_refetch_s:
            if keyset is not None:
                return keyset
            raise JwksError(f"JWK Set of issuer {issuer} is unavailable (last load failed)")
        return self._load(issuer, location, stale=keyset)

    def _load(self, issuer: str, location: JwksLocation, *, stale: _KeySet | None) -> _KeySet:
        now = self._clock()
        with self._state_lock:
            self._last_fetch[issuer] = now
        try:
            keys = parse_jwks(self._read(location))
        except JwksError as exc:
            with self._state_lock:
                self._failed_at[location] = now
            if stale is not None:
                log.warning("JWK Set load from %s failed (%s); keeping the cached set", location, exc)
                return stale
            log.warning("JWK Set load from %s failed (%s)", location, exc)
            raise
        keyset = _KeySet(keys, now)
        with self._state_lock:
            self._sets[location] = keyset
            self._failed_at.pop(location, None)
        if not keys:
            log.warning("JWK Set at %s holds no ES384/RS384 signing key", location)
        return keyset

    # --- I/O ---------------------------------------------------------------------------------
    def _read(self, location: JwksLocation) -> object:
        if location.url is not None:
            raw = self._fetch(location.url)
        elif location.file is not None:
            raw = read_jwks_file(location.file, self._max_bytes)
        else:  # pragma: no cover - excluded by JwksLocation.__post_init__
            raise JwksError("JWK Set location is empty")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise JwksError("JWK Set is not valid JSON") from None

    def _fetch(self, url: str) -> bytes:
        if self._http is None:
            verify = self._ssl_context if self._ssl_context is not None else client_ssl_context()
            self._http = httpx.Client(timeout=self._timeout_s, follow_redirects=False, verify=verify)
        body = bytearray()
        try:
            with self._http.stream(
                "GET",
                url,
                headers={"Accept": "application/jwk-set+json, application/json"},
                timeout=self._timeout_s,
                follow_redirects=False,
            ) as response:
                if response.status_code != 200:
                    raise JwksError(f"JWK Set fetch returned HTTP {response.status_code}")
                for chunk in response.iter_bytes():
                    body.extend(chunk)
                    if len(body) > self._max_bytes:
                        raise JwksError("JWK Set response too large")
        except httpx.HTTPError as exc:
            raise JwksError(f"JWK Set fetch failed ({tls_problem(exc) or type(exc).__name__})") from None
        return bytes(body)
