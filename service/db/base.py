"""Declarative base and the column types shared by every table.

- Constraint and index names follow one naming convention, so Alembic (and SQLite batch migrations, which
  recreate tables) can always address a constraint by name.
- ``UTCDateTime`` stores timezone-aware UTC on both dialects: ``timestamptz`` on PostgreSQL, and on SQLite
  (which has no timestamp type) the naive UTC text that SQLAlchemy writes, so text order equals time order.
  Values read back are always aware UTC ``datetime`` objects; a naive datetime is refused on the way in.
- ``JSONType`` is ``JSONB`` on PostgreSQL and ``JSON`` (text) elsewhere; Python ``None`` is SQL ``NULL``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import JSON, BigInteger, DateTime, Integer, MetaData
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator, TypeEngine

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only clock the persistence layer reads)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every dialect (naive datetimes are refused)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError("UTCDateTime expects a datetime")
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            raise ValueError("naive datetime refused: persistence timestamps must be timezone-aware (UTC)")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            # SQLite keeps text; one fixed UTC form keeps text comparison equal to time comparison.
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def json_type() -> TypeEngine[Any]:
    """JSON column type: JSONB on PostgreSQL, JSON elsewhere; ``None`` is stored as SQL NULL."""
    return JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def id_type() -> TypeEngine[int]:
    """Surrogate key type: BIGINT, except INTEGER on SQLite (only ``INTEGER PRIMARY KEY`` autoincrements there)."""
    return BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base of every table (``Base.metadata`` is Alembic's target)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def json_dumps(value: Any) -> str:
    """The one JSON encoder of the database layer (columns and PostgreSQL batch parameters): orjson, several times
    faster than the standard library on FHIR documents."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
