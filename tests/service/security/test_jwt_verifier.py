"""JwtVerifier: CDS Hooks 2.0 "Trusting CDS Clients", against real keys and a real local JWKS server."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import SANDBOX_ISSUER, Settings, TrustedIssuer
from service.security import (
    SANDBOX_JKU,
    AuthenticationError,
    JwksProvider,
    JwtVerifier,
    RedisReplayCache,
    ReplayCache,
    VerifiedCaller,
    build_verifier,
)
from service.security.jwt_verifier import normalized_url
from tests.conftest import ROOT, require_service
from tests.service.security.support import (
    AUD,
    ISS,
    FakeClock,
    JwksServer,
    SigningKey,
    b64url,
    b64url_json,
    bearer,
    claims,
    new_ec_key,
    new_rsa_key,
    sign,
    unreachable_redis,
)

MakeVerifier = Callable[..., JwtVerifier]


def make_settings(*issuers: TrustedIssuer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"trusted_issuers": list(issuers), "redis_url": None, "dev_mode": False, "trust_sandbox": False}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_verifier() -> Iterator[MakeVerifier]:
    """Build verifiers from Settings (optionally with a fake clock / replay cache); closes them afterwards."""
    created: list[JwtVerifier] = []

    def make(
        settings_: Settings,
        *,
        clock: Callable[[], float] | None = None,
        replay_cache: ReplayCache | None = None,
    ) -> JwtVerifier:
        jwks = None
        if clock is not None:
            jwks = JwksProvider(
                cache_s=settings_.jwks_cache_s,
                min_refetch_s=settings_.jwks_min_refetch_s,
                timeout_s=settings_.jwks_timeout_s,
                clock=clock,
            )
        verifier = build_verifier(settings_, jwks=jwks, replay_cache=replay_cache)
        created.append(verifier)
        return verifier

    yield make
    for verifier in created:
        verifier.close()


@pytest.fixture
def verifier(jwks_server: JwksServer, ec_key: SigningKey, rsa_key: SigningKey, make_verifier: MakeVerifier) -> JwtVerifier:
    """ISS trusted with a JWKS (one EC P-384 and one RSA key) served over HTTP."""
    url = jwks_server.publish("/ehr/jwks.json", {"keys": [ec_key.public_jwk, rsa_key.public_jwk]})
    return make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=url)))


def rejected(verifier: JwtVerifier, header: str | None, audience: str = AUD) -> str:
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(header, audience)
    reason = str(info.value)
    assert "verification error" not in reason  # an anticipated refusal, not the catch-all
    return reason


# --- valid tokens ----------------------------------------------------------------------------------


def test_valid_es384(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    payload = claims(tenant="hospital-a")
    caller = verifier.verify(bearer(sign(ec_key, payload)), AUD)
    assert caller == VerifiedCaller(
        iss=ISS, sub="ehr-client-id", jti=payload["jti"], tenant="hospital-a", kid=ec_key.kid, authenticated=True
    )


def test_valid_rs384(verifier: JwtVerifier, rsa_key: SigningKey) -> None:
    caller = verifier.verify(bearer(sign(rsa_key)), AUD)
    assert caller.authenticated and caller.kid == rsa_key.kid and caller.iss == ISS


def test_bearer_scheme_is_case_insensitive(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    assert verifier.verify(f"bearer   {sign(ec_key)}", AUD).authenticated


def test_jwks_is_cached(verifier: JwtVerifier, jwks_server: JwksServer, ec_key: SigningKey, rsa_key: SigningKey) -> None:
    for _ in range(3):
        verifier.verify(bearer(sign(ec_key)), AUD)
        verifier.verify(bearer(sign(rsa_key)), AUD)
    assert jwks_server.hits["/ehr/jwks.json"] == 1


# --- time claims -----------------------------------------------------------------------------------


def test_expired(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    now = int(time.time())
    assert "expired" in rejected(verifier, bearer(sign(ec_key, claims(iat=now - 600, exp=now - 120))))


def test_expired_within_skew_is_accepted(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    now = int(time.time())
    assert verifier.verify(bearer(sign(ec_key, claims(iat=now - 600, exp=now - 20))), AUD).authenticated


def test_not_yet_valid_nbf(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    now = int(time.time())
    assert "not yet valid" in rejected(verifier, bearer(sign(ec_key, claims(nbf=now + 300, exp=now + 600))))


def test_iat_in_the_future_beyond_skew(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    now = int(time.time())
    assert "not yet valid" in rejected(verifier, bearer(sign(ec_key, claims(iat=now + 300, exp=now + 600))))


def test_iat_in_the_future_within_skew_is_accepted(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    now = int(time.time())
    assert verifier.verify(bearer(sign(ec_key, claims(iat=now + 30, exp=now + 330))), AUD).authenticated


def test_fifteen_minute_token_accepted(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    now = int(time.time())
    assert verifier.verify(bearer(sign(ec_key, claims(iat=now, exp=now + 900))), AUD).authenticated


def test_over_long_lifetime_rejected(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    now = int(time.time())
    assert "lifetime" in rejected(verifier, bearer(sign(ec_key, claims(iat=now, exp=now + 3601))))


def test_lifetime_limit_follows_settings(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    url = jwks_server.publish("/ehr/jwks.json", ec_key.jwks())
    strict = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=url), jwt_max_lifetime_s=600))
    now = int(time.time())
    assert "lifetime" in rejected(strict, bearer(sign(ec_key, claims(iat=now, exp=now + 900))))
    assert strict.verify(bearer(sign(ec_key, claims(iat=now, exp=now + 600))), AUD).authenticated


def test_exp_not_after_iat_rejected(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    now = int(time.time())
    assert "exp is not after iat" in rejected(verifier, bearer(sign(ec_key, claims(iat=now + 50, exp=now + 40))))


@pytest.mark.parametrize("name", ["exp", "iat", "jti", "aud", "iss"])
def test_required_claims(verifier: JwtVerifier, ec_key: SigningKey, name: str) -> None:
    rejected(verifier, bearer(sign(ec_key, claims(**{name: None}))))


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": "9999999999"},
        {"iat": True},
        {"nbf": "0"},
        {"jti": ""},
        {"jti": 42},
        {"jti": "x" * 1000},
        {"sub": 7},
        {"tenant": ["a"]},
    ],
)
def test_claim_types(verifier: JwtVerifier, ec_key: SigningKey, overrides: dict[str, Any]) -> None:
    rejected(verifier, bearer(sign(ec_key, claims(**overrides))))


# --- audience --------------------------------------------------------------------------------------


def test_wrong_aud(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    token = sign(ec_key, claims(aud="https://cds.example.org/cds-services/other-service"))
    assert "aud" in rejected(verifier, bearer(token))


def test_aud_must_match_exactly(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    rejected(verifier, bearer(sign(ec_key, claims(aud=AUD + "/"))))
    rejected(verifier, bearer(sign(ec_key, claims(aud=AUD.upper()))))


def test_aud_list_containing_the_url(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    token = sign(ec_key, claims(aud=["https://other.example.org/cds-services", AUD]))
    assert verifier.verify(bearer(token), AUD).authenticated


def test_aud_list_without_the_url(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    rejected(verifier, bearer(sign(ec_key, claims(aud=["https://other.example.org/cds-services"]))))


def test_discovery_audience(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    discovery = "https://cds.example.org/cds-services"
    assert verifier.verify(bearer(sign(ec_key, claims(aud=discovery))), discovery).authenticated
    rejected(verifier, bearer(sign(ec_key, claims(aud=discovery))), AUD)


# --- replay ----------------------------------------------------------------------------------------


def test_replayed_jti_memory(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    token = sign(ec_key)
    assert verifier.verify(bearer(token), AUD).authenticated
    assert "replayed" in rejected(verifier, bearer(token))
    # A new token reusing the jti is a replay too.
    payload = jwt.decode(token, options={"verify_signature": False})
    assert "replayed" in rejected(verifier, bearer(sign(ec_key, claims(jti=payload["jti"]))))


def test_jti_is_per_issuer(jwks_server: JwksServer, make_verifier: MakeVerifier) -> None:
    key_a, key_b = new_ec_key(), new_ec_key()
    iss_b = "https://other-ehr.example.org"
    settings_ = make_settings(
        TrustedIssuer(iss=ISS, jwks_url=jwks_server.publish("/a.json", key_a.jwks())),
        TrustedIssuer(iss=iss_b, jwks_url=jwks_server.publish("/b.json", key_b.jwks())),
    )
    verifier = make_verifier(settings_)
    assert verifier.verify(bearer(sign(key_a, claims(jti="same"))), AUD).iss == ISS
    assert verifier.verify(bearer(sign(key_b, claims(iss=iss_b, jti="same"))), AUD).iss == iss_b
    rejected(verifier, bearer(sign(key_a, claims(jti="same"))))


def redis_client() -> redis.Redis:
    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1, socket_timeout=2)
    try:
        ok = bool(client.ping())
        why = ""
    except redis.RedisError as exc:
        ok, why = False, type(exc).__name__
    require_service("Redis at 127.0.0.1:6379", ok, why)
    return client


@pytest.mark.integration
def test_replayed_jti_redis(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    client = redis_client()
    prefix = f"test-calcinosis-jti-{uuid.uuid4()}:"
    cache = RedisReplayCache(client, prefix=prefix)
    try:
        url = jwks_server.publish("/ehr/jwks.json", ec_key.jwks())
        settings_ = make_settings(TrustedIssuer(iss=ISS, jwks_url=url), jwt_clock_skew_s=60)
        verifier = make_verifier(settings_, replay_cache=cache)
        now = int(time.time())
        payload = claims(iat=now, exp=now + 900)
        token = sign(ec_key, payload)
        assert verifier.verify(bearer(token), AUD).authenticated
        assert "replayed" in rejected(verifier, bearer(token))
        # A second verifier (another process) sharing the Redis cache also refuses it.
        other = make_verifier(settings_, replay_cache=RedisReplayCache(client, prefix=prefix))
        assert "replayed" in rejected(other, bearer(token))
        # The key expires with the token (exp + skew).
        ttl = client.ttl(cache.key(ISS, payload["jti"]))
        assert isinstance(ttl, int) and 900 < ttl <= 960 + 1
    finally:
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()


@pytest.mark.integration
def test_build_verifier_uses_redis_when_configured(
    jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier
) -> None:
    client = redis_client()
    client.close()
    url = jwks_server.publish("/ehr/jwks.json", ec_key.jwks())
    settings_ = make_settings(TrustedIssuer(iss=ISS, jwks_url=url), redis_url="redis://127.0.0.1:6379/0")
    first, second = make_verifier(settings_), make_verifier(settings_)
    token = sign(ec_key)
    assert first.verify(bearer(token), AUD).authenticated
    assert "replayed" in rejected(second, bearer(token))


def test_replay_cache_down_fails_closed(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    # Nothing listens on port 1: the Redis replay cache cannot answer, so the token is refused.
    down = RedisReplayCache(unreachable_redis())
    url = jwks_server.publish("/ehr/jwks.json", ec_key.jwks())
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=url)), replay_cache=down)
    assert "replay cache unavailable" in rejected(verifier, bearer(sign(ec_key)))


# --- issuers and algorithms ------------------------------------------------------------------------


def test_unknown_issuer(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    assert "untrusted issuer" in rejected(verifier, bearer(sign(ec_key, claims(iss="https://evil.example.org"))))


def test_issuer_bound_to_its_own_keys(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    other_key = new_ec_key()
    other_iss = "https://other-ehr.example.org"
    verifier = make_verifier(
        make_settings(
            TrustedIssuer(iss=ISS, jwks_url=jwks_server.publish("/a.json", ec_key.jwks())),
            TrustedIssuer(iss=other_iss, jwks_url=jwks_server.publish("/b.json", other_key.jwks())),
        )
    )
    # Signed by the other issuer's key but claiming to be ISS.
    rejected(verifier, bearer(sign(other_key, claims(iss=ISS))))


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64url_json(header)}.{b64url_json(payload)}.{b64url(signature)}"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
@pytest.mark.parametrize("signature", [b"", b"anything"])
def test_alg_none(verifier: JwtVerifier, ec_key: SigningKey, alg: str, signature: bytes) -> None:
    token = unsigned({"alg": alg, "typ": "JWT", "kid": ec_key.kid}, claims(), signature)
    rejected(verifier, bearer(token))


def hmac_token(secret: bytes, alg: str, kid: str) -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{b64url_json({'alg': alg, 'typ': 'JWT', 'kid': kid})}.{b64url_json(claims())}"
    signature = hmac.new(secret, signing_input.encode("ascii"), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
@pytest.mark.parametrize("which", ["ec", "rsa"])
def test_hmac_with_public_key_as_secret(
    verifier: JwtVerifier, ec_key: SigningKey, rsa_key: SigningKey, alg: str, which: str
) -> None:
    """The classic key-confusion attack: HMAC keyed with the issuer's published public key."""
    key = ec_key if which == "ec" else rsa_key
    public = key.private.public_key()
    for secret in (
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        json.dumps(key.public_jwk).encode(),
    ):
        assert "not allowed" in rejected(verifier, bearer(hmac_token(secret, alg, key.kid)))


