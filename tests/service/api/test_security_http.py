"""JWT authentication of CDS Hooks calls over HTTP (not development mode).

The EHR signs a JWT whose ``aud`` is the exact URL it called; the service answers every refusal with
a bare 401 (an OperationOutcome without diagnostics, and a ``WWW-Authenticate`` header).
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.config import SANDBOX_ISSUER, Settings, TrustedIssuer
from service.security import SANDBOX_JKU
from tests.schema import assert_valid
from tests.service.api.conftest import TESTSERVER
from tests.service.api.support import (
    ALLOWED_JKU,
    RISK,
    Issuer,
    high_risk_dialysis_patient,
    hook_request,
    serve_in_thread,
)
from tests.service.security.support import JwksServer, new_ec_key, sign

AUD = f"{TESTSERVER}/cds-services/{RISK}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def body() -> dict[str, Any]:
    patient = high_risk_dialysis_patient()
    return hook_request(RISK, patient.pid, prefetch=patient.prefetch())


def post(client: TestClient, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post(f"/cds-services/{RISK}", json=body(), headers=headers or {})


def assert_bare_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    document = response.json()
    assert document["resourceType"] == "OperationOutcome"
    assert len(document["issue"]) == 1
    assert set(document["issue"][0]) == {"severity", "code"}, "a 401 never says why"
    assert "diagnostics" not in response.text


def assert_cards(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert_valid(response.json(), "CDSResponse")
    assert response.json()["cards"]


# --- accepted -----------------------------------------------------------------------------------
def test_valid_es384_token_is_accepted(signed_client: TestClient, issuer: Issuer) -> None:
    assert_cards(post(signed_client, issuer.bearer(AUD, key=issuer.ec)))


def test_valid_rs384_token_is_accepted(signed_client: TestClient, issuer: Issuer) -> None:
    assert_cards(post(signed_client, issuer.bearer(AUD, key=issuer.rsa)))


def test_a_fifteen_minute_token_is_accepted(signed_client: TestClient, issuer: Issuer) -> None:
    assert_cards(post(signed_client, issuer.bearer(AUD, lifetime_s=900)))


def test_an_allowlisted_jku_selects_the_key_set(make_client: Callable[..., TestClient], issuer: Issuer) -> None:
    server = JwksServer()
    server.start()
    try:
        rotated = new_ec_key()
        jku = server.publish("/rotated-jwks.json", rotated.jwks())
        trusted = TrustedIssuer(iss=issuer.iss, jwks_file=issuer.jwks_file, jku_allowlist=(jku, ALLOWED_JKU))
        client = make_client(trusted_issuers=[trusted])
        assert_cards(post(client, {"Authorization": f"Bearer {sign(rotated, _claims(issuer), jku=jku)}"}))
        # The configured file does not hold the rotated key: without the jku it is unknown.
        assert_bare_401(post(client, {"Authorization": f"Bearer {sign(rotated, _claims(issuer))}"}))
    finally:
        server.stop()


def test_audience_list_containing_the_url_is_accepted(signed_client: TestClient, issuer: Issuer) -> None:
    assert_cards(post(signed_client, issuer.bearer(["https://other.example.org/cds-services/x", AUD])))


# --- refused ------------------------------------------------------------------------------------
def _claims(issuer: Issuer, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": issuer.iss, "aud": AUD, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _alg_none(issuer: Issuer) -> str:
    header = _b64(orjson.dumps({"alg": "none", "typ": "JWT", "kid": issuer.ec.kid}))
    payload = _b64(orjson.dumps(_claims(issuer)))
    return f"{header}.{payload}.{_b64(b'not-a-signature')}"


def _tampered(issuer: Issuer) -> str:
    token = issuer.token(AUD)
    head, payload, signature = token.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "someone-else"
    return f"{head}.{_b64(orjson.dumps(claims))}.{signature}"


def _flipped_signature(issuer: Issuer) -> str:
    token = issuer.token(AUD, key=issuer.rsa)
    head, payload, signature = token.split(".")
    flipped = ("A" if signature[10] != "A" else "B").join((signature[:10], signature[11:]))
    return f"{head}.{payload}.{flipped}"


REFUSALS: dict[str, Callable[[Issuer], str | None]] = {
    "no-header": lambda i: None,
    "expired": lambda i: i.token(AUD, iat=int(time.time()) - 1000, exp=int(time.time()) - 400),
    "wrong-aud-host": lambda i: i.token("http://localhost/cds-services/calcinosis-risk"),
    "wrong-aud-service": lambda i: i.token(f"{TESTSERVER}/cds-services/calcinosis-order-sign"),
    "aud-trailing-slash": lambda i: i.token(AUD + "/"),
    "unknown-issuer": lambda i: i.token(AUD, iss="https://rogue-ehr.example.org"),
    "alg-none": _alg_none,
    "hs256": lambda i: jwt.encode(_claims(i), "a-shared-secret-of-32-bytes-long!", algorithm="HS256", headers={"kid": i.ec.kid}),
    "tampered-claims": _tampered,
    "flipped-signature": _flipped_signature,
    "jku-off-allowlist": lambda i: sign(i.ec, _claims(i), jku="https://attacker.example.net/jwks.json"),
    "unknown-kid": lambda i: sign(new_ec_key(), _claims(i)),
    "no-jti": lambda i: sign(i.ec, _claims(i, jti=None)),
    "lifetime-over-an-hour": lambda i: i.token(AUD, lifetime_s=7200),
    "issued-in-the-future": lambda i: i.token(AUD, iat=int(time.time()) + 600, exp=int(time.time()) + 900),
    "not-a-jwt": lambda i: "not-a-jwt",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_tokens_get_a_bare_401(signed_client: TestClient, issuer: Issuer, case: str) -> None:
    token = REFUSALS[case](issuer)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    assert_bare_401(post(signed_client, headers))


def test_basic_scheme_is_refused(signed_client: TestClient) -> None:
    assert_bare_401(post(signed_client, {"Authorization": "Basic dXNlcjpwYXNz"}))


def test_a_replayed_token_is_refused(signed_client: TestClient, issuer: Issuer) -> None:
    headers = issuer.bearer(AUD)
    assert_cards(post(signed_client, headers))
    assert_bare_401(post(signed_client, headers))


def test_feedback_needs_its_own_audience(signed_client: TestClient, issuer: Issuer) -> None:
    feedback = {"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00:00Z"}]}
    wrong = signed_client.post(f"/cds-services/{RISK}/feedback", json=feedback, headers=issuer.bearer(AUD))
    assert_bare_401(wrong)
    right = signed_client.post(f"/cds-services/{RISK}/feedback", json=feedback, headers=issuer.bearer(f"{AUD}/feedback"))
    assert right.status_code == 200, right.text


def test_configured_public_base_url_is_the_audience(make_client: Callable[..., TestClient], issuer: Issuer) -> None:
    client = make_client(public_base_urls=["https://cds.example.org/api", "https://cds.internal.example.org/api"])
    # Behind a proxy the EHR calls the public URL; the path the service sees is appended to each base.
    assert_cards(post(client, issuer.bearer(f"https://cds.internal.example.org/api/cds-services/{RISK}")))
    assert_bare_401(post(client, issuer.bearer(AUD)))


def test_the_host_header_chooses_no_audience_when_public_base_urls_are_set(make_client: Callable[..., TestClient], issuer: Issuer) -> None:
    """A token minted for another CDS service with the same path, sent with that service's Host, is refused."""
    client = make_client(public_base_urls=["https://cds.example.org"])
    other = f"http://other-service/cds-services/{RISK}"
    assert_bare_401(post(client, {**issuer.bearer(other), "Host": "other-service"}))
    assert_cards(post(client, {**issuer.bearer(f"https://cds.example.org/cds-services/{RISK}"), "Host": "other-service"}))


