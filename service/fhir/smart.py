"""SMART Backend Services: system-to-system access tokens for the monitored FHIR server.

Implements the client side of SMART App Launch 2.x "Backend Services" (client_credentials grant
with asymmetric client authentication, i.e. ``private_key_jwt`` per RFC 7523):

1. **Discovery** - the token endpoint is ``token_endpoint`` of
   ``{fhir_base}/.well-known/smart-configuration`` unless ``CDS_SMART_TOKEN_URL`` pins it.
2. **Client assertion** - a JWT signed with the client's registered private key:
   header ``alg`` (RS384 or ES384, the two algorithms the spec requires servers to support),
   ``kid`` (the key id registered in the client's JWK Set) and ``typ: JWT``; claims ``iss`` =
   ``sub`` = client_id, ``aud`` = the token endpoint URL, ``exp`` no more than five minutes in the
   future, and a unique ``jti`` (servers reject replays).
3. **Token request** - ``POST`` form-encoded ``grant_type=client_credentials``, ``scope``,
   ``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`` and
   ``client_assertion``. The response carries ``access_token``, ``token_type`` (bearer) and
   ``expires_in`` (required by the spec for backend services; no refresh token is issued).
4. **Caching** - the access token is reused until shortly before ``expires_in`` elapses, then a
   new assertion is built and a new token requested. One lock serialises refreshes, so many
   threads sharing a provider cause one token request, not a stampede.

The private key never leaves this module; the assertion and access token are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.fhir.errors import FhirAuthError, FhirTransientError, json_object, redact_url
from service.tls import client_ssl_context, tls_problem

if TYPE_CHECKING:
    from service.config import Settings

__all__ = [
    "CLIENT_ASSERTION_TYPE",
    "SmartAlg",
    "SmartBackendAuth",
    "jwk_thumbprint",
    "load_private_key",
    "public_jwk",
]

log = logging.getLogger(__name__)

SmartAlg = Literal["RS384", "ES384"]
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: The spec caps the assertion lifetime at five minutes.
MAX_ASSERTION_LIFETIME_S = 300
_OAUTH_ERROR_CODE = re.compile(r"^[a-z_]{1,40}$")
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def load_private_key(source: Path | str | bytes, alg: SmartAlg) -> PrivateKey:
    """Load a PEM private key (a path, or the PEM itself) and check it suits ``alg``.

    RS384 needs an RSA key of at least 2048 bits; ES384 needs an EC key on P-384 (the curve
    the algorithm is defined on). Encrypted PEMs are not supported: mount the key unencrypted
    with restrictive permissions, as a secret.
    """
    try:
        if isinstance(source, Path):
            pem = source.read_bytes()
        elif isinstance(source, str):
            pem = source.encode("ascii") if source.lstrip().startswith("-----BEGIN") else Path(source).read_bytes()
        else:
            pem = source
    except OSError as exc:
        raise FhirAuthError(f"cannot read the SMART private key file ({type(exc).__name__})") from exc
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise FhirAuthError("SMART private key is not an unencrypted PEM private key") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise FhirAuthError("SMART private key must be RSA (RS384) or EC P-384 (ES384)")
    _check_loaded_key(key, alg)
    return key


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_bytes(n: int, length: int | None = None) -> bytes:
    return n.to_bytes(length or max(1, (n.bit_length() + 7) // 8), "big")


def _jwk_members(key: PrivateKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> dict[str, str]:
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    if isinstance(pub, rsa.RSAPublicKey):
        rsa_nums = pub.public_numbers()
        return {"e": _b64u(_int_bytes(rsa_nums.e)), "kty": "RSA", "n": _b64u(_int_bytes(rsa_nums.n))}
    if isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP384R1):
        ec_nums = pub.public_numbers()
        return {"crv": "P-384", "kty": "EC", "x": _b64u(_int_bytes(ec_nums.x, 48)), "y": _b64u(_int_bytes(ec_nums.y, 48))}
    raise FhirAuthError("only RSA and EC P-384 keys are supported")


def jwk_thumbprint(key: PrivateKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the default ``kid`` when none is configured."""
    members = _jwk_members(key)
    canonical = orjson.dumps(dict(sorted(members.items())))
    return _b64u(hashlib.sha256(canonical).digest())


def public_jwk(key: PrivateKey, *, alg: SmartAlg, kid: str | None = None) -> dict[str, str]:
    """The public JWK to register with the EHR (publish as ``{"keys": [jwk]}``)."""
    return {**_jwk_members(key), "alg": alg, "use": "sig", "kid": kid or jwk_thumbprint(key)}


@dataclass(frozen=True, slots=True)
class _CachedToken:
    value: str
    refresh_at: float  # monotonic seconds