def test_hmac_with_any_secret(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    token = jwt.encode(claims(), "a-long-enough-shared-secret-value-0123456789", algorithm="HS256", headers={"kid": ec_key.kid})
    assert "not allowed" in rejected(verifier, bearer(token))


def test_es256_rejected(jwks_server: JwksServer, make_verifier: MakeVerifier) -> None:
    p256 = SigningKey(ec.generate_private_key(ec.SECP256R1()), "p256", "ES256")
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=jwks_server.publish("/j.json", p256.jwks()))))
    assert "not allowed" in rejected(verifier, bearer(sign(p256)))


def test_rs256_rejected_even_with_a_trusted_rsa_key(verifier: JwtVerifier, rsa_key: SigningKey) -> None:
    assert "not allowed" in rejected(verifier, bearer(sign(rsa_key, alg="RS256")))


def test_alg_must_match_the_key_type(verifier: JwtVerifier, ec_key: SigningKey, rsa_key: SigningKey) -> None:
    # An RS384 signature presented under the EC key's kid.
    token = sign(rsa_key, kid=ec_key.kid)
    assert "alg does not match the key" in rejected(verifier, bearer(token))


def test_ps384_and_eddsa_rejected(verifier: JwtVerifier, rsa_key: SigningKey) -> None:
    rejected(verifier, bearer(sign(rsa_key, alg="PS384")))
    rejected(verifier, bearer(unsigned({"alg": "EdDSA", "kid": rsa_key.kid}, claims(), b"x" * 64)))


