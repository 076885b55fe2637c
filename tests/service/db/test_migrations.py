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


def test_upgrade_from_0001_adds_writeback_requests_and_keeps_the_data(empty_db_url: str) -> None:
    """A database at the first release's schema, with an evaluation in it, upgrades in place (and back)."""
    from alembic import command
    from sqlalchemy import text

    from service.db.migrate import alembic_config

    command.upgrade(alembic_config(empty_db_url), "0001")
    engine = make_engine(empty_db_url, pool_size=1)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO evaluations (id, patient_ref, evaluated_at, inputs_hash, inputs, rules_version, mappings_version,"
                    " calciphylaxis_tier, metastatic_tier, assessment, created_at)"
                    " VALUES (7, 'Patient/p1', '2026-01-01 00:00:00', 'h', '[]', 'r', 'm', 'high', 'none', '{}', '2026-01-01 00:00:00')"
                )
            )
        assert "writeback_requests" not in _tables(empty_db_url)

        assert upgrade_to_head(empty_db_url) == head_revision()

        assert "writeback_requests" in _tables(empty_db_url)
        assert _diff(empty_db_url) == []
        with engine.connect() as connection:
            assert connection.execute(text("SELECT patient_ref FROM evaluations WHERE id = 7")).scalar_one() == "Patient/p1"
            assert connection.execute(text("SELECT count(*) FROM writeback_requests")).scalar_one() == 0
        assert downgrade_to(empty_db_url, "0001") == "0001"
        assert "writeback_requests" not in _tables(empty_db_url)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM evaluations")).scalar_one() == 1
    finally:
        engine.dispose()
