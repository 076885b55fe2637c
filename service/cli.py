"""``calcinosis-cds`` command line (CONTRACT.md "Offline evaluation (CLI)" and the service commands).

Errors are one clear line on stderr with exit status 2; never a traceback.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from service.inputs import InputError, read_path

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Calciphylaxis and metastatic calcification decision support.")


@app.callback()
def _root() -> None:
    """calcinosis-cds: evaluate offline, serve CDS Hooks, run workers."""


class OutputFormat(str, Enum):
    text = "text"
    json = "json"
    cards = "cards"
    fhir = "fhir"


def fail(message: str) -> None:
    """One line on stderr, exit 2."""
    typer.echo(f"calcinosis-cds: error: {message}", err=True)
    raise typer.Exit(2)


def parse_now(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--now {value!r} is not an ISO 8601 date-time (e.g. 2025-07-01T00:00:00Z)")
        raise  # unreachable
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _load_context() -> tuple[Any, Any, Any]:
    from pydantic import ValidationError

    from service.config import get_settings
    from service.terminology.loader import MappingError, load_catalog

    try:
        settings = get_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"invalid setting {'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    try:
        catalog = load_catalog(settings.mappings_dir)
        from service.terminology.checks import check_catalog_for_rules

        check_catalog_for_rules(catalog)
        thresholds = settings.effective_thresholds()
    except MappingError as exc:
        fail(f"mappings: {exc}")
    except (OSError, ValueError) as exc:
        fail(f"thresholds: {type(exc).__name__}: {exc}".splitlines()[0])
    return settings, catalog, thresholds


@app.command()
def evaluate(
    paths: Annotated[list[Path], typer.Argument(help="FHIR R4 JSON resources or Bundles, NDJSON files, or directories")],
    now: Annotated[str | None, typer.Option("--now", help="Evaluation time (ISO 8601); default: now")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="text | json | cards | fhir")] = OutputFormat.text,
) -> None:
    """Evaluate patients offline and print assessments, cards or RiskAssessments."""
    from service.cds.engine import evaluate_resources

    when = parse_now(now)
    settings, catalog, thresholds = _load_context()
    items: list[dict[str, Any]] = []
    try:
        for path in paths:
            items.extend(read_path(path))
    except InputError as exc:
        fail(str(exc))
    evaluations, groups = evaluate_resources(
        items, catalog=catalog, thresholds=thresholds, now=when, topic_system=settings.topic_system
    )
    for excluded in groups.unattributed:
        typer.echo(f"calcinosis-cds: warning: {excluded.reference}: {excluded.reason}", err=True)
    if not evaluations:
        typer.echo("calcinosis-cds: warning: no patient found in the input", err=True)
    out = sys.stdout.buffer
    if fmt is OutputFormat.json:
        out.write(orjson.dumps([e.assessment.model_dump(mode="json") for e in evaluations], option=orjson.OPT_INDENT_2))
    elif fmt is OutputFormat.cards:
        out.write(orjson.dumps([{"cards": e.assessment.cards} for e in evaluations], option=orjson.OPT_INDENT_2))
    elif fmt is OutputFormat.fhir:
        from service.cds.fhirutil import iso

        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "timestamp": iso(when),
            "entry": [{"resource": r} for e in evaluations for r in e.risk_assessments],
        }
        if not bundle["entry"]:
            del bundle["entry"]
        out.write(orjson.dumps(bundle, option=orjson.OPT_INDENT_2))
    else:
        from service.textreport import print_report

        print_report(evaluations)
        return
    out.write(b"\n")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default CDS_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default CDS_PORT)")] = None,
) -> None:
    """Run the API (CDS Hooks services, FHIR notification receiver, health and metrics) with uvicorn."""
    import uvicorn
    from pydantic import ValidationError

    from service.config import get_settings
    from service.terminology.loader import MappingError

    try:
        settings = get_settings()
        from service.main import create_app

        application = create_app(settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"invalid setting {'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    except MappingError as exc:
        fail(f"mappings: {exc}")
    uvicorn.run(application, host=host or settings.host, port=port or settings.port, log_level="warning", access_log=False)


@app.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head). Safe to run repeatedly."""
    from service.config import get_settings
    from service.db.migrate import upgrade_to_head

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        revision = upgrade_to_head(settings.effective_database_url)
    except Exception as exc:  # noqa: BLE001 - one line, no traceback, for operators
        fail(f"migration failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    typer.echo(f"database at revision {revision}")


def _exec_celery(args: list[str]) -> None:
    """Replace this process with Celery's own CLI (the service package never imports the workers package)."""
    import os

    os.execvp(sys.executable, [sys.executable, "-m", "celery", "-A", "workers.celery_app", *args])


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues")] = "ingest,evaluate,writeback",
    concurrency: Annotated[int, typer.Option(help="Worker processes")] = 1,
    pool: Annotated[str, typer.Option(help="prefork | solo | threads")] = "prefork",
) -> None:
    """Run a Celery worker for the given queues."""
    _exec_celery(["worker", "-Q", queues, "-c", str(concurrency), "-P", pool, "--without-gossip", "--without-mingle", "-l", "INFO"])


@app.command()
def beat() -> None:
    """Run the Celery beat scheduler (sweeper and reconciliation). Run exactly one."""
    from service.config import get_settings

    schedule = get_settings().data_dir / "celerybeat-schedule"
    _exec_celery(["beat", "-l", "INFO", "-s", str(schedule)])


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
