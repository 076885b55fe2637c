"""Structured JSON logs (structlog) with request/task correlation ids. Ids and timings only: no patient data."""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import structlog

_configured = False
_FRAMES = 8  # of an exception's traceback, the innermost


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written, not when logging was configured: a stream swapped later
    (a test runner capturing output, then closing it) never leaves logging writing to a closed file."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "INFO", json: bool = True) -> None:
    global _configured
    if _configured:
        return
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    stamped: list[Any] = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True)]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    _route_standard_logging(numeric_level, stamped, renderer)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *stamped, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str = "calcinosis-cds") -> Any:
    return structlog.get_logger(name)


def exception_frames(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A record's exception (a Celery task that raised, a library's error) as its type and where it was raised, the
    last frames first: never its message or locals, which may hold patient data or a credential."""
    exc_info = event.pop("exc_info", None)
    if exc_info and isinstance(exc_info, tuple) and exc_info[0] is not None:
        kind, _value, tb = exc_info
        frames = traceback.extract_tb(tb)[-_FRAMES:]
        event["exception"] = kind.__name__
        event["raised_at"] = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)]
    return event


_RETRY = re.compile(r"(Retry (?:in|at) .+?): (.*)\Z", re.DOTALL)  # celery.exceptions.Retry: "Retry in 3s: Kind('text')"
_REPR = re.compile(r"([A-Za-z_][\w.]*)\(")  # an exception's repr: "Kind('text', ...)"
_WITHHELD = "[exception text withheld]"


class _Kind(str):
    """An exception's type name, the same under ``%s`` and ``%r``."""

    def __repr__(self) -> str:
        return str(self)


def _kind_of(value: Any, exc_info: Any) -> Any:
    """An exception, or the text Celery made of one, as the exception's type name."""
    if isinstance(value, BaseException):
        return type(value).__name__
    if not isinstance(value, str):
        return value
    retry = _RETRY.match(value)
    if retry:
        return f"{retry[1]}: {_kind_of(retry[2], None)}"
    kind = _REPR.match(value)
    if kind:
        return kind[1].rsplit(".", 1)[-1]
    if exc_info and isinstance(exc_info, tuple) and exc_info[0] is not None:
        return exc_info[0].__name__
    return _WITHHELD


class CeleryExceptionText(logging.Filter):
    """Celery formats an exception's text into its own lines ("Task … raised unexpected: OperationalError('…host…
    port…')", "Task … retry: Retry in 3s: FhirTransientError('GET …/Observation/123 …')", "Task handler raised error:
    %r"): on its loggers, the exception in the line's arguments becomes its type name, as ``exception_frames`` does
    for the attached exception. The text may hold a FHIR reference (patient data) or a database host."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("celery") and record.args:
            if isinstance(record.args, Mapping):  # the trace's lines: one dict of fields, the exception under "exc"
                if "exc" in record.args:
                    record.args = {**record.args, "exc": _kind_of(record.args["exc"], record.exc_info)}
            else:
                record.args = tuple(_Kind(type(a).__name__) if isinstance(a, BaseException) else a for a in record.args)
        return True


def _route_standard_logging(level: int, stamped: list[Any], renderer: Any) -> None:
    """Lines of the standard ``logging`` module (this service's few, its libraries' and, in worker and beat
    processes, Celery's and its prefork pool's) in the same format, one object per line. HTTP clients log every request URL at INFO:
    only their warnings are kept."""
    handler = logging.StreamHandler(_Stderr())
    handler.addFilter(CeleryExceptionText())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*stamped, exception_frames],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # The prefork pool's supervisor (billiard) logs on a logger of its own that does not propagate ("Process
    # 'ForkPoolWorker-1' pid:… exited with 'signal 15 (SIGTERM)'"): without a handler of its own, Python's last-resort
    # handler wrote those lines as plain text between the JSON ones
    pool = logging.getLogger("multiprocessing")
    pool.handlers = [handler]
    pool.setLevel(max(level, logging.WARNING))  # its INFO lines ("child process … calling self.run()") are noise
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