def test_rsa_jwk_without_alg_is_bound_to_rs384(jwks_server: JwksServer, make_verifier: MakeVerifier) -> None:
    key = new_rsa_key()
    jwk = {k: v for k, v in key.public_jwk.items() if k != "alg"}
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=jwks_server.publish("/j.json", {"keys": [jwk]}))))
    assert verifier.verify(bearer(sign(key)), AUD).authenticated
    rejected(verifier, bearer(sign(key, alg="RS256")))


def test_short_rsa_key_rejected(jwks_server: JwksServer, make_verifier: MakeVerifier) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak = SigningKey(rsa.generate_private_key(public_exponent=65537, key_size=1024), "weak", "RS384")
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=jwks_server.publish("/j.json", weak.jwks()))))
    with pytest.warns(Warning):  # PyJWT warns when *signing* with a short key
        token = sign(weak)
    assert "key unusable" in rejected(verifier, bearer(token))


# --- tampering ---------------------------------------------------------------------------------------


def test_tampered_signature(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    header, payload, signature = sign(ec_key).split(".")
    raw = bytearray(jwt.utils.base64url_decode(signature))
    raw[10] ^= 0x01
    assert "bad signature" in rejected(verifier, bearer(f"{header}.{payload}.{b64url(bytes(raw))}"))


def test_signature_from_another_key(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    impostor = SigningKey(ec.generate_private_key(ec.SECP384R1()), ec_key.kid, "ES384")
    assert "bad signature" in rejected(verifier, bearer(sign(impostor)))


def test_tampered_payload(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    payload = claims()
    header, _, signature = sign(ec_key, payload).split(".")
    forged = b64url_json({**payload, "sub": "someone-else", "tenant": "other"})
    assert "bad signature" in rejected(verifier, bearer(f"{header}.{forged}.{signature}"))


def test_tampered_header(verifier: JwtVerifier, ec_key: SigningKey, rsa_key: SigningKey) -> None:
    _, payload, signature = sign(ec_key).split(".")
    header = b64url_json({"alg": "ES384", "typ": "JWT", "kid": ec_key.kid, "x": 1})
    assert "bad signature" in rejected(verifier, bearer(f"{header}.{payload}.{signature}"))


# --- jku ---------------------------------------------------------------------------------------------


def test_jku_off_the_allowlist(verifier: JwtVerifier, jwks_server: JwksServer) -> None:
    attacker = new_ec_key()
    evil = jwks_server.publish("/evil/jwks.json", attacker.jwks())
    token = sign(attacker, jku=evil)
    assert "jku not on the allowlist" in rejected(verifier, bearer(token))
    assert jwks_server.hits["/evil/jwks.json"] == 0  # never fetched


def test_jku_must_match_exactly(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    url = jwks_server.publish("/ehr/jku.json", ec_key.jwks())
    jwks_server.publish("/ehr/jku.json?x=1", ec_key.jwks())
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jku_allowlist=(url,))))
    for variant in (url + "?x=1", url.upper(), url + "/", url.replace("http://", "https://")):
        rejected(verifier, bearer(sign(ec_key, jku=variant)))
    assert jwks_server.hits["/ehr/jku.json?x=1"] == 0


def test_jku_on_the_allowlist(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    url = jwks_server.publish("/ehr/jku.json", ec_key.jwks())
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jku_allowlist=(url,))))
    assert verifier.verify(bearer(sign(ec_key, jku=url)), AUD).kid == ec_key.kid
    assert jwks_server.hits["/ehr/jku.json"] == 1
    # Without jku and without a configured jwks_url there is no key set to use.
    assert "no jku" in rejected(verifier, bearer(sign(ec_key)))


