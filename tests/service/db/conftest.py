"""Fixtures of the persistence tests: every test here runs on SQLite and on PostgreSQL.

The fixtures themselves live in :mod:`tests.fakes.databases` so other test folders can import them.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.fakes.databases import db_engine, db_session_factory, db_url, empty_db_url, pg_database  # noqa: F401

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def t0() -> datetime:
    """A fixed instant tests use as 'now'."""
    return T0
