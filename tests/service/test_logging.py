"""Log lines go to the standard error of the moment, even when it was swapped after logging was configured."""

from __future__ import annotations

import io
import json
import logging
import sys
import uuid
from typing import Any

import pytest
import structlog

from service.logging import _route_standard_logging, configure_logging, get_logger


def test_a_stream_swapped_and_closed_after_configuration_is_never_written_to(monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging("INFO", json=True)  # once per process; a no-op when the app already did it
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    get_logger("test").info("first_line", n=1)
    first.close()  # as a CLI test runner closes the stream it captured
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("test").info("second_line", n=2)  # used to raise "I/O operation on closed file"
    assert "second_line" in second.getvalue()


def standard_logging_here(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Standard ``logging`` routed as configure_logging does, into a stream the test reads (configure_logging acts
    once per process, whichever test or app came first)."""
    stamped = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True)]
    _route_standard_logging(logging.INFO, stamped, structlog.processors.JSONRenderer())
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    return captured


def test_standard_logging_lines_are_json_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warnings from modules on the standard ``logging`` module (the database check, the JWK Set loader) are one JSON
    object per line like the rest; the HTTP clients' per-request INFO lines (they hold URLs) are not written."""
    captured = standard_logging_here(monkeypatch)
    logging.getLogger("service.db.session").warning("database check failed: %s", "OperationalError")
    logging.getLogger("httpx").info("HTTP Request: GET https://fhir.example.org/Patient/123")
    lines = captured.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["database check failed: OperationalError"]
    assert json.loads(lines[0])["level"] == "warning"


def test_an_exception_on_a_standard_logging_line_is_its_type_and_frames_never_its_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery logs a task that raised with the exception attached: the line says which exception and where, in JSON,
    and carries neither its message nor a traceback object's repr."""
    captured = standard_logging_here(monkeypatch)

    def evaluate() -> None:
        raise KeyError("Patient/secret-mrn-12345")

    try:
        evaluate()
    except KeyError:
        logging.getLogger("celery.app.trace").error("Task %s raised unexpected", "cds.evaluate.patient", exc_info=True)
    (line,) = captured.getvalue().splitlines()
    assert "secret-mrn" not in line and "traceback object" not in line
    record = json.loads(line)
    assert record["exception"] == "KeyError"
    assert record["raised_at"][0].startswith("test_logging.py:") and record["raised_at"][0].endswith(" evaluate")
    assert "exc_info" not in record


def test_the_prefork_pools_own_lines_are_json_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker pool's supervisor logs a child that exited on a signal on billiard's own logger, which does not
    propagate to the root: the line is one JSON object like the rest, not Python's last-resort plain text."""
    from billiard import util

    captured = standard_logging_here(monkeypatch)
    util.get_logger()  # as the pool does before it logs; sets propagate off
    util.info("child process %s calling self.run()", 4243)  # start-up chatter: not written
    util.error("Process %r pid:%r exited with %r", "ForkPoolWorker-1", 4242, "signal 15 (SIGTERM)", exc_info=0)
    (line,) = captured.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "Process 'ForkPoolWorker-1' pid:4242 exited with 'signal 15 (SIGTERM)'"
    assert record["level"] == "error"


# --- Celery's own lines about a task that raised or retries: the exception's type, never its text -----------------
SECRET_REF = "Observation/secret-mrn-12345"
DB_ERROR = 'connection to server at "db.internal.example", port 5432 failed'


def run_in_a_worker_tracer(task: Any) -> None:
    """Run ``task`` as a worker's pool process does (``celery.app.trace.trace_task``, not eager mode): its success,
    failure and retry lines come from Celery's own code, on its ``celery.app.trace`` logger."""
    from celery.app.trace import trace_task

    task_id = str(uuid.uuid4())
    trace_task(task, task_id, [], {}, request={"id": task_id, "delivery_info": {}, "hostname": "worker@test"}, app=task.app, eager=False)


@pytest.fixture
def celery_app() -> Any:
    from celery import Celery

    app = Celery("log-test", broker="memory://", set_as_current=False)
    app.conf.update(task_ignore_result=True, task_store_errors_even_if_ignored=False)
    yield app
    app.close()


def test_celerys_raised_unexpected_line_names_the_exception_type_never_its_text(monkeypatch: pytest.MonkeyPatch, celery_app: Any) -> None:
    from sqlalchemy.exc import OperationalError

    @celery_app.task(name="cds.test.fails")
    def fails() -> None:
        raise OperationalError("SELECT 1", {}, Exception(DB_ERROR))

    captured = standard_logging_here(monkeypatch)
    run_in_a_worker_tracer(fails)
    text = captured.getvalue()
    assert "db.internal.example" not in text and "5432" not in text, text
    (line,) = [json.loads(x) for x in text.splitlines() if "raised unexpected" in x]
    assert line["event"].endswith("raised unexpected: OperationalError"), line["event"]
    assert line["exception"] == "OperationalError" and line["level"] == "error"


def test_celerys_retry_line_names_the_exception_type_never_its_text(monkeypatch: pytest.MonkeyPatch, celery_app: Any) -> None:
    from service.fhir.errors import FhirTransientError

    @celery_app.task(bind=True, name="cds.test.retries", max_retries=3)
    def retries(self: Any) -> None:
        raise self.retry(exc=FhirTransientError(f"GET https://fhir.example.org/fhir/{SECRET_REF}: HTTP 503", status=503), countdown=2)

    captured = standard_logging_here(monkeypatch)
    run_in_a_worker_tracer(retries)
    text = captured.getvalue()
    assert "secret-mrn" not in text and "fhir.example.org" not in text, text
    (line,) = [json.loads(x) for x in text.splitlines() if " retry: " in x]
    assert line["event"].endswith("retry: Retry in 2s: FhirTransientError"), line["event"]


def test_an_exception_given_as_an_argument_to_a_celery_line_is_its_type(monkeypatch: pytest.MonkeyPatch) -> None:
    captured = standard_logging_here(monkeypatch)
    logging.getLogger("celery.worker.request").error("Task handler raised error: %r", KeyError(SECRET_REF))
    logging.getLogger("celery.app.trace").info("Task %(name)s[%(id)s] retry: %(exc)s", {"name": "t", "id": "1", "exc": "no repr: " + SECRET_REF})
    logging.getLogger("service.elsewhere").warning("kept as written: %s", "Observation/not-celery")  # only Celery's lines
    lines = [json.loads(x)["event"] for x in captured.getvalue().splitlines()]
    assert lines == ["Task handler raised error: KeyError", "Task t[1] retry: [exception text withheld]", "kept as written: Observation/not-celery"]