def test_a_jku_naming_the_issuers_configured_jwks_url_is_honoured(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    """EHRs (Epic, the CDS Hooks Sandbox) name their published key set in the header: no allowlist entry is needed."""
    url = jwks_server.publish("/ehr/jwks.json", ec_key.jwks())
    jwks_server.publish("/ehr/other.json", ec_key.jwks())
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=url)))
    assert verifier.verify(bearer(sign(ec_key)), AUD).kid == ec_key.kid
    assert verifier.verify(bearer(sign(ec_key, jku=url)), AUD).kid == ec_key.kid
    # Compared after normalisation (the scheme's case here); the same key set, fetched once.
    assert verifier.verify(bearer(sign(ec_key, jku=url.replace("http://", "HTTP://"))), AUD).kid == ec_key.kid
    assert jwks_server.hits["/ehr/jwks.json"] == 1
    # Another URL on the same server is still not honoured, and never fetched.
    assert "jku not on the allowlist" in rejected(verifier, bearer(sign(ec_key, jku=url.replace("/ehr/jwks.json", "/ehr/other.json"))))
    assert jwks_server.hits["/ehr/other.json"] == 0


def test_a_jku_naming_another_issuers_jwks_url_is_refused(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    attacker = new_ec_key()
    theirs = jwks_server.publish("/other/jwks.json", attacker.jwks())
    verifier = make_verifier(
        make_settings(
            TrustedIssuer(iss=ISS, jwks_url=jwks_server.publish("/ehr/jwks.json", ec_key.jwks())),
            TrustedIssuer(iss="https://other-ehr.example.org", jwks_url=theirs),
        )
    )
    assert "jku not on the allowlist" in rejected(verifier, bearer(sign(attacker, jku=theirs)))


@pytest.mark.parametrize(
    ("url", "normalized"),
    [
        ("HTTPS://EHR.Example.ORG/Keys/JWKS.json", "https://ehr.example.org/Keys/JWKS.json"),
        ("https://ehr.example.org:443/jwks.json", "https://ehr.example.org/jwks.json"),
        ("http://ehr.example.org:80/jwks.json", "http://ehr.example.org/jwks.json"),
        ("https://ehr.example.org:8443/jwks.json", "https://ehr.example.org:8443/jwks.json"),
        ("https://ehr.example.org", "https://ehr.example.org/"),
        ("https://ehr.example.org/jwks.json?v=2", "https://ehr.example.org/jwks.json?v=2"),
        ("https://user@ehr.example.org/jwks.json", "https://user@ehr.example.org/jwks.json"),  # never equal to the URL without it
        ("https://[::1]:443/jwks.json", "https://[::1]/jwks.json"),
        ("https://ehr.example.org:99999/jwks.json", "https://ehr.example.org:99999/jwks.json"),  # not a URL: unchanged
        ("not a url", "not a url"),
    ],
)
def test_jku_comparison_normalises_scheme_host_and_default_port_only(url: str, normalized: str) -> None:
    assert normalized_url(url) == normalized


def test_jku_allowlisted_for_another_issuer_only(
    jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier
) -> None:
    attacker = new_ec_key()
    evil = jwks_server.publish("/other/jwks.json", attacker.jwks())
    verifier = make_verifier(
        make_settings(
            TrustedIssuer(iss=ISS, jwks_url=jwks_server.publish("/ehr/jwks.json", ec_key.jwks())),
            TrustedIssuer(iss="https://other-ehr.example.org", jku_allowlist=(evil,)),
        )
    )
    rejected(verifier, bearer(sign(attacker, jku=evil)))  # iss is ISS: evil is not on ISS's allowlist


# --- kid and key rotation ----------------------------------------------------------------------------


def test_kid_rotation_refetches_once(jwks_server: JwksServer, make_verifier: MakeVerifier) -> None:
    old, new, unknown = new_ec_key("k-old"), new_rsa_key("k-new"), new_ec_key("k-unknown")
    url = jwks_server.publish("/rot/jwks.json", old.jwks())
    clock = FakeClock()
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=url), jwks_min_refetch_s=30), clock=clock)

    assert verifier.verify(bearer(sign(old)), AUD).kid == "k-old"
    assert jwks_server.hits["/rot/jwks.json"] == 1

    # The EHR rotates its key; the cached set does not know the new kid.
    jwks_server.publish("/rot/jwks.json", new.jwks())
    clock.advance(31)
    assert verifier.verify(bearer(sign(new)), AUD).kid == "k-new"
    assert jwks_server.hits["/rot/jwks.json"] == 2
    assert verifier.verify(bearer(sign(new)), AUD).kid == "k-new"
    assert jwks_server.hits["/rot/jwks.json"] == 2

    # Unknown kids right after a fetch do not cause another fetch (rate limit per issuer).
    for _ in range(5):
        assert "no usable key" in rejected(verifier, bearer(sign(unknown)))
    assert jwks_server.hits["/rot/jwks.json"] == 2
    clock.advance(31)
    rejected(verifier, bearer(sign(unknown)))
    assert jwks_server.hits["/rot/jwks.json"] == 3
    # The rotated-out key is no longer trusted.
    rejected(verifier, bearer(sign(old)))


