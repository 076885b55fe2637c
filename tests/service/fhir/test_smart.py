"""SMART Backend Services against the fake token endpoint (RS384 and ES384)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from service.fhir.client import FhirClient
from service.fhir.errors import FhirAuthError, FhirTransientError
from service.fhir.smart import CLIENT_ASSERTION_TYPE, SmartBackendAuth, jwk_thumbprint, load_private_key, public_jwk
from tests.fakes.fhir_server import FakeFhirServer, KeyPair, make_keypair
from tests.service.fhir.conftest import observation

MakeClient = Callable[..., FhirClient]


def _auth(srv: FakeFhirServer | None, keys: KeyPair, **kwargs: object) -> SmartBackendAuth:
    if srv is not None:
        kwargs.setdefault("fhir_base_url", srv.base_url)
    return SmartBackendAuth(
        client_id="cds-backend",
        private_key=keys.private_pem,
        alg=keys.alg,
        key_id=keys.kid,
        scope="system/Observation.rs system/RiskAssessment.cud",
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("keys_fixture", ["rsa_keys", "ec_keys"])
def test_backend_flow_caches_the_token(keys_fixture: str, request: pytest.FixtureRequest, make_client: MakeClient) -> None:
    keys: KeyPair = request.getfixturevalue(keys_fixture)
    with FakeFhirServer(require_auth=True, smart_clients={"cds-backend": keys}) as srv:
        srv.put(observation("o1"))
        auth = _auth(srv, keys)
        client = make_client(srv, auth=auth)

        client.read("Observation", "o1")
        client.read("Observation", "o1")

        assert srv.count("/auth/token") == 1, srv.token_errors
        assert srv.count("/.well-known/smart-configuration") == 1
        token_req = srv.requests_matching("/auth/token")[0]
        form = {k: v[0] for k, v in parse_qs(token_req.body.decode()).items()}
        assert form["grant_type"] == "client_credentials"
        assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
        assert form["scope"] == "system/Observation.rs system/RiskAssessment.cud"
        header = jwt.get_unverified_header(form["client_assertion"])
        assert header == {"alg": keys.alg, "kid": keys.kid, "typ": "JWT"}
        claims = jwt.decode(
            form["client_assertion"],
            serialization.load_pem_public_key(keys.public_pem),  # type: ignore[arg-type]
            algorithms=[keys.alg],
            audience=srv.token_url,
        )
        assert claims["iss"] == claims["sub"] == "cds-backend"
        assert 0 < claims["exp"] - claims["iat"] <= 300
        fhir_reqs = srv.requests_matching("/fhir/Observation/o1")
        assert all(r.headers["authorization"].startswith("Bearer ") for r in fhir_reqs)
        assert "authorization" not in token_req.headers  # the assertion authenticates, not a token
        auth.close()
        assert not srv.errors


def test_each_assertion_has_a_fresh_jti(rsa_keys: KeyPair) -> None:
    auth = SmartBackendAuth(client_id="c", private_key=rsa_keys.private_pem, scope="s", token_url="https://as.example/token")
    a, b = (jwt.decode(auth.build_client_assertion(), options={"verify_signature": False}) for _ in range(2))
    assert a["jti"] != b["jti"] and a["aud"] == "https://as.example/token"
    assert jwt.get_unverified_header(auth.build_client_assertion())["kid"] == jwk_thumbprint(load_private_key(rsa_keys.private_pem, "RS384"))
    auth.close()


def test_configured_token_url_skips_discovery(ec_keys: KeyPair) -> None:
    with FakeFhirServer(smart_clients={"cds-backend": ec_keys}) as srv:
        auth = _auth(srv, ec_keys, token_url=srv.token_url, fhir_base_url=None)
        assert auth.get_token()
        assert srv.count("smart-configuration") == 0 and srv.count("/auth/token") == 1
        auth.close()


def test_token_is_refreshed_shortly_before_expiry(ec_keys: KeyPair) -> None:
    now = [1000.0]
    with FakeFhirServer(smart_clients={"cds-backend": ec_keys}, token_lifetime_s=300) as srv:
        auth = _auth(srv, ec_keys, monotonic=lambda: now[0], refresh_margin_s=60)
        first = auth.get_token()
        now[0] += 200
        assert auth.get_token() == first and srv.count("/auth/token") == 1
        now[0] += 45  # 245 s: inside the 60 s refresh margin
        second = auth.get_token()
        assert second != first and srv.count("/auth/token") == 2
        auth.invalidate("not-the-current-token")
        assert auth.get_token() == second
        auth.invalidate(second)
        assert auth.get_token() != second and srv.count("/auth/token") == 3
        auth.close()


def test_concurrent_callers_cause_one_token_request(rsa_keys: KeyPair) -> None:
    with FakeFhirServer(smart_clients={"cds-backend": rsa_keys}, latency_s=0.05) as srv:
        auth = _auth(srv, rsa_keys)
        tokens: list[str] = []
        barrier = threading.Barrier(8)

        def worker() -> None:
            barrier.wait()
            tokens.append(auth.get_token())

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(tokens)) == 1 and len(tokens) == 8
        assert srv.count("/auth/token") == 1
        auth.close()


def test_unregistered_key_is_refused(rsa_keys: KeyPair) -> None:
    other = make_keypair("RS384", kid=rsa_keys.kid)
    with FakeFhirServer(smart_clients={"cds-backend": rsa_keys}) as srv:
        auth = _auth(srv, other)
        with pytest.raises(FhirAuthError) as err:
            auth.get_token()
        assert err.value.status == 401 and "invalid_client" in str(err.value)
        assert srv.token_errors == ["bad signature"]
        auth.close()


def test_token_endpoint_outage_is_transient_and_retried_by_the_client(make_client: MakeClient, ec_keys: KeyPair) -> None:
    with FakeFhirServer(require_auth=True, smart_clients={"cds-backend": ec_keys}) as srv:
        srv.put(observation("o1"))
        auth = _auth(srv, ec_keys)
        srv.fail_next(1, status=503, path="/auth/token")
        with pytest.raises(FhirTransientError):
            auth.get_token()
        srv.fail_next(1, status=503, path="/auth/token")
        assert make_client(srv, auth=auth).read("Observation", "o1")["id"] == "o1"
        auth.close()


def test_key_and_algorithm_must_match(rsa_keys: KeyPair, ec_keys: KeyPair, tmp_path: object) -> None:
    with pytest.raises(FhirAuthError, match="ES384"):
        load_private_key(rsa_keys.private_pem, "ES384")
    with pytest.raises(FhirAuthError, match="RS384"):
        load_private_key(ec_keys.private_pem, "RS384")
    with pytest.raises(FhirAuthError):
        load_private_key(b"not a key", "RS384")
    with pytest.raises(FhirAuthError, match="cannot read"):
        load_private_key(f"{tmp_path}/missing.pem", "RS384")
    jwk = public_jwk(load_private_key(ec_keys.private_pem, "ES384"), alg="ES384", kid="k1")
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-384" and jwk["kid"] == "k1" and "d" not in jwk


def _auth_answering(handler: Callable[[httpx.Request], httpx.Response], keys: KeyPair) -> SmartBackendAuth:
    """A client of https://ehr.example.org/fhir whose HTTP calls ``handler`` answers."""
    return _auth(None, keys, fhir_base_url="https://ehr.example.org/fhir", transport=httpx.MockTransport(handler))


def test_discovery_refuses_an_https_to_http_downgrade(ec_keys: KeyPair) -> None:
    auth = _auth_answering(lambda _: httpx.Response(200, json={"token_endpoint": "http://auth.example.org/token"}), ec_keys)
    with pytest.raises(FhirAuthError, match="downgrades"):
        auth.get_token()
    auth.close()


def test_discovery_without_smart_configuration(ec_keys: KeyPair) -> None:
    auth = _auth_answering(lambda _: httpx.Response(404), ec_keys)
    with pytest.raises(FhirAuthError, match="CDS_SMART_TOKEN_URL"):
        auth.token_endpoint()
    auth.close()
