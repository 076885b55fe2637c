"""Migrations: upgrading an empty database of each kind yields exactly the schema of the models."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from service.db import models  # noqa: F401
from service.db.base import Base
from service.db.migrate import current_revision, downgrade_to, head_revision, is_up_to_date, upgrade_to_head
from service.db.session import make_engine


def _diff(url: str) -> list[Any]:
    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url, pool_size=1)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_to_head_creates_exactly_the_models(empty_db_url: str) -> None:
    assert current_revision(empty_db_url) is None
    assert not is_up_to_date(empty_db_url)
    assert upgrade_to_head(empty_db_url) == head_revision()
    assert _tables(empty_db_url) == set(Base.metadata.tables) | {"alembic_version"}
    assert _diff(empty_db_url) == []
    assert is_up_to_date(empty_db_url)
    assert upgrade_to_head(empty_db_url) == head_revision()  # idempotent


def test_downgrade_to_base_drops_everything(empty_db_url: str) -> None:
    upgrade_to_head(empty_db_url)
    assert downgrade_to(empty_db_url, "base") is None
    assert _tables(empty_db_url) <= {"alembic_version"}
    assert upgrade_to_head(empty_db_url) == head_revision()


def test_one_linear_history() -> None:
    from alembic.script import ScriptDirectory

    from service.db.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    assert len(script.get_bases()) == 1
