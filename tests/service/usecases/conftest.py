"""Fixtures of the use-case tests: the database fixtures (SQLite and PostgreSQL) for those that need them."""

from __future__ import annotations

from tests.fakes.databases import db_engine, db_session_factory, db_url, pg_database  # noqa: F401