def test_jwks_cache_ttl(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    url = jwks_server.publish("/ttl/jwks.json", ec_key.jwks())
    clock = FakeClock()
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=url), jwks_cache_s=600), clock=clock)
    verifier.verify(bearer(sign(ec_key)), AUD)
    clock.advance(599)
    verifier.verify(bearer(sign(ec_key)), AUD)
    assert jwks_server.hits["/ttl/jwks.json"] == 1
    clock.advance(2)
    verifier.verify(bearer(sign(ec_key)), AUD)
    assert jwks_server.hits["/ttl/jwks.json"] == 2


def test_jwks_endpoint_failing(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    url = jwks_server.publish("/down/jwks.json", {"error": "x"}, status=500)
    clock = FakeClock()
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=url), jwks_min_refetch_s=30), clock=clock)
    assert "HTTP 500" in rejected(verifier, bearer(sign(ec_key)))
    for _ in range(3):
        assert "unavailable" in rejected(verifier, bearer(sign(ec_key)))
    assert jwks_server.hits["/down/jwks.json"] == 1  # failures are not retried on every request
    jwks_server.publish("/down/jwks.json", ec_key.jwks(), status=200)
    clock.advance(31)
    assert verifier.verify(bearer(sign(ec_key)), AUD).authenticated


def test_jwks_unreachable(ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url="http://127.0.0.1:1/jwks.json"), jwks_timeout_s=1.0))
    assert "fetch failed" in rejected(verifier, bearer(sign(ec_key)))


