"""Verification of the JWT a CDS Client (EHR) sends with every CDS Hooks call (CDS Hooks 2.0, "Trusting CDS Clients").

``Authorization: Bearer <JWT>`` must be a compact JWS signed with ES384 or RS384 by a trusted issuer.
The key comes from the issuer's configured JWK Set, or from a ``jku`` header only when that URL is
on the issuer's allowlist or is the issuer's configured ``jwks_url`` (compared after normalisation).
Claims: ``iss`` trusted, ``aud`` equal to the service URL called (string or
list), ``exp``/``iat`` required (``nbf`` optional) with clock skew, lifetime at most
``jwt_max_lifetime_s``, ``jti`` required and not replayed, ``tenant`` allowlisted when configured.

Every refusal raises ``AuthenticationError`` whose ``str()`` is a short reason for server logs: it
never holds the token, and of the claims only ``iss`` (and the ``kid`` header).

This module is framework-agnostic; the HTTP layer maps ``AuthenticationError`` to a bare 401.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import jwt
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    InvalidKeyError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWTError,
)

from service.config import SANDBOX_ISSUER, Settings, TrustedIssuer
from service.security.jwks import ALLOWED_ALGORITHMS, JwksError, JwksLocation, JwksProvider, loggable
from service.security.replay import MemoryReplayCache, RedisReplayCache, ReplayCache, ReplayCacheError
from service.tls import client_ssl_context

log = logging.getLogger(__name__)

#: The ``jku`` the public CDS Hooks Sandbox puts in its tokens. It cannot be fetched offline, so for the
#: sandbox issuer it is mapped to the local copy of the sandbox key set (``settings.sandbox_jwks_file``).
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"

#: Longest Authorization token accepted (EHR tokens are around 1 kB).
MAX_TOKEN_CHARS = 16_384
#: Longest jti accepted.
MAX_JTI_CHARS = 512

_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "jti"]


class AuthenticationError(Exception):
    """The caller could not be authenticated. ``str()`` is a short reason for server logs only."""


@dataclass(frozen=True)
class VerifiedCaller:
    """Who called: the verified token's identity, or ``authenticated=False`` (dev mode, no token)."""

    iss: str | None
    sub: str | None
    jti: str | None
    tenant: str | None
    kid: str | None
    authenticated: bool

    @classmethod
    def unauthenticated(cls) -> VerifiedCaller:
        return cls(iss=None, sub=None, jti=None, tenant=None, kid=None, authenticated=False)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalized_url(url: str) -> str:
    """``url`` with its scheme and host in lower case, a default port dropped and an empty path as ``/``; the rest
    (user information, path, query, fragment) exactly as given. Anything but an http(s) URL with a host: unchanged."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return url
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return url
    userinfo, at, _ = parts.netloc.rpartition("@")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = f"{userinfo}{at}{host}" + (f":{port}" if port is not None and port != _DEFAULT_PORTS[scheme] else "")
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, parts.fragment))


@dataclass(frozen=True)
class IssuerTrust:
    """How one trusted issuer's keys are found, and which tenants it may speak for.

    ``jku_locations``: the ``jku`` header values honoured, each mapped to the JWK Set it selects (keys compared
    after :func:`normalized_url`)."""

    iss: str
    location: JwksLocation | None = None
    jku_locations: Mapping[str, JwksLocation] = field(default_factory=dict)
    tenants: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "jku_locations", {normalized_url(jku): location for jku, location in self.jku_locations.items()})

    @classmethod
    def from_config(cls, issuer: TrustedIssuer) -> IssuerTrust:
        location: JwksLocation | None = None
        jku_locations = {jku: JwksLocation(url=jku) for jku in issuer.jku_allowlist}
        if issuer.jwks_url:
            location = JwksLocation(url=issuer.jwks_url)
            # EHRs (Epic, the CDS Hooks Sandbox) name their published key set in the header too.
            jku_locations[issuer.jwks_url] = location
        elif issuer.jwks_file is not None:
            location = JwksLocation(file=Path(issuer.jwks_file))
        return cls(iss=issuer.iss, location=location, jku_locations=jku_locations, tenants=frozenset(issuer.tenants))

    @classmethod
    def sandbox(cls, jwks_file: Path) -> IssuerTrust:
        """The public CDS Hooks Sandbox, with its key set read from a local file even when ``jku`` is sent."""
        local = JwksLocation(file=Path(jwks_file))
        return cls(iss=SANDBOX_ISSUER, location=local, jku_locations={SANDBOX_JKU: local})

    def location_for(self, jku: str | None) -> JwksLocation:
        if jku is None:
            if self.location is None:
                raise AuthenticationError(f"token has no jku and no JWK Set is configured for issuer {self.iss}")
            return self.location
        location = self.jku_locations.get(normalized_url(jku))
        if location is None:
            raise AuthenticationError(f"jku not on the allowlist of issuer {self.iss}")
        return location


class JwtVerifier:
    """Verifies ``Authorization`` headers of CDS Hooks calls. Thread-safe."""

    def __init__(
        self,
        issuers: Iterable[IssuerTrust],
        *,
        jwks: JwksProvider,
        replay_cache: ReplayCache,
        clock_skew_s: int = 60,
        max_lifetime_s: int = 3600,
        dev_mode: bool = False,
    ) -> None:
        self._issuers: dict[str, IssuerTrust] = {}
        for issuer in issuers:
            if issuer.iss in self._issuers:
                raise ValueError(f"issuer {issuer.iss} is configured more than once")
            self._issuers[issuer.iss] = issuer
        self._jwks = jwks
        self._replay = replay_cache
        self._skew = clock_skew_s
        self._max_lifetime = max_lifetime_s
        self._dev_mode = dev_mode

    def replay_cache_available(self) -> bool:
        """Whether the jti replay cache can record a token now (without it every signed call is refused)."""
        return self._replay.available()

    def verify(self, authorization_header: str | None, audience: str) -> VerifiedCaller:
        """Verify the ``Authorization`` header of a call to the service at URL ``audience``.

        Raises AuthenticationError on every failure. In dev mode a missing header is let through
        as ``VerifiedCaller(authenticated=False)``; a header that is present is always verified.
        """
        if authorization_header is None or not authorization_header.strip():
            if self._dev_mode:
                return VerifiedCaller.unauthenticated()
            raise AuthenticationError("missing Authorization header")
        try:
            return self._verify_token(_bearer_token(authorization_header), audience)
        except AuthenticationError:
            raise
        except Exception as exc:  # contract: only AuthenticationError leaves verify()
            log.error("unexpected %s while verifying a CDS Hooks JWT", type(exc).__name__)
            raise AuthenticationError(f"token verification error ({type(exc).__name__})") from None

    def close(self) -> None:
        self._jwks.close()
        close = getattr(self._replay, "close", None)
        if callable(close):
            close()

    # --- steps -------------------------------------------------------------------------------
    def _verify_token(self, token: str, audience: str) -> VerifiedCaller:
        # 1. Read header and claims unverified, only to choose the issuer and key.
        try:
            unverified = jwt.decode_complete(token, options={"verify_signature": False})
        except PyJWTError:
            raise AuthenticationError("malformed token") from None
        header: dict[str, Any] = unverified["header"]
        unverified_claims: dict[str, Any] = unverified["payload"]

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise AuthenticationError(f"alg {loggable(alg, 20)} not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationError("kid header is not a string")
        jku = header.get("jku")
        if jku is not None and not isinstance(jku, str):
            raise AuthenticationError("jku header is not a string")

        iss = unverified_claims.get("iss")
        if not isinstance(iss, str):
            raise AuthenticationError("iss missing or not a string")
        trust = self._issuers.get(iss)
        if trust is None:
            raise AuthenticationError(f"untrusted issuer {loggable(iss)}")

        # 2. The key: from the issuer's configured set, or an allowlisted jku.
        location = trust.location_for(jku)
        try:
            key = self._jwks.signing_key(iss, location, kid)
        except JwksError as exc:
            raise AuthenticationError(str(exc)) from None

        # 3. Signature and registered claims. The key is bound to one algorithm (ES384 or RS384).
        claims = self._decode(token, key, audience, iss)

        # 4. What PyJWT does not check.
        exp, iat = claims["exp"], claims["iat"]
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)):
                raise AuthenticationError(f"{name} is not a number")
        if exp <= iat:
            raise AuthenticationError("exp is not after iat")
        if exp - iat > self._max_lifetime:
            raise AuthenticationError(f"token lifetime exceeds {self._max_lifetime} s (issuer {iss})")

        jti = claims["jti"]
        if not isinstance(jti, str) or not jti.strip() or len(jti) > MAX_JTI_CHARS:
            raise AuthenticationError("jti is empty or invalid")
        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise AuthenticationError("sub is not a string")
        tenant = claims.get("tenant")
        if tenant is not None and not isinstance(tenant, str):
            raise AuthenticationError("tenant is not a string")
        if trust.tenants and tenant not in trust.tenants:
            raise AuthenticationError(f"tenant missing or not allowed for issuer {iss}")

        # 5. Replay: last, so that only fully verified tokens take room in the cache.
        try:
            first = self._replay.first_use(iss, jti, float(exp) + self._skew)
        except ReplayCacheError as exc:
            raise AuthenticationError(str(exc)) from None
        if not first:
            raise AuthenticationError(f"jti replayed (issuer {iss})")

        key_id = key.key_id if isinstance(key.key_id, str) else kid
        return VerifiedCaller(iss=iss, sub=sub, jti=jti, tenant=tenant, kid=key_id, authenticated=True)

    def _decode(self, token: str, key: jwt.PyJWK, audience: str, iss: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[key.algorithm_name],
                audience=audience,
                issuer=iss,
                leeway=self._skew,
                options={
                    "verify_signature": True,
                    "require": list(_REQUIRED_CLAIMS),
                    "verify_aud": True,
                    "verify_iss": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,
                    "verify_jti": True,
                    "verify_sub": True,
                    "strict_aud": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except InvalidSignatureError:
            raise AuthenticationError(f"bad signature (issuer {iss})") from None
        except InvalidAlgorithmError:
            raise AuthenticationError(f"alg does not match the key (issuer {iss})") from None
        except InvalidKeyError:
            raise AuthenticationError(f"issuer key unusable (issuer {iss})") from None
        except MissingRequiredClaimError as exc:
            raise AuthenticationError(f"required claim {exc.claim} missing (issuer {iss})") from None
        except ExpiredSignatureError:
            raise AuthenticationError(f"token expired (issuer {iss})") from None
        except ImmatureSignatureError:
            raise AuthenticationError(f"token not yet valid: nbf or iat in the future (issuer {iss})") from None
        except InvalidIssuedAtError:
            raise AuthenticationError(f"iat is not a number (issuer {iss})") from None
        except InvalidAudienceError:
            raise AuthenticationError(f"aud does not match the service URL (issuer {iss})") from None
        except InvalidIssuerError:
            raise AuthenticationError("iss mismatch") from None
        except PyJWTError as exc:
            raise AuthenticationError(f"invalid token: {type(exc).__name__} (issuer {iss})") from None
        return claims


def _bearer_token(authorization_header: str) -> str:
    parts = authorization_header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise AuthenticationError("Authorization header is not 'Bearer <token>'")
    token = parts[1]
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthenticationError("token too long")
    if _COMPACT_JWS.fullmatch(token) is None:
        raise AuthenticationError("token is not a compact JWS")
    return token


def build_verifier(
    settings: Settings,
    *,
    http_client: httpx.Client | None = None,
    jwks: JwksProvider | None = None,
    replay_cache: ReplayCache | None = None,
) -> JwtVerifier:
    """The verifier the settings describe (Redis replay cache when ``redis_url`` is set)."""
    issuers = [IssuerTrust.from_config(issuer) for issuer in settings.trusted_issuers]
    if settings.trust_sandbox:
        issuers.append(IssuerTrust.sandbox(settings.sandbox_jwks_file))
    if jwks is None:
        jwks = JwksProvider(
            cache_s=settings.jwks_cache_s,
            min_refetch_s=settings.jwks_min_refetch_s,
            timeout_s=settings.jwks_timeout_s,
            http_client=http_client,
            ssl_context=client_ssl_context(settings.tls_ca_file),
        )
    if replay_cache is None:
        replay_cache = RedisReplayCache.from_url(settings.redis_url) if settings.redis_url else MemoryReplayCache()
    if not issuers and not settings.dev_mode:
        log.warning("no trusted CDS Hooks issuers are configured: every call will be refused")
    return JwtVerifier(
        issuers,
        jwks=jwks,
        replay_cache=replay_cache,
        clock_skew_s=settings.jwt_clock_skew_s,
        max_lifetime_s=settings.jwt_max_lifetime_s,
        dev_mode=settings.dev_mode,
    )
