"""Everything a request needs, built once from Settings at start-up (and refused on a bad mapping file)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.cds.discovery import discovery_document
from service.cds.thresholds import Thresholds
from service.config import Settings
from service.db.repositories import EvaluationRepository, InboundEventRepository, SubscriptionStateRepository
from service.db.session import check_database, engine_for, make_session_factory, session_scope
from service.fhir.hook_fetch import HookFetcher
from service.logging import get_logger
from service.security import JwtVerifier, build_verifier
from service.terminology.catalog import Catalog
from service.terminology.checks import load_rule_catalog
from service.tls import client_ssl_context
from service.usecases.audit import IssuedCardRecorder
from service.usecases.evaluate_hook import HookService, StoredAssessment
from service.usecases.monitor import MonitorContext
from service.usecases.turns import CpuTurns

log = get_logger("calcinosis-cds.api")
T = TypeVar("T")


class _Recent(Generic[T]):
    """The last value a check gave, reused for ``ttl_s`` seconds so that probes and scrapes cannot hammer the
    dependencies behind it; a check that could not answer (None) is tried again at the next call."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._at = 0.0
        self._value: T | None = None

    def get(self, check: Callable[[], T | None]) -> T | None:
        now = time.monotonic()
        if self._value is not None and now - self._at < self.ttl_s:
            return self._value
        value = check()
        if value is not None:
            self._at, self._value = now, value
        return value


@dataclass
class AppContext:
    settings: Settings
    catalog: Catalog
    thresholds: Thresholds
    verifier: JwtVerifier
    hooks: HookService
    engine: Engine
    sessions: sessionmaker[Session]
    discovery: dict[str, Any]
    monitor: MonitorContext
    issued_cards: IssuedCardRecorder
    turns: CpuTurns = field(default_factory=CpuTurns)  # CDS Hooks calls parse and evaluate one at a time, in arrival order
    _readiness: _Recent[dict[str, Any]] = field(default_factory=lambda: _Recent(1.0), repr=False)
    _event_counts: _Recent[dict[str, int]] = field(default_factory=lambda: _Recent(5.0), repr=False)
    _subscription_counts: _Recent[dict[str, int]] = field(default_factory=lambda: _Recent(5.0), repr=False)

    def event_counts(self) -> dict[str, int] | None:
        """Ledger events by status for ``/metrics`` (None when the database cannot say); kept for five seconds."""
        return self._event_counts.get(lambda: self._counts("event", InboundEventRepository))

    def subscription_counts(self) -> dict[str, int] | None:
        """Subscriptions by the status their FHIR server last reported, for ``/metrics`` (None when the database
        cannot say); kept for five seconds."""
        return self._subscription_counts.get(lambda: self._counts("subscription", SubscriptionStateRepository))

    def readiness(self) -> dict[str, Any]:
        """Database, broker, mappings and replay-cache checks; kept for one second."""
        result = self._readiness.get(self._check_readiness)
        assert result is not None  # the check always answers
        return result

    def _counts(self, what: str, repository: type[InboundEventRepository] | type[SubscriptionStateRepository]) -> dict[str, int] | None:
        """``repository(session).counts_by_status()``; None, and a line, when the database cannot say."""
        try:
            with session_scope(self.sessions) as session:
                return repository(session).counts_by_status()
        except (SQLAlchemyError, OSError) as exc:
            log.warning(f"{what}_counts_unavailable", error=type(exc).__name__)
            return None

    def _check_readiness(self) -> dict[str, Any]:
        from service.broker import check_broker

        checks = {
            "database": check_database(self.engine),
            "broker": check_broker(self.settings.effective_broker_url),
            "mappings": bool(self.catalog.observations),
            "replay_cache": self.verifier.replay_cache_available(),  # Redis when CDS_REDIS_URL is set
        }
        result = {
            "status": "ready" if all(checks.values()) else "unready",
            "checks": checks,
            "mappings_version": self.catalog.version,
            "rules_version": self.thresholds.rules_version(),
            "dev_mode": self.settings.dev_mode,
        }
        if self.settings.dev_mode:
            result["warning"] = "development mode: unsigned CDS Hooks calls are accepted and fhirServer is not restricted"
        return result


def build_context(settings: Settings, *, catalog: Catalog | None = None, thresholds: Thresholds | None = None) -> AppContext:
    """``catalog``/``thresholds``: already loaded and checked from these settings (``serve`` checks them first)."""
    catalog = catalog if catalog is not None else load_rule_catalog(settings.mappings_dir)
    thresholds = thresholds if thresholds is not None else settings.effective_thresholds()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = engine_for(settings)
    fetcher = HookFetcher(
        timeout_s=settings.fhir_timeout_s,
        max_pages=settings.fhir_max_pages,
        max_bytes=settings.max_hook_request_bytes,
        proxy=settings.hook_fetch_proxy.get_secret_value() if settings.hook_fetch_proxy is not None else None,
        ssl_context=client_ssl_context(settings.tls_ca_file, owner="aiohttp"),
    )
    sessions = make_session_factory(engine)

    def stored(patient_ref: str) -> StoredAssessment | None:
        with session_scope(sessions) as session:
            row = EvaluationRepository(session).latest_for(patient_ref)
            if row is None:
                return None
            return StoredAssessment(row.evaluated_at, row.rules_version, row.mappings_version, row.assessment)

    hooks = HookService(
        stored=stored,
        stored_fresh_s=settings.assessment_fresh_s,
        catalog=catalog,
        thresholds=thresholds,
        topic_system=settings.topic_system,
        fetcher=fetcher,
        fhir_server_allowlist=settings.fhir_server_allowlist,
        dev_mode=settings.dev_mode,
        max_draft_orders=settings.max_draft_orders,
    )
    monitor = MonitorContext.from_settings(settings, catalog=catalog, thresholds=thresholds, sessions=sessions)
    return AppContext(
        settings=settings,
        catalog=catalog,
        thresholds=thresholds,
        verifier=build_verifier(settings),
        hooks=hooks,
        engine=engine,
        sessions=sessions,
        discovery=discovery_document(catalog),
        monitor=monitor,
        issued_cards=IssuedCardRecorder(sessions),
    )
