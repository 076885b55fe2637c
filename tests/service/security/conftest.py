"""Fixtures for the JWT verification tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.service.security.support import JwksServer, SigningKey, new_ec_key, new_rsa_key


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ec_key() -> SigningKey:
    return new_ec_key()


@pytest.fixture(scope="session")
def rsa_key() -> SigningKey:
    return new_rsa_key()
