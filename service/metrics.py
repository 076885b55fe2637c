"""Prometheus metrics of the API and the workers. Labels carry service ids, paths and outcomes, never patient data.

One process keeps its metrics in memory. When a command starts several processes (``serve --workers N``, a prefork
``worker``), it names a directory in ``PROMETHEUS_MULTIPROC_DIR`` before they start; each process then writes its
values to files there, and a scrape of any of them reads the sum over all (``exposition``).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

HOOK_LATENCY = Histogram(
    "cds_hook_request_seconds",
    "CDS Hooks service call latency",
    ["service", "data_path"],  # data_path: prefetch | fallback | stored
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
HOOK_412 = Counter("cds_hook_precondition_failed_total", "CDS Hooks calls answered 412 (data unobtainable)", ["service"])
#: Every 4xx/5xx answer of a service call, by service ("unknown" for an id that is not ours) and HTTP status: alert on
#: status="500" (a bug) and on a rate of 4xx that a working EHR integration does not produce.
HOOK_ERRORS = Counter("cds_hook_errors_total", "CDS Hooks service calls answered 4xx/5xx, by status", ["service", "status"])
CARDS = Counter("cds_cards_total", "Cards returned, by topic", ["service", "topic"])
FEEDBACK = Counter("cds_feedback_total", "Card feedback received", ["service", "outcome"])
AUTH_FAILURES = Counter("cds_auth_failures_total", "Rejected CDS Hooks calls (401)", ["route"])
#: result: accepted and duplicate count events; unauthorized, too-large, invalid, ledger-unavailable,
#: broker-unavailable and error count requests answered 401, 413, 400, 503 and 500 (form "unknown" until the body is
#: parsed). invalid includes values the ledger can never store (a permanent error: never answered 503).
NOTIFICATIONS = Counter("fhir_notifications_total", "Inbound FHIR notifications", ["form", "result"])
NOTIFICATION_LATENCY = Histogram(
    "fhir_notification_request_seconds",
    "Notification receiver latency, by result (accepted, unauthorized, too-large, invalid, ledger-unavailable, broker-unavailable, error)",
    ["result"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
EVALUATIONS = Counter("evaluations_total", "Patient evaluations performed", ["trigger"])
WRITEBACKS = Counter("writebacks_total", "RiskAssessment write-backs", ["result"])
TASKS = Counter("worker_tasks_total", "Worker task outcomes", ["task", "result"])
TASK_LATENCY = Histogram("worker_task_seconds", "Worker task latency", ["task"])
#: A _lastUpdated catch-up search cut at CDS_FHIR_MAX_PAGES (the rest follows in another round; see the log line).
CATCH_UP_TRUNCATED = Counter("fhir_catch_up_truncated_total", "Catch-up searches cut at CDS_FHIR_MAX_PAGES, by resource type", ["resource_type"])
#: What catch-up rounds did with types' _history: "tombstoned" counts stored resources tombstoned by a deletion read
#: there; "truncated" a read cut at ten times CDS_FHIR_MAX_PAGES (its mark stays: raise the bound); "failed" a read
#: that failed (its mark stays; the next round reads the window again).
CATCH_UP_HISTORY = Counter(
    "fhir_catch_up_history_total", "Type-level _history reads of catch-up rounds: resources tombstoned, reads cut or failed", ["resource_type", "result"]
)
#: Read from the ledger when /metrics is scraped, so it holds for every worker: alert on status="failed" growing.
INBOUND_EVENTS = Gauge(
    "inbound_events",
    "Inbound events in the ledger, by status (read at scrape time)",
    ["status"],
    multiprocess_mode="mostrecent",  # several API processes: the latest reading, not their sum
)
#: Read from the database when /metrics is scraped, as the FHIR server last reported each subscription's status (a
#: Backport notification or heartbeat): alert on status="error" above zero.
SUBSCRIPTIONS = Gauge(
    "fhir_subscriptions",
    "Subscriptions by the status their FHIR server last reported (read at scrape time)",
    ["status"],
    multiprocess_mode="mostrecent",
)


def _registry(shared_dir: Path | None) -> CollectorRegistry:
    """This process's registry or, with a shared directory, one that reads every process that wrote to it."""
    if shared_dir is None:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(shared_dir))
    return registry


def exposition(shared_dir: Path | None) -> bytes:
    """The Prometheus text a scrape gets (the API's ``/metrics``)."""
    return generate_latest(_registry(shared_dir))


def serve_http(host: str, port: int, shared_dir: Path | None) -> None:
    """Serve the same text from a background thread (the worker's main process)."""
    start_http_server(port, addr=host, registry=_registry(shared_dir))