def test_missing_kid_with_single_key_set(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    url = jwks_server.publish("/single/jwks.json", ec_key.jwks())
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=url)))
    caller = verifier.verify(bearer(sign(ec_key, kid=None)), AUD)
    assert caller.authenticated and caller.kid == ec_key.kid


def test_missing_kid_with_several_keys(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    assert "no kid" in rejected(verifier, bearer(sign(ec_key, kid=None)))


def test_missing_kid_single_key_of_the_other_type(
    jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier
) -> None:
    rsa_only = new_rsa_key()
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=jwks_server.publish("/r.json", rsa_only.jwks()))))
    rejected(verifier, bearer(sign(ec_key, kid=None)))


# --- the Authorization header ------------------------------------------------------------------------


def test_missing_authorization(verifier: JwtVerifier) -> None:
    assert "missing" in rejected(verifier, None)
    assert "missing" in rejected(verifier, "")
    assert "missing" in rejected(verifier, "   ")


@pytest.mark.parametrize(
    "header",
    [
        "Basic x",
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        "garbage",
        "Bearer a.b",
        "Bearer a.b.c",
        "Bearer a.b.c.d",
        "Bearer ...",
        "Bearer x y",
        "Token abc.def.ghi",
        "Bearer e30.e30.e30",
        "Bearer eyJhbGciOiJFUzM4NCJ9.bm90IGpzb24.c2ln",
        "Bearer " + "a" * 20_000 + ".b.c",
        "Bearer \x00.\x00.\x00",
    ],
)
def test_malformed_authorization(verifier: JwtVerifier, header: str) -> None:
    rejected(verifier, header)


