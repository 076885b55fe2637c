"""Settings: the only reader of the environment (``CDS_*`` variables; see ``.env.example``).

Embedded defaults run on one machine with no servers (SQLite database, a SQLite-backed Celery
transport). Setting ``CDS_DATABASE_URL`` and ``CDS_BROKER_URL`` switches to PostgreSQL and Redis with
the same code. Validators refuse unsafe combinations in production (``CDS_ENVIRONMENT=production``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.cds.thresholds import Thresholds
from service.tls import CaFileError, check_ca_file

_ROOT = Path(__file__).resolve().parents[1]


class TrustedIssuer(BaseModel):
    """An EHR allowed to call the CDS Hooks services (CDS Hooks 2.0 trust model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iss: str
    jwks_url: str | None = Field(None, description="Where the issuer's JWK Set is published")
    jwks_file: Path | None = Field(None, description="A local copy of the issuer's JWK Set")
    jku_allowlist: tuple[str, ...] = Field((), description="jku header values honoured for this issuer")
    tenants: tuple[str, ...] = Field((), description="If set, the token's tenant claim must be one of these")

    @model_validator(mode="after")
    def _keys(self) -> TrustedIssuer:
        if not (self.jwks_url or self.jwks_file or self.jku_allowlist):
            raise ValueError(f"issuer {self.iss}: needs jwks_url, jwks_file or jku_allowlist")
        if self.jwks_file is not None:
            # Refused at start-up, not at the first call (which would be a 401 with the reason only in the log).
            from service.security.jwks import JwksError, check_jwks_file  # the security package imports this module

            try:
                check_jwks_file(self.jwks_file)
            except JwksError as exc:
                raise PydanticCustomError("jwks_file", "issuer {iss}: jwks_file cannot be used: {reason}", {"iss": self.iss, "reason": str(exc)}) from None
        return self


SANDBOX_ISSUER = "https://sandbox.cds-hooks.org"


def _database_dialect(url: str) -> None:
    """ValueError unless SQLAlchemy parses ``url`` and its dialect and driver are installed."""
    from sqlalchemy.engine import make_url  # here: importing the settings stays light for the offline CLI
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ImportError):
        raise ValueError from None


def _broker_transport(url: str) -> None:
    """ValueError unless ``url`` names an installed kombu transport."""
    from kombu import Connection

    try:
        Connection(url).get_transport_cls()
    except (KeyError, ImportError):
        raise ValueError from None


_URL_CHECKS: dict[str, tuple[Callable[[str], None], str]] = {
    "database_url": (_database_dialect, "dialect+driver://..."),
    "broker_url": (_broker_transport, "redis://, amqp://, ..."),
}


def _is_base_url(parts: SplitResult) -> bool:
    """An absolute http(s) URL with a host and nothing after its path."""
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query and not parts.fragment


