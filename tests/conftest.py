"""Shared fixtures. Area-specific fixtures live in each test folder's own conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.terminology.catalog import Catalog
from service.terminology.loader import load_catalog
from tests.pki import Pki, make_pki

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_service(name: str, ok: bool, why: str = "") -> None:
    """Skip a test whose service is missing, except in CI, where that is a failure."""
    if ok:
        return
    message = f"{name} is not available{': ' + why if why else ''}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: integration tests must not skip)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog(ROOT / "mappings")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA and a server certificate it issued for 127.0.0.1 (see tests/pki.py)."""
    return make_pki(tmp_path_factory.mktemp("pki"))
