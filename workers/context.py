"""Per-process MonitorContext for tasks (built lazily; rebuilt after fork)."""

from __future__ import annotations

from service.config import get_settings
from service.db.session import make_engine, make_session_factory
from service.fhir.client import client_from_settings
from service.logging import configure_logging
from service.queue import CeleryQueue
from service.terminology.checks import check_catalog_for_rules
from service.terminology.loader import load_catalog
from service.usecases.monitor import MonitorContext

_ctx: MonitorContext | None = None


def get() -> MonitorContext:
    global _ctx
    if _ctx is None:
        settings = get_settings()
        configure_logging(settings.log_level, settings.log_json)
        catalog = load_catalog(settings.mappings_dir)
        check_catalog_for_rules(catalog)
        engine = make_engine(settings.effective_database_url, settings.db_pool_size)
        _ctx = MonitorContext(
            settings=settings,
            catalog=catalog,
            thresholds=settings.effective_thresholds(),
            sessions=make_session_factory(engine),
            queue=CeleryQueue(settings.effective_broker_url),
            fhir_client=(lambda: client_from_settings(settings)) if settings.fhir_base_url else None,
        )
    return _ctx


def reset() -> None:
    global _ctx
    _ctx = None
