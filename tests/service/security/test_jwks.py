"""JWK Set parsing: only ES384/RS384 verification keys survive, each bound to one algorithm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from service.security import JwksError, JwksLocation, JwksProvider
from service.security.jwks import algorithm_for_jwk, parse_jwks
from tests.conftest import ROOT
from tests.service.security.support import FakeClock, SigningKey


def test_location_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        JwksLocation()
    with pytest.raises(ValueError):
        JwksLocation(url="https://x", file=tmp_path)


def test_shipped_sandbox_set_parses() -> None:
    keys = parse_jwks(json.loads((ROOT / "service" / "api" / "sandbox-jwks.json").read_text()))
    assert [(k.key_id, k.algorithm_name) for k in keys] == [("44823f3d-0b01-4a6c-a80e-b9d3e8a7226f", "ES384")]


def test_algorithm_binding(ec_key: SigningKey, rsa_key: SigningKey) -> None:
    ec_jwk, rsa_jwk = ec_key.public_jwk, rsa_key.public_jwk
    assert algorithm_for_jwk(ec_jwk) == "ES384"
    assert algorithm_for_jwk(rsa_jwk) == "RS384"
    assert algorithm_for_jwk({**rsa_jwk, "alg": "RS256"}) is None
    assert algorithm_for_jwk({**ec_jwk, "alg": "ES256"}) is None
    assert algorithm_for_jwk({**ec_jwk, "crv": "P-256"}) is None
    assert algorithm_for_jwk({**ec_jwk, "use": "enc"}) is None
    assert algorithm_for_jwk({**ec_jwk, "key_ops": ["sign"]}) is None
    assert algorithm_for_jwk({**ec_jwk, "key_ops": ["verify"]}) == "ES384"
    assert algorithm_for_jwk({"kty": "oct", "k": "c2VjcmV0"}) is None
    assert algorithm_for_jwk({"kty": "OKP", "crv": "Ed25519", "x": "AA"}) is None


@pytest.mark.parametrize("document", [None, [], {}, {"keys": {}}, {"keys": "x"}, "keys"])
def test_not_a_jwk_set(document: Any) -> None:
    with pytest.raises(JwksError):
        parse_jwks(document)


def test_unusable_members_are_skipped(ec_key: SigningKey) -> None:
    keys = parse_jwks({"keys": [1, "x", {"kty": "EC"}, {"kty": "EC", "crv": "P-384", "x": "!!", "y": "!!"}, ec_key.public_jwk]})
    assert [k.key_id for k in keys] == [ec_key.kid]


def test_private_members_are_dropped(ec_key: SigningKey) -> None:
    assert isinstance(ec_key.private, ec.EllipticCurvePrivateKey)
    private_jwk = {**ECAlgorithm.to_jwk(ec_key.private, as_dict=True), "kid": ec_key.kid}
    (key,) = parse_jwks({"keys": [private_jwk]})
    assert "d" not in key._jwk_data
    assert not hasattr(key.key, "private_bytes")


def test_file_location_reloads_after_ttl(tmp_path: Path, ec_key: SigningKey, rsa_key: SigningKey) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(ec_key.jwks()))
    clock = FakeClock()
    provider = JwksProvider(cache_s=60, min_refetch_s=30, clock=clock)
    location = JwksLocation(file=path)
    assert provider.signing_key("iss", location, ec_key.kid).key_id == ec_key.kid
    path.write_text(json.dumps(rsa_key.jwks()))
    assert provider.signing_key("iss", location, ec_key.kid).key_id == ec_key.kid  # cached
    clock.advance(61)
    with pytest.raises(JwksError):
        provider.signing_key("iss", location, ec_key.kid)
    assert provider.signing_key("iss", location, rsa_key.kid).key_id == rsa_key.kid


def test_missing_file(tmp_path: Path) -> None:
    provider = JwksProvider(cache_s=60)
    with pytest.raises(JwksError, match="cannot read"):
        provider.signing_key("iss", JwksLocation(file=tmp_path / "absent.json"), "k")


def test_oversized_response(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"keys": [], "pad": "x" * 1000}))
    provider = JwksProvider(cache_s=60, max_bytes=500)
    with pytest.raises(JwksError, match="too large"):
        provider.signing_key("iss", JwksLocation(file=path), "k")