def test_without_public_base_urls_outside_production_the_audience_is_the_url_as_received(signed_client: TestClient, issuer: Issuer) -> None:
    """What the CDS Hooks Sandbox signs (the host the browser used); production refuses to start this way."""
    assert_cards(post(signed_client, {**issuer.bearer(f"http://other-service/cds-services/{RISK}"), "Host": "other-service"}))
    with pytest.raises(ValueError, match="CDS_PUBLIC_BASE_URLS is required"):
        Settings(environment="production", public_base_urls=[])


def test_auth_failures_are_counted(signed_client: TestClient) -> None:
    assert_bare_401(post(signed_client))
    metrics = signed_client.get("/metrics").text
    assert 'cds_auth_failures_total{route="service"}' in metrics


# --- over a real socket -------------------------------------------------------------------------
def test_jwt_over_real_http(make_app: Callable[..., FastAPI], issuer: Issuer) -> None:
    with serve_in_thread(make_app(dev_mode=False)) as origin:
        url = f"{origin}/cds-services/{RISK}"
        assert url.startswith("http://127.0.0.1:")
        accepted = httpx.post(url, json=body(), headers=issuer.bearer(url), timeout=15)
        assert_cards(accepted)
        # localhost and 127.0.0.1 are different audiences, as the Sandbox shows.
        other_host = url.replace("127.0.0.1", "localhost")
        refused = httpx.post(url, json=body(), headers=issuer.bearer(other_host), timeout=15)
        assert_bare_401(refused)
        testserver = httpx.post(url, json=body(), headers=issuer.bearer(AUD), timeout=15)
        assert_bare_401(testserver)


