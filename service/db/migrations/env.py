"""Alembic environment of the service database (SQLite or PostgreSQL).

The URL comes from ``config.attributes["url"]`` (set by :mod:`service.db.migrate`), else the
``sqlalchemy.url`` option, else ``get_settings().effective_database_url``. A caller may also pass an open
connection as ``config.attributes["connection"]``. SQLite runs in batch mode (its ALTER TABLE is limited).
On PostgreSQL a transaction-scoped advisory lock serialises concurrent ``migrate`` runs (several replicas or
jobs starting at once); the second one then finds the schema at head and does nothing.

Logging is left alone on purpose (no ``fileConfig``): migrations also run inside the service process.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import text
from sqlalchemy.engine import Connection

from service.db import models  # noqa: F401  (registers every table on Base.metadata)
from service.db.base import Base, UTCDateTime
from service.db.session import make_engine, normalize_url

config = context.config
target_metadata = Base.metadata

# Arbitrary constant: the advisory lock key of schema migrations ("cds-mig" in ASCII).
MIGRATION_LOCK_KEY = 0x6364732D6D6967


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from service.config import get_settings

        url = get_settings().effective_database_url
    return normalize_url(url).render_as_string(hide_password=False)


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render project types as plain SQLAlchemy types so revisions never import application code."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_item=_render_item,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    url = _url()
    _configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=normalize_url(url).get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url(), pool_size=1)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
