"""Fixtures of the HTTP API tests: a migrated SQLite database per module, app/client factories for
development mode and for signed (JWT) mode, a trusted EHR issuer with a JWKS file, and a fake FHIR
server over real HTTP."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.config import Settings, TrustedIssuer
from service.db.migrate import upgrade_to_head
from service.main import create_app
from tests.fakes.databases import create_postgres_database, drop_postgres_database, require_postgres
from tests.fakes.fhir_server import FakeFhirServer
from tests.service.api.support import ALLOWED_JKU, Issuer

ADMIN_TOKEN = "admin-secret-for-tests"
FHIR_TOKEN = "ehr-issued-access-token"
TESTSERVER = "http://testserver"


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A data directory and a SQLite database at the head revision, shared by one test module."""
    directory = tmp_path_factory.mktemp("api")
    url = f"sqlite:///{directory / 'cds.sqlite'}"
    upgrade_to_head(url)
    return directory, url


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database at the head revision, shared by one test module (``make_client(database_url=pg_url)``):
    what only PostgreSQL refuses (U+0000 in text and JSONB, BIGINT and VARCHAR bounds). Skipped when PostgreSQL is
    unreachable (a failure when ``CI=true``)."""
    require_postgres()
    url = create_postgres_database("cds_test_api")
    try:
        upgrade_to_head(url)
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return Issuer.create(tmp_path_factory.mktemp("jwks"))


@pytest.fixture(scope="module")
def make_settings(database: tuple[Path, str], issuer: Issuer) -> Callable[..., Settings]:
    directory, url = database

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "environment": "test",
            "data_dir": directory,
            "database_url": url,
            "broker_url": "",
            "redis_url": None,
            "dev_mode": False,
            "trust_sandbox": False,
            "trusted_issuers": [TrustedIssuer(iss=issuer.iss, jwks_file=issuer.jwks_file, jku_allowlist=(ALLOWED_JKU,))],
            "fhir_server_allowlist": [],
            "public_base_urls": [],
            "cors_origins": ["*"],
            "admin_token": ADMIN_TOKEN,
            "fhir_timeout_s": 3.0,
        }
        values.update(overrides)
        return Settings(**values)

    return factory


@pytest.fixture(scope="module")
def make_app(make_settings: Callable[..., Settings]) -> Callable[..., FastAPI]:
    def factory(**overrides: Any) -> FastAPI:
        return create_app(make_settings(**overrides))

    return factory


def _started(stack: contextlib.ExitStack, app: FastAPI) -> TestClient:
    return stack.enter_context(TestClient(app, raise_server_exceptions=False))


@pytest.fixture
def make_client(make_app: Callable[..., FastAPI]) -> Iterator[Callable[..., TestClient]]:
    """``make_client(**settings)``: a started TestClient (lifespan run) for one test, closed at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: _started(stack, make_app(**overrides))


@pytest.fixture(scope="module")
def dev_client(make_app: Callable[..., FastAPI]) -> Iterator[TestClient]:
    """Development mode: unsigned calls accepted, any http(s) fhirServer. Shared by a module."""
    with contextlib.ExitStack() as stack:
        yield _started(stack, make_app(dev_mode=True))


@pytest.fixture(scope="module")
def signed_client(make_app: Callable[..., FastAPI]) -> Iterator[TestClient]:
    """Production-like: every CDS Hooks call needs a JWT from ``issuer``; fhirServer must be https and
    allowlisted. Shared by a module (each token has its own jti, so the replay cache never interferes)."""
    with contextlib.ExitStack() as stack:
        yield _started(stack, make_app(dev_mode=False))


@pytest.fixture
def fhir() -> Iterator[FakeFhirServer]:
    """A FHIR server over real HTTP that requires the EHR's access token."""
    with FakeFhirServer(required_token=FHIR_TOKEN) as srv:
        yield srv
        assert not srv.errors, "\n".join(srv.errors)
