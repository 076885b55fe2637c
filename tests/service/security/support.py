"""Helpers for the JWT verification tests: real keys, a real local JWKS HTTP server, token builders."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import redis
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from redis.backoff import NoBackoff
from redis.retry import Retry

ISS = "https://ehr.example.org"
AUD = "https://cds.example.org/cds-services/calciphylaxis-risk"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(obj: object) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode("utf-8"))


@dataclass(frozen=True)
class SigningKey:
    """A private key, its kid, the algorithm it signs with, and its public JWK."""

    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    kid: str
    alg: str

    @property
    def public_jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        jwk = ECAlgorithm.to_jwk(public, as_dict=True) if isinstance(public, ec.EllipticCurvePublicKey) else RSAAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.public_jwk]}


def new_ec_key(kid: str | None = None) -> SigningKey:
    return SigningKey(ec.generate_private_key(ec.SECP384R1()), kid or f"ec-{uuid.uuid4()}", "ES384")


def new_rsa_key(kid: str | None = None) -> SigningKey:
    return SigningKey(rsa.generate_private_key(public_exponent=65537, key_size=2048), kid or f"rsa-{uuid.uuid4()}", "RS384")


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid CDS Hooks claims for ISS calling AUD; keyword ``name=None`` removes a claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISS,
        "sub": "ehr-client-id",
        "aud": AUD,
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    key: SigningKey,
    payload: dict[str, Any] | None = None,
    *,
    kid: str | bool | None = True,
    alg: str | None = None,
    **headers: Any,
) -> str:
    """A token signed by ``key``; ``kid=True`` uses the key's kid, ``kid=None`` omits it."""
    header = dict(headers)
    if kid is True:
        header["kid"] = key.kid
    elif isinstance(kid, str):
        header["kid"] = kid
    return jwt.encode(payload if payload is not None else claims(), key.private, algorithm=alg or key.alg, headers=header)


def bearer(token: str) -> str:
    return f"Bearer {token}"


class JwksServer:
    """A threaded HTTP server on 127.0.0.1 serving JSON documents by path, counting requests."""

    def __init__(self) -> None:
        self.documents: dict[str, object] = {}
        self.status: dict[str, int] = {}
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.hits[self.path] += 1
                    document = server.documents.get(self.path)
                    status = server.status.get(self.path, 200 if document is not None else 404)
                body = json.dumps(document).encode("utf-8") if document is not None else b"{}"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}{path}"

    def publish(self, path: str, document: object, status: int | None = None) -> str:
        with self._lock:
            self.documents[path] = document
            if status is not None:
                self.status[path] = status
        return self.url(path)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def unreachable_redis() -> redis.Redis:
    """A client for a port nothing listens on, without redis-py's reconnect retries."""
    return redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