# --- the CDS Hooks Sandbox ----------------------------------------------------------------------
def test_sandbox_token_accepted_when_trusted(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    sandbox_key = new_ec_key(kid="44823f3d-0b01-4a6c-a834-b1ddc46a1f29")
    jwks = tmp_path / "sandbox-jwks.json"
    jwks.write_bytes(orjson.dumps(sandbox_key.jwks()))
    client = make_client(dev_mode=False, trusted_issuers=[], trust_sandbox=True, sandbox_jwks_file=jwks)
    now = int(time.time())
    # Exactly the Sandbox's shape: ES384, typ JWT, kid, jku; iss, aud, exp = iat + 300, jti; no sub, no tenant.
    claims = {"iss": SANDBOX_ISSUER, "aud": AUD, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    token = sign(sandbox_key, claims, typ="JWT", jku=SANDBOX_JKU)
    assert_cards(post(client, {"Authorization": f"Bearer {token}"}))

    other = new_ec_key(kid=sandbox_key.kid)  # same kid, not the published key
    forged = sign(other, {**claims, "jti": str(uuid.uuid4())}, typ="JWT", jku=SANDBOX_JKU)
    assert_bare_401(post(client, {"Authorization": f"Bearer {forged}"}))


def test_sandbox_token_refused_when_not_trusted(signed_client: TestClient) -> None:
    key = new_ec_key()
    now = int(time.time())
    claims = {"iss": SANDBOX_ISSUER, "aud": AUD, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    assert_bare_401(post(signed_client, {"Authorization": f"Bearer {sign(key, claims, jku=SANDBOX_JKU)}"}))


def test_trusting_the_sandbox_is_refused_in_production() -> None:
    with pytest.raises(ValueError, match="SANDBOX"):
        Settings(environment="production", trust_sandbox=True)


def test_a_discovery_url_registered_with_a_trailing_slash_works_and_aud_is_the_url_called(
    signed_client: TestClient, issuer: Issuer
) -> None:
    """Registered as ``…/cds-services/``, a client (the CDS Hooks Sandbox) calls ``…/cds-services//{id}``: the same
    services answer, with no redirect, and the token's ``aud`` must name that URL as called."""
    discovery = signed_client.get("/cds-services/", follow_redirects=False)
    assert discovery.status_code == 200 and {s["id"] for s in discovery.json()["services"]} >= {RISK}
    as_called = f"{TESTSERVER}/cds-services//{RISK}"
    response = signed_client.post(f"/cds-services//{RISK}", json=body(), headers=issuer.bearer(as_called), follow_redirects=False)
    assert response.status_code == 200, response.text
    assert response.json()["cards"]
    assert_bare_401(signed_client.post(f"/cds-services//{RISK}", json=body(), headers=issuer.bearer(AUD)))
    card = response.json()["cards"][0]
    feedback = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-22T00:00:00Z"}]}
    url = f"/cds-services//{RISK}/feedback/"
    assert signed_client.post(url, json=feedback, headers=issuer.bearer(f"{TESTSERVER}{url}")).status_code == 200
