"""Engines, sessions and the transaction boundary.

One URL selects the database: SQLite (the embedded default, a file in ``data_dir``) or PostgreSQL. The caller
owns the transaction through :func:`session_scope`; repositories never commit.

SQLite notes. The API process and the worker processes share one file, so every connection enables WAL
(readers never block the writer) and a busy timeout (a writer waits for the lock instead of failing). The
``sqlite3`` driver's default transaction handling is kept on purpose: it opens the write transaction at the
first INSERT/UPDATE/DELETE, so a transaction never has to upgrade a read snapshot to a write lock (the case
where SQLite returns "database is locked" at once, ignoring the busy timeout). Repository writes are single
atomic statements, which makes that choice safe. SAVEPOINTs are not used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.db.base import json_dumps

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; bare ``postgresql://`` / ``postgres://`` select the installed psycopg 3 driver."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database backend: {parsed.get_backend_name()}")
    return parsed


def is_sqlite(url: str | URL) -> bool:
    return normalize_url(url).get_backend_name() == "sqlite"


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:") or url.query.get("mode") == "memory":
        return None
    return Path(database)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


# PostgreSQL error classes whose messages quote row or input values: 22 data exception, 23 integrity violation.
_DATA_SQLSTATE_CLASSES = ("22", "23")


def _redact_postgres_error(context: ExceptionContext) -> None:
    """Drop the values PostgreSQL quotes in data and constraint errors ("Failing row contains (...)",
    "Key (...)=(...)"), which would put patient data in exceptions and logs. sqlstate and the table, column
    and constraint names are kept (also on ``exc.orig.sqlstate`` and ``exc.orig.diag``)."""
    orig = context.original_exception
    sqlstate = getattr(orig, "sqlstate", None)
    if not isinstance(sqlstate, str) or sqlstate[:2] not in _DATA_SQLSTATE_CLASSES:
        return
    parts = [f"{type(orig).__name__} sqlstate={sqlstate}"]
    diag = getattr(orig, "diag", None)
    for field in ("table_name", "column_name", "constraint_name"):
        value = getattr(diag, field, None)
        if value:
            parts.append(f"{field.removesuffix('_name')}={value}")
    text_ = " ".join(parts) + " (values withheld)"
    orig.args = (text_,)
    if context.sqlalchemy_exception is not None:
        context.sqlalchemy_exception.args = (f"({type(orig).__module__}.{type(orig).__name__}) {text_}",)


#: TCP keepalives of PostgreSQL connections: a peer gone silent is noticed in about a minute, not hours.
_PG_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def _postgres_connect_args(url: URL, connect_timeout_s: int | None, statement_timeout_s: int | None) -> dict[str, Any]:
    """libpq parameters that bound every wait on the server; what the URL sets itself is left to it."""
    args: dict[str, Any] = {k: v for k, v in _PG_KEEPALIVES.items() if k not in url.query}
    if connect_timeout_s and "connect_timeout" not in url.query:
        args["connect_timeout"] = connect_timeout_s
    if statement_timeout_s and "options" not in url.query:
        args["options"] = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
    return args


def make_engine(
    url: str | URL,
    pool_size: int = 5,
    *,
    echo: bool = False,
    connect_timeout_s: int | None = None,
    statement_timeout_s: int | None = None,
) -> Engine:
    """An engine for ``url``: SQLite with WAL and a busy timeout, or PostgreSQL (psycopg 3) with pre-ping and TCP
    keepalives, and, when given, a connect timeout and a statement timeout (the service's engines; migrations run
    unlimited).

    SQL parameters are hidden from exception messages and logs (``hide_parameters``), and PostgreSQL's
    quoting of row values in constraint errors is removed: both would carry patient data.
    """
    parsed = normalize_url(url)
    common: dict[str, Any] = {"echo": echo, "hide_parameters": True, "json_serializer": json_dumps, "json_deserializer": orjson.loads}
    if parsed.get_backend_name() == "sqlite":
        path = _sqlite_file(parsed)
        kwargs: dict[str, Any] = {
            "connect_args": {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        }
        if path is not None:
            path.expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["pool_size"] = pool_size
            kwargs["pool_pre_ping"] = True
        engine = create_engine(parsed, **common, **kwargs)
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    engine = create_engine(
        parsed,
        **common,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=_postgres_connect_args(parsed, connect_timeout_s, statement_timeout_s),
    )
    event.listen(engine, "handle_error", _redact_postgres_error)
    return engine


def engine_for(settings: Settings) -> Engine:
    """The service's engine (API, workers, CLI) as the settings describe it."""
    return make_engine(
        settings.effective_database_url,
        settings.db_pool_size,
        connect_timeout_s=settings.db_connect_timeout_s,
        statement_timeout_s=settings.db_statement_timeout_s,
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit when the block succeeds, roll back (and re-raise) when it fails."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def check_database(engine: Engine) -> bool:
    """True when the database answers ``SELECT 1`` (for ``/readyz``); never raises."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except (SQLAlchemyError, OSError) as exc:
        log.warning("database check failed: %s", type(exc).__name__)
        return False