def test_bearer_with_valid_token_glued_to_scheme(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    rejected(verifier, "Bearer" + sign(ec_key))


# --- tenants -----------------------------------------------------------------------------------------


def test_tenant_allowlist(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> None:
    url = jwks_server.publish("/t/jwks.json", ec_key.jwks())
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=url, tenants=("hospital-a", "hospital-b"))))
    assert verifier.verify(bearer(sign(ec_key, claims(tenant="hospital-b"))), AUD).tenant == "hospital-b"
    assert "tenant" in rejected(verifier, bearer(sign(ec_key, claims(tenant="hospital-c"))))
    assert "tenant" in rejected(verifier, bearer(sign(ec_key, claims())))


def test_no_tenant_allowlist_accepts_any_tenant(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    assert verifier.verify(bearer(sign(ec_key, claims(tenant="anything"))), AUD).tenant == "anything"
    assert verifier.verify(bearer(sign(ec_key)), AUD).tenant is None


# --- CDS Hooks Sandbox -------------------------------------------------------------------------------


def sandbox_claims() -> dict[str, Any]:
    return claims(iss=SANDBOX_ISSUER)


def test_sandbox_file_is_the_shipped_one() -> None:
    assert Settings(redis_url=None).sandbox_jwks_file == ROOT / "service" / "api" / "sandbox-jwks.json"


def test_sandbox_rejects_a_locally_generated_key(make_verifier: MakeVerifier) -> None:
    shipped = json.loads((ROOT / "service" / "api" / "sandbox-jwks.json").read_text())
    sandbox_kid = shipped["keys"][0]["kid"]
    verifier = make_verifier(make_settings(trust_sandbox=True))
    impostor = new_ec_key(sandbox_kid)
    assert "bad signature" in rejected(verifier, bearer(sign(impostor, sandbox_claims(), jku=SANDBOX_JKU)))
    rejected(verifier, bearer(sign(new_ec_key(), sandbox_claims(), jku=SANDBOX_JKU)))
    rejected(verifier, bearer(sign(impostor, sandbox_claims())))


def test_sandbox_not_trusted_by_default(tmp_path: Path, make_verifier: MakeVerifier) -> None:
    key = new_ec_key()
    jwks_file = tmp_path / "sandbox-jwks.json"
    jwks_file.write_text(json.dumps(key.jwks()))
    verifier = make_verifier(make_settings(sandbox_jwks_file=jwks_file))
    assert "untrusted issuer" in rejected(verifier, bearer(sign(key, sandbox_claims(), jku=SANDBOX_JKU)))


def test_sandbox_with_test_key_file(tmp_path: Path, make_verifier: MakeVerifier) -> None:
    key = new_ec_key()
    jwks_file = tmp_path / "sandbox-jwks.json"
    jwks_file.write_text(json.dumps(key.jwks()))
    verifier = make_verifier(make_settings(trust_sandbox=True, sandbox_jwks_file=jwks_file))
    caller = verifier.verify(bearer(sign(key, sandbox_claims(), jku=SANDBOX_JKU)), AUD)
    assert caller.iss == SANDBOX_ISSUER and caller.authenticated
    assert verifier.verify(bearer(sign(key, sandbox_claims())), AUD).authenticated
    # Only the sandbox's own jku is mapped to the local file.
    assert "jku not on the allowlist" in rejected(
        verifier, bearer(sign(key, sandbox_claims(), jku="https://sandbox.cds-hooks.org/other.json"))
    )


def test_sandbox_and_an_explicit_sandbox_issuer_conflict(tmp_path: Path) -> None:
    jwks_file = tmp_path / "j.json"
    jwks_file.write_text(json.dumps(new_ec_key().jwks()))
    settings_ = make_settings(TrustedIssuer(iss=SANDBOX_ISSUER, jwks_file=jwks_file), trust_sandbox=True)
    with pytest.raises(ValueError, match="more than once"):
        build_verifier(settings_)


def test_jwks_file_issuer(tmp_path: Path, rsa_key: SigningKey, make_verifier: MakeVerifier) -> None:
    jwks_file = tmp_path / "ehr-jwks.json"
    jwks_file.write_text(json.dumps(rsa_key.jwks()))
    verifier = make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_file=jwks_file)))
    assert verifier.verify(bearer(sign(rsa_key)), AUD).authenticated


