"""Thin tasks: take ids, call one use case. Transient errors retry with exponential backoff and jitter;
anything else (or the last retry) marks the ledger event ``failed``: visible and replayable."""

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


def _backoff(retries: int) -> float:
    settings = context.get().settings
    base = min(2**retries, settings.task_retry_backoff_max_s)
    return base * (0.5 + random.random())  # full jitter around the exponential step


def _run(task: Task, name: str, fn: Any, *args: Any) -> Any:
    started = time.perf_counter()
    try:
        result = fn(*args)
        TASKS.labels(name, "ok").inc()
        return result
    finally:
        TASK_LATENCY.labels(name).observe(time.perf_counter() - started)


@app.task(bind=True, name=TASK_PROCESS_EVENT, max_retries=None)
def process_event(self: Task, event_id: int) -> str:
    ctx = context.get()
    try:
        return str(_run(self, TASK_PROCESS_EVENT, monitor.process_event, ctx, event_id))
    except TRANSIENT as exc:
        if self.request.retries >= ctx.settings.task_max_retries:
            monitor.mark_failed(ctx, event_id, exc)
            TASKS.labels(TASK_PROCESS_EVENT, "failed").inc()
            log.error("event_failed", event_id=event_id, error=type(exc).__name__, attempts=self.request.retries + 1)
            return EventStatus.FAILED
        with unit_of_work(ctx.sessions, ctx.queue) as (session, _):
            Repositories(session).ledger.mark_status(event_id, EventStatus.QUEUED, error=f"retrying: {type(exc).__name__}")
        TASKS.labels(TASK_PROCESS_EVENT, "retry").inc()
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from None
    except Exception as exc:
        monitor.mark_failed(ctx, event_id, exc)
        TASKS.labels(TASK_PROCESS_EVENT, "failed").inc()
        log.error("event_failed", event_id=event_id, error=type(exc).__name__)
        return EventStatus.FAILED


@app.task(bind=True, name=TASK_EVALUATE, max_retries=None)
def evaluate_patient(self: Task, patient_ref: str) -> int | None:
    ctx = context.get()
    try:
        return _run(self, TASK_EVALUATE, monitor.evaluate_patient_state, ctx, patient_ref)
    except TRANSIENT as exc:
        if self.request.retries >= ctx.settings.task_max_retries:
            TASKS.labels(TASK_EVALUATE, "failed").inc()
            log.error("evaluation_failed", error=type(exc).__name__)  # the sweeper retries dirty patients later
            return None
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from None


@app.task(bind=True, name=TASK_WRITEBACK, max_retries=None)
def write_back(self: Task, evaluation_id: int) -> dict[str, str]:
    ctx = context.get()
    try:
        return _run(self, TASK_WRITEBACK, monitor.write_back, ctx, evaluation_id)
    except TRANSIENT as exc:
        if self.request.retries >= ctx.settings.task_max_retries:
            TASKS.labels(TASK_WRITEBACK, "failed").inc()
            log.error("writeback_failed", evaluation_id=evaluation_id, error=type(exc).__name__)
            return {"failed": type(exc).__name__}
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from None


@app.task(name=TASK_SWEEP)
def sweep() -> dict[str, int]:
    return monitor.sweep(context.get())


@app.task(name=TASK_RECONCILE)
def reconcile() -> int | None:
    return monitor.reconcile(context.get())
