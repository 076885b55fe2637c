"""Schema migrations (Alembic) as functions, for the ``calcinosis-cds migrate`` command and for tests.

``url`` None means ``get_settings().effective_database_url``. The Alembic files ship inside the package
(``service/db/alembic.ini`` and ``service/db/migrations``), so an installed service migrates itself.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from service.db.session import make_engine, normalize_url

ALEMBIC_INI = Path(__file__).resolve().parent / "alembic.ini"


def _resolve(url: str | None) -> str:
    if url is None:
        from service.config import get_settings

        url = get_settings().effective_database_url
    return normalize_url(url).render_as_string(hide_password=False)


def alembic_config(url: str | None = None) -> Config:
    """The Alembic config of the service, bound to ``url``."""
    config = Config(str(ALEMBIC_INI))
    config.attributes["url"] = _resolve(url)
    return config


def head_revision() -> str | None:
    """The newest revision shipped with this code."""
    return ScriptDirectory.from_config(Config(str(ALEMBIC_INI))).get_current_head()


def current_revision(url: str | None = None) -> str | None:
    """The revision the database is at (None: never migrated)."""
    engine = make_engine(_resolve(url), pool_size=1)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def upgrade_to_head(url: str | None = None) -> str | None:
    """Apply every pending migration; returns the revision reached."""
    resolved = _resolve(url)
    command.upgrade(alembic_config(resolved), "head")
    return current_revision(resolved)


def downgrade_to(url: str | None, revision: str) -> str | None:
    """Revert to ``revision`` (``"base"``: drop every table); returns the revision reached."""
    resolved = _resolve(url)
    command.downgrade(alembic_config(resolved), revision)
    return current_revision(resolved)


def is_up_to_date(url: str | None = None) -> bool:
    """True when the database is at the head revision (a readiness check)."""
    return current_revision(url) == head_revision()