# --- development mode --------------------------------------------------------------------------------


@pytest.fixture
def dev_verifier(jwks_server: JwksServer, ec_key: SigningKey, make_verifier: MakeVerifier) -> JwtVerifier:
    url = jwks_server.publish("/dev/jwks.json", ec_key.jwks())
    return make_verifier(make_settings(TrustedIssuer(iss=ISS, jwks_url=url), dev_mode=True))


def test_dev_mode_without_header(dev_verifier: JwtVerifier) -> None:
    assert dev_verifier.verify(None, AUD) == VerifiedCaller.unauthenticated()
    assert dev_verifier.verify("", AUD).authenticated is False


def test_dev_mode_with_a_bad_token(dev_verifier: JwtVerifier, ec_key: SigningKey) -> None:
    rejected(dev_verifier, "Bearer not-a-token")
    rejected(dev_verifier, bearer(sign(ec_key, claims(aud="https://elsewhere.example.org"))))
    rejected(dev_verifier, bearer(sign(new_ec_key())))
    rejected(dev_verifier, "Basic x")


def test_dev_mode_with_a_good_token(dev_verifier: JwtVerifier, ec_key: SigningKey) -> None:
    assert dev_verifier.verify(bearer(sign(ec_key)), AUD).authenticated is True


# --- error messages ----------------------------------------------------------------------------------


def test_reasons_never_contain_the_token_or_claims(verifier: JwtVerifier, ec_key: SigningKey) -> None:
    secret_sub, secret_tenant, secret_jti = "patient-sub-123", "tenant-xyz", "jti-secret-456"
    now = int(time.time())
    tokens = [
        sign(ec_key, claims(sub=secret_sub, tenant=secret_tenant, jti=secret_jti, exp=now - 500, iat=now - 900)),
        sign(ec_key, claims(sub=secret_sub, tenant=secret_tenant, jti=secret_jti, aud="https://x.example.org")),
        sign(new_ec_key(ec_key.kid), claims(sub=secret_sub, tenant=secret_tenant, jti=secret_jti)),
        sign(ec_key, claims(sub=secret_sub, tenant=secret_tenant, jti=secret_jti)),
    ]
    tokens.append(tokens[-1])  # replay
    verifier.verify(bearer(tokens[-1]), AUD)
    for token in tokens:
        reason = rejected(verifier, bearer(token))
        for fragment in (*token.split("."), secret_sub, secret_tenant, secret_jti):
            assert fragment not in reason


# --- fuzzing -----------------------------------------------------------------------------------------

_segment = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.", max_size=60)


@st.composite
def _json_segments(draw: st.DrawFn) -> str:
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=10,
    )
    header = draw(
        st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"alg": st.sampled_from(["ES384", "RS384", "none", "HS256", 1, None])},
                optional={"kid": json_values, "jku": json_values, "crit": json_values, "b64": json_values},
            ),
        )
    )
    payload = draw(
        st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"iss": st.sampled_from([ISS, SANDBOX_ISSUER, "x"]) | json_values},
                optional={"aud": json_values, "exp": json_values, "iat": json_values, "jti": json_values, "nbf": json_values},
            ),
        )
    )
    return f"{b64url_json(header)}.{b64url_json(payload)}.{draw(_segment) or 'x'}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.one_of(
        st.none(),
        st.text(),
        st.text().map(lambda s: "Bearer " + s),
        st.lists(_segment, min_size=1, max_size=5).map(lambda parts: "Bearer " + ".".join(parts)),
        _json_segments().map(lambda token: "Bearer " + token),
    )
)
def test_random_authorization_only_raises_authentication_error(verifier: JwtVerifier, header: str | None) -> None:
    try:
        verifier.verify(header, AUD)
    except AuthenticationError as exc:
        # Every refusal is an anticipated one, not the catch-all for unexpected exceptions.
        assert "verification error" not in str(exc)
    else:  # pragma: no cover - nothing random can be a valid signed token
        pytest.fail("a random Authorization header was accepted")
