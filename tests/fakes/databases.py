"""Database fixtures for any test folder: every test runs on SQLite (a temporary file) and on the real
PostgreSQL of this machine (127.0.0.1:5432, user ``postgres``; override with ``CDS_TEST_POSTGRES_URL``).

Use them from a test folder's ``conftest.py``::

    from tests.fakes.databases import db_engine, db_session_factory, db_url, pg_database  # noqa: F401

Fixtures
    ``pg_database``        session-scoped: a fresh database ``cds_test_<pid>_<random>`` created through the
                           ``postgres`` database, dropped at the end (skipped when PostgreSQL is unreachable,
                           a failure when ``CI=true``). Its tables are created once from ``Base.metadata``.
    ``db_url``             parametrized ``sqlite`` / ``postgresql``: URL of an empty, schema-ready database
                           (a new SQLite file per test; the session PostgreSQL database, truncated first).
    ``db_engine``          an engine for ``db_url`` (``service.db.session.make_engine``).
    ``db_session_factory`` a ``sessionmaker`` for it; use ``session_scope(db_session_factory)``.
    ``empty_db_url``       parametrized like ``db_url`` but with NO tables (a new database per test), for
                           migration tests.

Helpers (plain functions): ``postgres_available()``, ``create_postgres_database()``,
``drop_postgres_database(url)``, ``truncate_all(engine)``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.db import models  # noqa: F401  (registers the tables)
from service.db.base import Base
from service.db.session import make_engine, make_session_factory
from tests.conftest import require_service

POSTGRES_SERVER_URL = os.environ.get("CDS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
DIALECTS = ("sqlite", "postgresql")


def _libpq(url: str, database: str | None = None) -> str:
    """A psycopg (libpq) connection string for a SQLAlchemy URL, optionally for another database."""
    u = make_url(url)
    parts = {
        "host": u.host or "127.0.0.1",
        "port": str(u.port or 5432),
        "user": u.username or "postgres",
        "dbname": database or u.database or "postgres",
        "connect_timeout": "3",
    }
    if u.password:
        parts["password"] = u.password
    return make_conninfo(**parts)


@lru_cache(maxsize=1)
def _postgres_probe() -> tuple[bool, str]:
    try:
        with psycopg.connect(_libpq(POSTGRES_SERVER_URL), autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True, ""
    except psycopg.Error as exc:
        return False, type(exc).__name__


def postgres_available() -> bool:
    return _postgres_probe()[0]


def require_postgres() -> None:
    ok, why = _postgres_probe()
    require_service("PostgreSQL", ok, why)


def create_postgres_database(prefix: str = "cds_test") -> str:
    """Create a uniquely named empty database; returns its SQLAlchemy URL."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(_libpq(POSTGRES_SERVER_URL), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_url(POSTGRES_SERVER_URL).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    name = make_url(url).database
    if not name or not name.startswith("cds_"):
        raise ValueError("refusing to drop a database not created by the tests")
    with psycopg.connect(_libpq(POSTGRES_SERVER_URL), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def truncate_all(engine: Engine) -> None:
    """Delete every row of every table of ``Base.metadata`` (and restart PostgreSQL identities)."""
    tables = list(reversed(Base.metadata.sorted_tables))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            names = ", ".join(conn.dialect.identifier_preparer.quote(t.name) for t in tables)
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        else:
            for table in tables:
                conn.execute(table.delete())


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """Session-wide PostgreSQL test database with the tables of ``Base.metadata``; dropped at the end."""
    require_postgres()
    url = create_postgres_database()
    engine = make_engine(url, pool_size=2)
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()
    try:
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture(params=DIALECTS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database with every table, once per dialect."""
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "test.sqlite")
        engine = make_engine(url, pool_size=2)
        try:
            Base.metadata.create_all(engine)
        finally:
            engine.dispose()
        yield url
        return
    url = request.getfixturevalue("pg_database")
    engine = make_engine(url, pool_size=1)
    try:
        truncate_all(engine)
    finally:
        engine.dispose()
    yield url


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url, pool_size=5)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def db_session_factory(db_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(db_engine)


@pytest.fixture(params=DIALECTS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all (a new one per test), once per dialect."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "empty.sqlite")
        return
    require_postgres()
    url = create_postgres_database("cds_test_mig")
    try:
        yield url
    finally:
        drop_postgres_database(url)