def _plain_jwks_url(issuer: TrustedIssuer) -> str | None:
    """Which of the issuer's JWK Set URLs (``jwks_url``, ``jku_allowlist`` entry N) is not an https URL, if any."""
    urls = [("jwks_url", issuer.jwks_url)] if issuer.jwks_url is not None else []
    urls += [(f"jku_allowlist entry {n}", url) for n, url in enumerate(issuer.jku_allowlist, start=1)]
    for where, url in urls:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            return where
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CDS_",
        env_nested_delimiter="__",
        env_file=None,
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,  # a refused setting may hold a credential: errors name the setting, not its value
    )

    # --- deployment ---------------------------------------------------------------------------
    environment: Literal["local", "test", "production"] = "local"
    host: str = "127.0.0.1"
    port: int = 8080
    public_base_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Base URLs EHRs call the service at: the JWT aud must be one of them + the path called. Required in production; "
        "empty (outside production only): the URL of the request as received, its host taken from the client's Host header.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    data_dir: Path = _ROOT / "var"

    # --- persistence and queues ----------------------------------------------------------------
    database_url: str = ""  # default: sqlite file in data_dir
    broker_url: str = ""  # default: kombu SQLAlchemy transport over sqlite in data_dir
    redis_url: str | None = Field(
        None,
        description="Redis for the JWT jti replay cache shared by every process and replica (required in production) and readiness checks; "
        "unset: each process keeps its own cache",
    )
    db_pool_size: int = 5
    db_connect_timeout_s: int = Field(
        5, ge=1, le=300, description="PostgreSQL: longest wait to open a connection (unless the URL sets connect_timeout)"
    )
    db_statement_timeout_s: int = Field(
        30, ge=0, le=3600,
        description="PostgreSQL: longest run of one statement, lock waits included, before it is cancelled (0: none; unless the URL sets options)",
    )

    # --- task publishing (bounded: a broker that accepts connections but never answers) ----------
    broker_socket_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Redis broker: longest wait to connect, or for an answer, when publishing a task (API, workers, CLI)"
    )
    broker_publish_max_retries: int = Field(1, ge=0, le=10, description="Retries of a task publish after a broker connection error or timeout")

    # --- clinical content ----------------------------------------------------------------------
    mappings_dir: Path = _ROOT / "mappings"
    thresholds: Thresholds = Field(default_factory=Thresholds)
    thresholds_file: Path | None = Field(None, description="JSON file of Thresholds overrides")
    topic_system: str = "https://calcinosis-cds.org/fhir/CodeSystem/card-topic"

    # --- CDS Hooks security ---------------------------------------------------------------------
    dev_mode: bool = Field(False, description="Accept unsigned CDS Hooks calls and any fhirServer (never in production)")
    trusted_issuers: list[TrustedIssuer] = Field(default_factory=list)
    trust_sandbox: bool = Field(False, description="Trust the public CDS Hooks Sandbox key (refused in production)")
    sandbox_jwks_file: Path = _ROOT / "service" / "api" / "sandbox-jwks.json"
    jwt_clock_skew_s: int = 60
    jwt_max_lifetime_s: int = Field(3600, description="Longest exp - iat accepted (Epic issues 15-minute tokens)")
    jwks_cache_s: int = 3600
    jwks_timeout_s: float = Field(5.0, description="HTTP timeout when fetching an issuer's JWK Set")
    jwks_min_refetch_s: int = Field(30, description="Least time between JWK Set refetches per issuer (unknown kid, failures)")
    fhir_server_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="https base URLs a fhirServer may be at or under (same origin); not used in development mode"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    admin_token: SecretStr | None = Field(None, description="Bearer token for audit and assessment reads (feedback, /patients/...)")
    max_hook_request_bytes: int = 20_000_000
    max_draft_orders: int = Field(
        100,
        ge=1,
        description="Most draft MedicationRequests of one order-select/order-sign call that are checked; an info card says how many more were not",
    )
    bench_floor_route: bool = Field(False, description="Mount POST /bench/floor for bench/cds_hooks.py (never in production)")

    # --- FHIR fetch (prefetch fallback and monitoring) -------------------------------------------
    fhir_timeout_s: float = 5.0
    fhir_max_pages: int = 5
    fhir_search_count: int = Field(200, ge=1, description="Page size (_count) of the monitor's _lastUpdated catch-up searches")
    tls_ca_file: Path | None = Field(
        None,
        description="PEM file of CA certificates trusted for outbound HTTPS (FHIR servers, token endpoints, JWK Sets), "
        "in addition to the default trust; e.g. a hospital's internal CA",
    )
    hook_fetch_proxy: SecretStr | None = Field(
        None, description="HTTP proxy URL (it may carry credentials) for the CDS Hooks prefetch fallback; unset: direct connections"
    )
    fhir_max_retries: int = 3
    fhir_retry_backoff_s: float = Field(0.5, description="First retry delay; doubles per attempt (full jitter)")
    fhir_retry_after_max_s: float = Field(30.0, description="Cap on any single retry delay, Retry-After included")

    # --- monitored FHIR server (subscriptions, polling, write-back) ------------------------------
    fhir_base_url: str | None = None
    fhir_auth_mode: Literal["none", "bearer", "smart-backend"] = "none"
    fhir_bearer_token: SecretStr | None = None
    smart_client_id: str | None = None
    smart_private_key_file: Path | None = None
    smart_key_id: str | None = None
    smart_alg: Literal["RS384", "ES384"] = "RS384"
    smart_scope: str = (
        "system/Observation.rs system/Condition.rs system/MedicationRequest.rs system/MedicationStatement.rs "
        "system/MedicationAdministration.rs system/Procedure.rs system/Patient.rs system/RiskAssessment.cud"
    )
    smart_token_url: str | None = None

    # --- subscription receiver ------------------------------------------------------------------
    subscription_secret: SecretStr | None = Field(None, description="Shared secret the FHIR server sends in the channel header")
    subscription_header: str = Field("Authorization", description="Header carrying the secret (value 'Bearer <secret>' or the secret)")
    medplum_hmac_secret: SecretStr | None = None
    max_notification_bytes: int = 5_000_000

    # --- background evaluation -------------------------------------------------------------------
    writeback_enabled: bool = False
    writeback_confirm_basis: bool = Field(
        True,
        description="Before flags are written, read the results they rest on again from the FHIR server (R4 servers notify no deletion)",
    )
    writeback_recheck_h: int = Field(
        24, ge=0, le=24 * 90, description="Read the basis of each written flag again this often, changed or not (0: never; needs CDS_WRITEBACK_CONFIRM_BASIS)"
    )
    coalesce_window_s: float = 1.0
    task_max_retries: int = 5
    task_retry_backoff_max_s: int = 300
    sweeper_interval_s: int = 60
    sweeper_stale_after_s: int = 120
    writeback_sweeper_retries: int = Field(
        10, ge=0, description="Times the sweeper sends a write-back again after a transient failure (backoff doubling up to 6 h)"
    )
    reconcile_interval_s: int = 300
    poll_initial_lookback_h: int = Field(24, description="First _lastUpdated search looks back this far (backfill loads history)")
    poll_overlap_s: int = Field(
        60, ge=0, le=3600, description="Catch-up searches also read this far before each type's watermark again (late commits)"
    )
    poll_deletions: bool = Field(
        True,
        description=(
            "Catch-up rounds also read each type's _history since its watermark for deletions and re-coded versions of stored resources"
            " (a server that refuses type-level history is skipped)"
        ),
    )
    heartbeat_timeout_s: int = 900
    assessment_fresh_s: int = Field(3600, description="CDS Hooks reuses a stored assessment this recent for the same data")

    # --- metrics ----------------------------------------------------------------------------------
    worker_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Port on which `calcinosis-cds worker` serves Prometheus metrics (unset: not served)"
    )
    worker_metrics_host: str = Field("127.0.0.1", description="Address the worker's metrics port binds (0.0.0.0 in a container)")
    # The library's own variable, read here under its own name so the two cannot disagree. Set by `serve --workers N`
    # and `worker` for the processes they start, which share their metrics through it; never set by hand.
    metrics_dir: Path | None = Field(
        None,
        validation_alias="PROMETHEUS_MULTIPROC_DIR",
        description="Where the processes of one command share their metrics (set by serve --workers N and worker)",
    )

    # --- process tuning ---------------------------------------------------------------------------
    gc_gen0_threshold: int = Field(50_000, ge=0, description="Garbage collector generation-0 threshold in the API and workers (0: the interpreter's 700)")

    @field_validator("public_base_urls", "fhir_server_allowlist", "cors_origins", mode="before")
    @classmethod
    def _split_csv(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v.strip().startswith("["):
                return json.loads(v)
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("thresholds_file", "smart_private_key_file", "tls_ca_file", "metrics_dir", "worker_metrics_port", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("tls_ca_file")
    @classmethod
    def _ca_file(cls, v: Path | None) -> Path | None:
        """Refused at start-up, not at the first HTTPS call: an unreadable file or one with no CA certificate."""
        if v is not None:
            try:
                check_ca_file(v)
            except CaFileError as exc:
                raise PydanticCustomError("tls_ca_file", "CDS_TLS_CA_FILE cannot be used: {reason}", {"reason": str(exc)}) from None
        return v

    @field_validator("database_url", "broker_url")
    @classmethod
    def _connectable(cls, v: str, info: ValidationInfo) -> str:
        """A URL whose dialect and driver (database) or kombu transport (broker) is installed; never echoed."""
        field = info.field_name or ""
        if v:
            check, example = _URL_CHECKS[field]
            try:
                check(v)
            except ValueError:
                raise PydanticCustomError(
                    "url", "{name} is not a URL this service can use ({example})", {"name": f"CDS_{field.upper()}", "example": example}
                ) from None
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_any_case(cls, v: Any) -> Any:
        return v.strip().upper() if isinstance(v, str) else v

    @field_validator("hook_fetch_proxy", mode="before")
    @classmethod
    def _proxy_url(cls, v: Any) -> Any:
        """scheme://[user:password@]host[:port] and nothing more; the error never repeats the value (credentials)."""
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        if not isinstance(raw, str):
            return v
        if not raw.strip():
            return None
        try:
            parts = urlsplit(raw.strip())
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if not (port_ok and parts.scheme in ("http", "https") and parts.hostname and parts.path in ("", "/") and not parts.query and not parts.fragment):
            raise PydanticCustomError("proxy_url", "CDS_HOOK_FETCH_PROXY must be http(s)://[user:password@]host[:port]")
        return raw.strip()

    @model_validator(mode="after")
    def _safe(self) -> Settings:
        if not self.dev_mode:
            # Outside development mode a fhirServer must be https (the EHR's token never goes over clear text): an
            # http entry could never match, and is refused here rather than by a 412 on every call.
            plain = [i for i, parts in enumerate(map(urlsplit, self.fhir_server_allowlist)) if parts.scheme != "https" or not parts.netloc]
            if plain:
                raise ValueError(f"CDS_FHIR_SERVER_ALLOWLIST entries must be https base URLs outside development mode (entry {plain[0] + 1} is not)")
        bases = [i for i, parts in enumerate(map(urlsplit, self.public_base_urls)) if not _is_base_url(parts)]
        if bases:
            raise ValueError(f"CDS_PUBLIC_BASE_URLS entries must be http(s) base URLs, scheme and host (entry {bases[0] + 1} is not)")
        if self.environment == "production":
            if self.dev_mode:
                raise ValueError("CDS_DEV_MODE is refused when CDS_ENVIRONMENT=production")
            if self.trust_sandbox:
                raise ValueError("CDS_TRUST_SANDBOX is refused when CDS_ENVIRONMENT=production (its private key is public)")
            if any(i.iss == SANDBOX_ISSUER for i in self.trusted_issuers):
                raise ValueError("the CDS Hooks Sandbox issuer is refused when CDS_ENVIRONMENT=production")
            for issuer in self.trusted_issuers:
                # A JWK Set fetched over clear text could be swapped for the attacker's keys on the way.
                where = _plain_jwks_url(issuer)
                if where:
                    raise ValueError(f"CDS_TRUSTED_ISSUERS: issuer {issuer.iss}: {where} must be an https URL when CDS_ENVIRONMENT=production")
            if not self.public_base_urls:
                # Without it the expected aud is built from the client's Host header: a token minted for another
                # service with the same path would be accepted by sending that service's host name.
                raise ValueError("CDS_PUBLIC_BASE_URLS is required when CDS_ENVIRONMENT=production (the JWT aud is checked against it)")
            if not self.redis_url:
                # The in-memory jti cache is per process: with `serve --workers N` or several replicas a token
                # would be accepted once by each.
                raise ValueError("CDS_REDIS_URL is required when CDS_ENVIRONMENT=production (the JWT replay cache every process shares)")
        return self

    # --- derived -------------------------------------------------------------------------------
    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'calcinosis.sqlite'}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"

    def effective_thresholds(self) -> Thresholds:
        if self.thresholds_file is None:
            return self.thresholds
        overrides = json.loads(Path(self.thresholds_file).read_text(encoding="utf-8"))
        return Thresholds.model_validate({**self.thresholds.model_dump(), **overrides})


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
