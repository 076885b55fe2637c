"""Log lines go to the standard error of the moment, even when it was swapped after logging was configured."""

from __future__ import annotations

import io
import json
import logging
import sys

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
    util.error("Process %r pid:%r exited with %r", "ForkPoolWorker-1", 4242, "signal 15 (SIGTERM)", exc_info=0)
    (line,) = captured.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "Process 'ForkPoolWorker-1' pid:4242 exited with 'signal 15 (SIGTERM)'"
    assert record["level"] == "error"
