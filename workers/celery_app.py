"""The Celery app, built from the same Settings as the API (CDS_BROKER_URL; embedded default: SQLite transport)."""

from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_process_init

from service.config import get_settings
from service.queue import QUEUES, TASK_RECONCILE, TASK_SWEEP

settings = get_settings()
settings.data_dir.mkdir(parents=True, exist_ok=True)

app = Celery("calcinosis-cds", broker=settings.effective_broker_url, include=["workers.tasks"])
transport_options: dict[str, object] = {}
if settings.effective_broker_url.startswith(("redis://", "rediss://")):
    # Unacked messages return to the queue after this long (a worker killed mid-task; acks_late). It must exceed
    # the longest retry countdown (backoff cap x 1.5 jitter), or Redis hands a waiting retry to a second worker.
    transport_options = {
        "visibility_timeout": max(settings.sweeper_stale_after_s * 2, int(settings.task_retry_backoff_max_s * 1.5) + 60, 60)
    }
    # kombu's Redis transport, guarded so that losing Redis does not crash the worker (see workers/redis_transport.py).
    app.conf.broker_transport = "workers.redis_transport:Transport"
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue="ingest",
    task_routes={f"{prefix}.*": {"queue": queue} for prefix, queue in QUEUES.items()},
    broker_transport_options=transport_options,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    beat_schedule={
        "sweep": {"task": TASK_SWEEP, "schedule": float(settings.sweeper_interval_s)},
        "reconcile": {"task": TASK_RECONCILE, "schedule": float(settings.reconcile_interval_s)},
    },
    timezone="UTC",
)


@setup_logging.connect
def _logging(**_: object) -> None:
    """Celery's own lines (connected, ready, task received and succeeded) in the service's format, one JSON object per
    line, instead of Celery's handlers and header (connecting this signal is what turns those off, and with them
    the redirection of standard output into its logger)."""
    from service.logging import configure_logging

    configure_logging(settings.log_level, settings.log_json)


@worker_init.connect
def _warm_up(**_: object) -> None:
    """In the worker's main process, before any pool process is forked: the FHIR models' first validation, then the
    collector settled; forked children inherit both. (With ``--pool solo`` tasks run in this process, which builds
    its context at the first task, after this.)"""
    from service.cds.validate import warm_up
    from service.runtime import settle_gc

    warm_up()
    settle_gc(settings.gc_gen0_threshold)
    if settings.worker_metrics_port is not None:
        from service.logging import get_logger
        from service.metrics import serve_http

        if settings.metrics_dir is None:  # started by `celery` itself, not `calcinosis-cds worker`
            get_logger("calcinosis-cds.worker").warning("worker_metrics_main_process_only", reason="PROMETHEUS_MULTIPROC_DIR unset")
        serve_http(settings.worker_metrics_host, settings.worker_metrics_port, settings.metrics_dir)


@worker_process_init.connect
def _process_context(**_: object) -> None:
    """Each forked worker process opens its own database connections, builds its context before the first task
    (mappings, statements), then settles the garbage collector."""
    from service.runtime import settle_gc
    from workers import context

    context.reset()
    try:
        context.get()
    except Exception as exc:  # built again by the first task, which then fails visibly and is retried
        from service.logging import get_logger

        get_logger("calcinosis-cds.worker").warning("context_not_built_at_start", error=type(exc).__name__)
    settle_gc(settings.gc_gen0_threshold)
