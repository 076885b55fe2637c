"""Thin tasks: take ids, call one use case. Transient errors retry with exponential backoff and jitter;
anything else (or the last retry) marks the ledger event, or the evaluation's write-back, ``failed``: visible
and replayable."""

from __future__ import annotations

import random
import time
from typing import Any

from celery import Task
from sqlalchemy.exc import OperationalError

from service.db.models import EventStatus
from service.db.repositories import Repositories
from service.fhir.errors import FhirTransientError
from service.logging import get_logger
from service.metrics import TASK_LATENCY, TASKS
from service.queue import TASK_EVALUATE, TASK_PROCESS_EVENT, TASK_RECONCILE, TASK_SWEEP, TASK_WRITEBACK, unit_of_work
from service.usecases import monitor
from workers import context
from workers.celery_app import app

log = get_logger("calcinosis-cds.worker")
TRANSIENT = (FhirTransientError, OperationalError, ConnectionError, TimeoutError)


def _backoff(retries: int, exc: BaseException | None = None) -> float:
    """Exponential step with full jitter; never sooner than the FHIR server's ``Retry-After`` (kept within the
    backoff cap, which the broker's visibility timeout allows for)."""
    settings = context.get().settings
    base = min(2**retries, settings.task_retry_backoff_max_s)
    delay = base * (0.5 + random.random())  # full jitter around the exponential step
    hinted = getattr(exc, "retry_after_s", None)
    if hinted:
        delay = max(delay, min(float(hinted), settings.task_retry_backoff_max_s))
    return delay


def _run(name: str, fn: Any, *args: Any) -> Any:
    started = time.perf_counter()
    try:
        result = fn(*args)
        TASKS.labels(name, "ok").inc()
        return result
    finally:
        TASK_LATENCY.labels(name).observe(time.perf_counter() - started)


def _failed(name: str, exc: BaseException, **ids: Any) -> None:
    """Count and log a task that ends failed (ids and the error's type only, never its text)."""
    TASKS.labels(name, "failed").inc()
    log.error("task_failed", task=name, error=type(exc).__name__, **ids)


def _gave_up(task: Task, name: str, exc: BaseException, **ids: Any) -> bool:
    """A transient failure: True (counted and logged) when the retries are used up; otherwise call ``_retry``."""
    if task.request.retries < context.get().settings.task_max_retries:
        return False
    _failed(name, exc, attempts=task.request.retries + 1, **ids)
    return True


def _retry(task: Task, name: str, exc: BaseException, countdown: float | None = None) -> Exception:
    TASKS.labels(name, "retry").inc()
    return task.retry(exc=exc, countdown=_backoff(task.request.retries, exc) if countdown is None else countdown)


@app.task(bind=True, name=TASK_PROCESS_EVENT, max_retries=None)
def process_event(self: Task, event_id: int) -> str:
    ctx = context.get()
    try:
        return str(_run(TASK_PROCESS_EVENT, monitor.process_event, ctx, event_id))
    except TRANSIENT as exc:
        if _gave_up(self, TASK_PROCESS_EVENT, exc, event_id=event_id):
            monitor.mark_failed(ctx, event_id, exc)
            return EventStatus.FAILED
        with unit_of_work(ctx.sessions, ctx.queue) as (session, _):
            Repositories(session).ledger.mark_status(event_id, EventStatus.QUEUED, error=f"retrying: {type(exc).__name__}")
        raise _retry(self, TASK_PROCESS_EVENT, exc) from None
    except Exception as exc:
        monitor.mark_failed(ctx, event_id, exc)
        _failed(TASK_PROCESS_EVENT, exc, event_id=event_id)
        return EventStatus.FAILED


@app.task(bind=True, name=TASK_EVALUATE, max_retries=None)
def evaluate_patient(self: Task, patient_ref: str) -> int | None:
    try:
        return _run(TASK_EVALUATE, monitor.evaluate_patient_state, context.get(), patient_ref)
    except TRANSIENT as exc:
        if _gave_up(self, TASK_EVALUATE, exc):
            return None  # the patient stays dirty: the sweeper enqueues it again later
        raise _retry(self, TASK_EVALUATE, exc) from None


@app.task(bind=True, name=TASK_WRITEBACK, max_retries=None)
def write_back(self: Task, evaluation_id: int) -> dict[str, str]:
    ctx = context.get()
    try:
        return _run(TASK_WRITEBACK, monitor.write_back, ctx, evaluation_id)
    except TRANSIENT as exc:
        if _gave_up(self, TASK_WRITEBACK, exc, evaluation_id=evaluation_id):
            monitor.writeback_failed(ctx, evaluation_id, exc, transient=True)  # the sweeper sends it again later
            return {"failed": type(exc).__name__}
        countdown = _backoff(self.request.retries, exc)
        monitor.writeback_retrying(ctx, evaluation_id, exc, countdown)
        raise _retry(self, TASK_WRITEBACK, exc, countdown) from None
    except Exception as exc:  # a permanent error (4xx): failed, listed and replayable, never retried by itself
        monitor.writeback_failed(ctx, evaluation_id, exc, transient=False)
        _failed(TASK_WRITEBACK, exc, evaluation_id=evaluation_id)
        return {"failed": type(exc).__name__}


def _periodic(name: str, fn: Any) -> Any:
    """A beat task: counted and timed like the others; a failure (the database unreachable, ...) is counted and logged
    as ``failed`` and not retried, since the next beat runs it again."""
    try:
        return _run(name, lambda: fn(context.get()))
    except Exception as exc:
        _failed(name, exc)
        return None


@app.task(name=TASK_SWEEP)
def sweep() -> dict[str, int] | None:
    return _periodic(TASK_SWEEP, monitor.sweep)


@app.task(name=TASK_RECONCILE)
def reconcile() -> int | None:
    return _periodic(TASK_RECONCILE, monitor.reconcile)