class SmartBackendAuth:
    """Access-token provider for SMART Backend Services (thread-safe, cached).

    Use as the ``auth`` of :class:`service.fhir.client.FhirClient`; it satisfies the client's
    ``TokenProvider`` protocol (``get_token()`` / ``invalidate()``).

    :param client_id: the client id the EHR assigned at registration (``iss`` and ``sub``).
    :param private_key: a loaded key, PEM bytes, or a path to the PEM file.
    :param alg: ``RS384`` or ``ES384``.
    :param scope: space-separated SMART v2 system scopes to request.
    :param key_id: ``kid`` header; defaults to the key's RFC 7638 thumbprint.
    :param token_url: pins the token endpoint (skips discovery).
    :param fhir_base_url: where ``.well-known/smart-configuration`` is discovered.
    :param refresh_margin_s: refresh this long before expiry (at most half the lifetime).
    :param assertion_lifetime_s: ``exp - now`` of the client assertion (capped at 300 s).
    :param http: an httpx client to use (not closed by :meth:`close`); else one is created,
        over ``transport`` if given.
    """

    def __init__(
        self,
        *,
        client_id: str,
        private_key: PrivateKey | Path | str | bytes,
        alg: SmartAlg = "RS384",
        scope: str,
        key_id: str | None = None,
        token_url: str | None = None,
        fhir_base_url: str | None = None,
        timeout_s: float = 5.0,
        refresh_margin_s: float = 60.0,
        assertion_lifetime_s: int = MAX_ASSERTION_LIFETIME_S,
        http: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not client_id:
            raise FhirAuthError("SMART backend auth needs a client id")
        if token_url is None and fhir_base_url is None:
            raise FhirAuthError("SMART backend auth needs a token URL or the FHIR base URL to discover it")
        self.client_id = client_id
        self.alg: SmartAlg = alg
        self.scope = scope
        if isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            _check_loaded_key(private_key, alg)
            self._key: PrivateKey = private_key
        else:
            self._key = load_private_key(private_key, alg)
        self.key_id = key_id or jwk_thumbprint(self._key)
        self._token_url = token_url
        self._fhir_base_url = fhir_base_url.rstrip("/") if fhir_base_url else None
        self._refresh_margin_s = refresh_margin_s
        self._assertion_lifetime_s = max(1, min(int(assertion_lifetime_s), MAX_ASSERTION_LIFETIME_S))
        self._owns_http = http is None
        self._http = http or httpx.Client(
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            follow_redirects=False,
            verify=ssl_context if ssl_context is not None else client_ssl_context(),
        )
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self._lock = threading.Lock()  # token cache
        self._discovery_lock = threading.Lock()  # taken inside _lock during a refresh: never the reverse
        self._cached: _CachedToken | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        http: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> SmartBackendAuth:
        """Build from ``CDS_SMART_*`` settings (client id, key file, key id, alg, scope, token URL)."""
        if not settings.smart_client_id:
            raise FhirAuthError("CDS_FHIR_AUTH_MODE=smart-backend needs CDS_SMART_CLIENT_ID")
        if settings.smart_private_key_file is None:
            raise FhirAuthError("CDS_FHIR_AUTH_MODE=smart-backend needs CDS_SMART_PRIVATE_KEY_FILE")
        return cls(
            client_id=settings.smart_client_id,
            private_key=Path(settings.smart_private_key_file),
            alg=settings.smart_alg,
            scope=settings.smart_scope,
            key_id=settings.smart_key_id,
            token_url=settings.smart_token_url,
            fhir_base_url=settings.fhir_base_url,
            timeout_s=settings.fhir_timeout_s,
            http=http,
            transport=transport,
            ssl_context=client_ssl_context(settings.tls_ca_file),
        )

    # --- public API ---------------------------------------------------------------------------
    def get_token(self) -> str:
        """A valid access token, from cache or freshly requested (blocks other refreshers)."""
        cached = self._cached
        if cached is not None and self._monotonic() < cached.refresh_at:
            return cached.value
        with self._lock:
            cached = self._cached
            if cached is not None and self._monotonic() < cached.refresh_at:
                return cached.value
            self._cached = self._request_token()
            return self._cached.value

    def invalidate(self, token: str | None = None) -> None:
        """Forget the cached token (after a 401). With ``token``, only if it is still the cached one,
        so a burst of 401s from requests that raced a refresh does not discard the new token."""
        with self._lock:
            if token is None or (self._cached is not None and self._cached.value == token):
                self._cached = None

    def token_endpoint(self) -> str:
        """The token endpoint URL: configured, or discovered once from smart-configuration."""
        if self._token_url is None:
            with self._discovery_lock:
                if self._token_url is None:
                    self._token_url = self._discover()
        return self._token_url

    def build_client_assertion(self, token_url: str | None = None) -> str:
        """A freshly signed client assertion JWT (new ``jti`` each call)."""
        aud = token_url or self.token_endpoint()
        now = int(self._wall_clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": aud,
            "iat": now,
            "exp": now + self._assertion_lifetime_s,
            "jti": secrets.token_urlsafe(32),
        }
        return jwt.encode(claims, self._key, algorithm=self.alg, headers={"kid": self.key_id, "typ": "JWT"})

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    # --- internals ----------------------------------------------------------------------------
    def _discover(self) -> str:
        assert self._fhir_base_url is not None
        url = f"{self._fhir_base_url}/.well-known/smart-configuration"
        data = self._get_json(url, what="SMART configuration")
        endpoint = data.get("token_endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise FhirAuthError("SMART configuration has no token_endpoint", url=url)
        self._check_endpoint_scheme(endpoint)
        methods = data.get("token_endpoint_auth_methods_supported")
        if isinstance(methods, list) and "private_key_jwt" not in methods:
            log.warning("SMART configuration does not list private_key_jwt; trying anyway", extra={"url": redact_url(url)})
        algs = data.get("token_endpoint_auth_signing_alg_values_supported")
        if isinstance(algs, list) and self.alg not in algs:
            log.warning("SMART configuration does not list %s among signing algorithms", self.alg)
        return endpoint

    def _check_endpoint_scheme(self, endpoint: str) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in {"http", "https"}:
            raise FhirAuthError("SMART token endpoint is not an http(s) URL")
        base_scheme = urlsplit(self._fhir_base_url or "").scheme
        if parts.scheme == "http" and base_scheme == "https" and parts.hostname not in _LOOPBACK:
            raise FhirAuthError("SMART token endpoint downgrades https to http", url=endpoint)

    def _get_json(self, url: str, *, what: str) -> dict[str, Any]:
        try:
            resp = self._http.get(url, headers={"Accept": "application/json"})
        except httpx.TimeoutException as exc:
            raise FhirTransientError(f"{what}: timeout on GET {redact_url(url)}", url=url) from exc
        except httpx.TransportError as exc:
            raise FhirTransientError(f"{what}: {tls_problem(exc) or type(exc).__name__} on GET {redact_url(url)}", url=url) from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            raise FhirTransientError(f"{what}: GET {redact_url(url)} -> {resp.status_code}", status=resp.status_code, url=url)
        if resp.status_code != 200:
            raise FhirAuthError(
                f"{what}: GET {redact_url(url)} -> {resp.status_code} (set CDS_SMART_TOKEN_URL to skip discovery)",
                status=resp.status_code,
                url=url,
            )
        return json_object(resp, url, what)

    def _request_token(self) -> _CachedToken:
        token_url = self.token_endpoint()
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.build_client_assertion(token_url),
        }
        started = self._monotonic()
        try:
            resp = self._http.post(token_url, data=form, headers={"Accept": "application/json"})
        except httpx.TimeoutException as exc:
            raise FhirTransientError(f"SMART token request: timeout on POST {redact_url(token_url)}", url=token_url) from exc
        except httpx.TransportError as exc:
            kind = tls_problem(exc) or type(exc).__name__
            raise FhirTransientError(f"SMART token request: {kind} on POST {redact_url(token_url)}", url=token_url) from exc
        status = resp.status_code
        if status == 429 or status >= 500:
            raise FhirTransientError(f"SMART token request: POST {redact_url(token_url)} -> {status}", status=status, url=token_url)
        if status != 200:
            code = _oauth_error_code(resp)
            raise FhirAuthError(
                f"SMART token request refused: POST {redact_url(token_url)} -> {status}{f' ({code})' if code else ''}",
                status=status,
                url=token_url,
            )
        data = json_object(resp, token_url, "SMART token response")
        access_token = data.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise FhirAuthError("SMART token response has no access_token", url=token_url)
        token_type = data.get("token_type")
        if isinstance(token_type, str) and token_type.lower() != "bearer":
            raise FhirAuthError("SMART token response is not a bearer token", url=token_url)
        expires_in = data.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
            log.warning("SMART token response lacks a valid expires_in; assuming 300 s")
            expires_in = 300
        margin = min(self._refresh_margin_s, float(expires_in) / 2)
        log.info("obtained SMART access token", extra={"expires_in": expires_in, "token_url": redact_url(token_url)})
        return _CachedToken(value=access_token, refresh_at=started + float(expires_in) - margin)


def _check_loaded_key(key: PrivateKey, alg: str) -> None:
    if alg == "RS384" and not (isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048):
        raise FhirAuthError("RS384 needs an RSA private key of at least 2048 bits")
    if alg == "ES384" and not (isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)):
        raise FhirAuthError("ES384 needs an EC private key on curve P-384")
    if alg not in {"RS384", "ES384"}:
        raise FhirAuthError("unsupported SMART signing algorithm (RS384 or ES384)")


def _oauth_error_code(resp: httpx.Response) -> str | None:
    """The RFC 6749 ``error`` code of a refusal (an enumerated token such as ``invalid_client``);
    free-text ``error_description`` is never surfaced."""
    try:
        data = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return None
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and _OAUTH_ERROR_CODE.match(code) else None
