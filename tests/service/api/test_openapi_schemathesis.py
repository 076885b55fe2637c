"""Property-based tests of every operation in the app's own OpenAPI document (schemathesis over ASGI).

Development mode so that the hook routes are reachable without a JWT; the admin token is set so the
audit and assessment reads are exercised both refused and allowed. Any 5xx, or a response that does
not match the documented schema for its status code, fails the test.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.config import Settings
from service.db.migrate import upgrade_to_head
from service.main import create_app
from tests.service.api.conftest import ADMIN_TOKEN

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]


# The schema is loaded at import (schemathesis parametrizes at collection time); the app touches the
# database only when called, so the migration runs in a fixture, before the first test case.
_DIRECTORY = Path(tempfile.mkdtemp(prefix="cds-schemathesis-"))
atexit.register(shutil.rmtree, _DIRECTORY, True)
_DATABASE_URL = f"sqlite:///{_DIRECTORY / 'cds.sqlite'}"
APP = create_app(
    Settings(
        environment="test",
        data_dir=_DIRECTORY,
        database_url=_DATABASE_URL,
        broker_url="",
        redis_url=None,
        dev_mode=True,
        admin_token=ADMIN_TOKEN,
        fhir_timeout_s=1.0,
    )
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _migrated() -> None:
    upgrade_to_head(_DATABASE_URL)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_conforms(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_conforms_with_the_admin_token(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, checks=CHECKS)
