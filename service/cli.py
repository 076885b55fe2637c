"""``calcinosis-cds`` command line (CONTRACT.md "Offline evaluation (CLI)" and the service commands).

Errors are one clear line on stderr with exit status 2; never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from service.inputs import InputError, read_path

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Calciphylaxis and metastatic calcification decision support.")


@app.callback()
def _root() -> None:
    """calcinosis-cds: evaluate offline, serve CDS Hooks, run workers."""
    import os

    # The Prometheus library writes its values to files wherever this names, in every process, from its import on.
    # Only the commands that start several processes set it (_share_metrics), for those processes; a value from
    # the shell would leave files nothing removes, and a missing directory would fail every request.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


class OutputFormat(StrEnum):
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
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 moved across midnight by its offset
        fail(f"--now {value!r} is not an ISO 8601 date-time within years 1-9999 (e.g. 2025-07-01T00:00:00Z)")
        raise  # unreachable


def _load_settings() -> Any:
    """The settings, or one line and exit 2 naming the first invalid one."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from service.config import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])  # empty for a refused combination of settings (the message names them)
        message = first["msg"].removeprefix("Value error, ")
        fail(f"invalid setting {where}: {message}" if where else f"invalid setting: {message}")
        raise  # unreachable
    except SettingsError as exc:  # a complex setting (JSON) that does not parse: its message names the field only
        fail(f"invalid setting: {str(exc).splitlines()[0]}")
        raise  # unreachable


def _load_context() -> tuple[Any, Any, Any]:
    from service.terminology.checks import load_rule_catalog
    from service.terminology.loader import MappingError

    settings = _load_settings()
    try:
        catalog = load_rule_catalog(settings.mappings_dir)
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
    evaluations, groups = evaluate_resources(items, catalog=catalog, thresholds=thresholds, now=when, topic_system=settings.topic_system)
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


def _listener(host: str, port: int, what: str) -> Any:
    """A bound TCP listener (see service.serving), or one line and exit 2 when the port is taken."""
    from service.serving import tcp_listener

    try:
        return tcp_listener(host, port)
    except OSError as exc:
        fail(f"cannot {what} on {host}:{port}: {exc.strerror or exc}")
        raise  # unreachable


def _share_metrics(command: str, port: int) -> Path:
    """The directory through which the processes this command starts share their metrics (see service.metrics):
    under the system temporary directory, one per command and port (so a restart reuses it), emptied first.

    Named in ``PROMETHEUS_MULTIPROC_DIR``, the library's variable, for those processes only (:func:`_root` removes
    any value from the shell)."""
    import os
    import shutil
    import tempfile

    shared = Path(tempfile.gettempdir()) / f"calcinosis-{command}-metrics-{port}"
    try:
        shutil.rmtree(shared, ignore_errors=True)  # a previous run's values (its port is free again: checked before)
        shared.mkdir(mode=0o700)
    except OSError as exc:
        fail(f"cannot create the metrics directory {shared}: {exc.strerror or exc}")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared)
    return shared


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default CDS_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default CDS_PORT)")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes (/metrics sums over them)")] = 1,
) -> None:
    """Run the API (CDS Hooks services, FHIR notification receiver, health and metrics) with uvicorn."""
    import uvicorn

    settings, catalog, thresholds = _load_context()  # checked here: one line and exit 2, not a traceback
    if workers > 1 and not settings.redis_url:  # production refuses to start without it (service.config)
        typer.echo(
            f"calcinosis-cds: warning: {workers} processes without CDS_REDIS_URL each keep their own JWT replay cache: "
            "a token can be replayed once per process (set CDS_REDIS_URL)",
            err=True,
        )
    bind_host, bind_port = host or settings.host, port or settings.port
    # Bound here for any number of processes: a taken port is one line and exit 2, and connections get
    # TCP_NODELAY on the standard asyncio loop too (see service.serving).
    listener = _listener(bind_host, bind_port, "listen")
    options: dict[str, Any] = {"host": bind_host, "port": bind_port, "log_level": "warning", "access_log": False}
    if workers > 1:  # each process builds its own app from the same settings (nothing is built in the supervisor)
        import shutil

        from uvicorn.supervisors import Multiprocess

        shared = _share_metrics("serve", bind_port)
        try:
            Multiprocess(uvicorn.Config("service.main:create_app", factory=True, workers=workers, **options), sockets=[listener]).run()
        finally:
            shutil.rmtree(shared, ignore_errors=True)
        return
    from service.main import create_app

    app = create_app(settings, catalog=catalog, thresholds=thresholds)
    uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[listener])


@app.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head). Safe to run repeatedly."""
    from service.db.migrate import upgrade_to_head

    settings = _load_settings()  # the first pod of a Helm install: one line on a bad setting, not a traceback
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        revision = upgrade_to_head(settings.effective_database_url)
    except Exception as exc:
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
    """Run a Celery worker for the given queues (metrics on CDS_WORKER_METRICS_PORT when set)."""
    settings, _, _ = _load_context()  # settings and mappings checked here: one line and exit 2, not a traceback from Celery
    if settings.worker_metrics_port is not None:
        port = settings.worker_metrics_port
        # A taken port is one line here, not a traceback from the worker after it has started.
        _listener(settings.worker_metrics_host, port, "serve worker metrics").close()
        _share_metrics("worker", port)  # every pool process counts into it; the main process serves the sum
    _exec_celery(["worker", "-Q", queues, "-c", str(concurrency), "-P", pool, "--without-gossip", "--without-mingle", "-l", "INFO"])


@app.command()
def beat() -> None:
    """Run the Celery beat scheduler (sweeper and reconciliation). Run exactly one."""
    settings = _load_settings()  # one line and exit 2 on a bad setting, as for serve and worker (beat reads no mappings)
    schedule = settings.data_dir / "celerybeat-schedule"
    _exec_celery(["beat", "-l", "INFO", "-s", str(schedule)])


def _monitor_context(offline: bool = False) -> Any:
    """Settings, catalog, database and queue for the operator commands (never imports the workers package)."""
    from service.queue import MemoryQueue
    from service.usecases.monitor import MonitorContext

    settings, catalog, thresholds = _load_context()
    return MonitorContext.from_settings(settings, catalog=catalog, thresholds=thresholds, queue=MemoryQueue() if offline else None)


events_app = typer.Typer(help="The inbound event ledger and the RiskAssessment write-backs: counts, failed ones, replay.", invoke_without_command=True)
app.add_typer(events_app, name="events")


@events_app.callback()
def events(
    ctx: typer.Context,
    failed: Annotated[bool, typer.Option("--failed", help="List failed events")] = False,
    limit: Annotated[int, typer.Option(help="Rows to show")] = 50,
) -> None:
    """Show ledger counts by status, or the failed events and failed write-backs (ids and reasons only)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from service.db.repositories import Repositories
    from service.db.session import session_scope

    mctx = _monitor_context(offline=True)
    console = Console(highlight=False)
    if not console.is_terminal:  # piped or `kubectl exec` without -t: full rows, not an 80-column guess
        console = Console(highlight=False, width=250)
    with _database_errors(), session_scope(mctx.sessions) as session:
        repos = Repositories(session)
        if not failed:
            counts = repos.ledger.counts_by_status()
            for status, n in sorted(counts.items()):
                console.print(f"{status:<12} {n}")
            if not counts:
                console.print("no events")
            writebacks = repos.writeback_requests.counts_by_status()
            if any(writebacks.values()):
                console.print("write-backs  " + " ".join(f"{status}={n}" for status, n in sorted(writebacks.items())))
            return
        rows = repos.ledger.list_failed(limit)
        table = Table("id", "kind", "resource", "attempts", "error", "received")
        for e in rows:
            resource = f"{e.resource_type}/{e.resource_id}" if e.resource_type and e.resource_id else (e.subscription or "")
            table.add_row(str(e.id), e.kind, resource, str(e.attempts), e.last_error or "", e.received_at.isoformat())
        console.print(table if rows else "no failed events")
        failed_writebacks = repos.writeback_requests.list_failed(limit)
        title = "failed write-backs (replay: events replay --writeback EVALUATION)"
        writeback_table = Table("evaluation", "patient", "attempts", "sweeper retries", "next retry", "error", "failed", title=title)
        for w in failed_writebacks:
            next_retry = w.next_sweep_at.isoformat() if w.transient else "-"
            error, failed_at = w.last_error or "", w.updated_at.isoformat()
            writeback_table.add_row(str(w.evaluation_id), w.patient_ref, str(w.attempts), str(w.sweeps), next_retry, error, failed_at)
        console.print(writeback_table if failed_writebacks else "no failed write-backs")


@contextmanager
def _database_errors() -> Iterator[None]:
    """An unreachable or unmigrated database as one line and exit 2 (the error type only: it may name the host)."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as exc:
        fail(f"database: {type(exc).__name__} (is it running and migrated? `calcinosis-cds migrate`)")


@events_app.command("replay")
def events_replay(
    ids: Annotated[list[int] | None, typer.Argument(help="Event ids to replay")] = None,
    writeback: Annotated[
        list[int] | None, typer.Option("--writeback", help="Replay the failed write-back of this evaluation (repeatable; ids from events --failed)")
    ] = None,
    all_failed: Annotated[bool, typer.Option("--all", help="Replay every failed event and every failed write-back")] = False,
) -> None:
    """Put failed events back on the queue (they are processed again from the ledger), and failed RiskAssessment
    write-backs (written again from their evaluation)."""
    from service.usecases.monitor import replay_failed, replay_failed_writebacks

    if not ids and not writeback and not all_failed:
        fail("give event ids, --writeback evaluation ids or --all")
    mctx = _monitor_context()
    results = []
    with _database_errors():
        if ids or all_failed:
            results.append(("event", "events are queued in the ledger", replay_failed(mctx, None if all_failed else list(ids or []))))
        if writeback or all_failed:
            results.append(("write-back", "write-backs are pending", replay_failed_writebacks(mctx, None if all_failed else list(writeback or []))))
    for what, _, result in results:
        for item_id, status in result.not_failed.items():
            reason = f"is {status}, not failed" if status else "does not exist"
            subject = f"event {item_id}" if what == "event" else f"write-back of evaluation {item_id}"
            typer.echo(f"calcinosis-cds: {subject} {reason}: not replayed", err=True)
        typer.echo(f"replayed {len(result.replayed)} {what}(s): {' '.join(map(str, result.replayed))}".rstrip(": "))
    for _, where, result in results:
        if result.enqueue_error is not None:
            fail(f"the task queue is unreachable ({result.enqueue_error}): the replayed {where} and the sweeper will send them when the broker is back")
    if any(r.not_failed for _, _, r in results) and not any(r.replayed for _, _, r in results):
        raise typer.Exit(2)


subs_app = typer.Typer(help="FHIR Subscriptions on the monitored server.")
app.add_typer(subs_app, name="subscriptions")


def _endpoint(settings: Any, endpoint: str | None) -> str:
    if endpoint:
        return endpoint
    if settings.public_base_urls:
        return settings.public_base_urls[0].rstrip("/") + "/fhir/notifications"
    fail("give --endpoint or set CDS_PUBLIC_BASE_URLS")
    raise AssertionError


def _channel_header(settings: Any) -> str | None:
    if settings.subscription_secret is None:
        return None
    secret = settings.subscription_secret.get_secret_value()
    if settings.subscription_header.lower() == "authorization":
        return f"Authorization: Bearer {secret}"
    return f"{settings.subscription_header}: {secret}"


@subs_app.command("create")
def subscriptions_create(
    endpoint: Annotated[str | None, typer.Option(help="Receiver URL (default: first CDS_PUBLIC_BASE_URLS + /fhir/notifications)")] = None,
    topic: Annotated[str | None, typer.Option(help="Backport SubscriptionTopic canonical URL (topic-based subscription)")] = None,
    filter_: Annotated[list[str] | None, typer.Option("--filter", help="Backport filter criteria (repeatable)")] = None,
) -> None:
    """Create R4 criteria Subscriptions (default) or one Backport topic-based Subscription, with the channel secret."""
    from service.db.repositories import Repositories
    from service.db.session import session_scope
    from service.fhir.errors import FhirError
    from service.fhir.notifications import subscription_key
    from service.usecases.subscriptions import backport_subscription, r4_subscriptions

    mctx = _monitor_context(offline=True)
    settings = mctx.settings
    if mctx.fhir_client is None:
        fail("set CDS_FHIR_BASE_URL to the FHIR server to subscribe to")
    url = _endpoint(settings, endpoint)
    header = _channel_header(settings)
    if header is None and not settings.dev_mode:
        fail("set CDS_SUBSCRIPTION_SECRET: the receiver refuses unauthenticated notifications")
    resources = (
        [backport_subscription(topic, url, header, settings.heartbeat_timeout_s // 2, filter_)] if topic else r4_subscriptions(mctx.catalog, url, header)
    )
    try:
        client = mctx.shared_client()
        created = [client.create("Subscription", r) for r in resources]
    except FhirError as exc:
        fail(f"FHIR server: {exc}")
    with session_scope(mctx.sessions) as session:
        repos = Repositories(session)
        for sub in created:
            # The key its notifications are recorded under (they name it by its absolute URL: the same key).
            ref = subscription_key(f"Subscription/{sub.get('id')}", settings.fhir_base_url)
            repos.subscriptions.ensure(ref, topic=topic, criteria=sub.get("criteria"), status=sub.get("status"))
            if topic:  # a new topic subscription: its events are numbered from 1, every one of them is ours
                repos.subscriptions.observe_events_since_start(ref, 0)
            typer.echo(f"{ref}\t{sub.get('status')}\t{(sub.get('criteria') or '')[:60]}")


@subs_app.command("list")
def subscriptions_list(endpoint: Annotated[str | None, typer.Option(help="Only those delivering to this URL")] = None) -> None:
    """Subscriptions on the FHIR server (id, status, criteria, endpoint)."""
    from service.fhir.errors import FhirError

    mctx = _monitor_context(offline=True)
    if mctx.fhir_client is None:
        fail("set CDS_FHIR_BASE_URL")
    try:
        subs = list(mctx.shared_client().search("Subscription", []))
    except FhirError as exc:
        fail(f"FHIR server: {exc}")
    for sub in subs:
        channel = sub.get("channel") or {}
        if endpoint and channel.get("endpoint") != endpoint:
            continue
        typer.echo(f"Subscription/{sub.get('id')}\t{sub.get('status')}\t{(sub.get('criteria') or '')[:60]}\t{channel.get('endpoint')}")


@subs_app.command("status")
def subscriptions_status() -> None:
    """What the service knows of each subscription: last event number, last heartbeat, watermark (where every
    type was fetched), each type's own watermark, and how far each type's _history was read (Type/_history=)."""
    from service.db.repositories import Repositories
    from service.db.session import session_scope

    mctx = _monitor_context(offline=True)
    with session_scope(mctx.sessions) as session:
        repo = Repositories(session).subscriptions
        rows = repo.list_all()
        for r in rows:
            marks = repo.type_watermarks(r.subscription)
            history = repo.history_watermarks(r.subscription)
            per_type = "".join(
                f"\t{rtype}={mark.isoformat()}" + (f"\t{rtype}/_history={history[rtype].isoformat()}" if rtype in history else "")
                for rtype, mark in sorted(marks.items())
            )
            typer.echo(
                f"{r.subscription}\tstatus={r.status}\tlast_event={r.last_event_number}\t"
                f"heartbeat={r.last_heartbeat_at.isoformat() if r.last_heartbeat_at else '-'}\t"
                f"watermark={r.watermark.isoformat() if r.watermark else '-'}{per_type}"
            )
        if not rows:
            typer.echo("no subscriptions known")


@app.command()
def backfill(
    paths: Annotated[list[Path] | None, typer.Argument(help="NDJSON/JSON files or directories to load")] = None,
    export: Annotated[bool, typer.Option("--export", help="Bulk Data $export from CDS_FHIR_BASE_URL")] = False,
    group: Annotated[str | None, typer.Option(help="Group id for a group-level $export")] = None,
    patient: Annotated[list[str] | None, typer.Option("--patient", help="Search these patients' resources (repeatable)")] = None,
    evaluate_now: Annotated[bool, typer.Option("--evaluate-now", help="Evaluate in this process instead of queueing")] = False,
) -> None:
    """Load a cohort through the same ledger and per-patient state as notifications, then evaluate it."""
    from itertools import chain

    from service.fhir.errors import FhirError
    from service.usecases.monitor import MONITORED_TYPES, evaluate_patient_state
    from service.usecases.monitor import backfill as run_backfill

    mctx = _monitor_context(offline=evaluate_now)
    sources: list[Any] = []
    try:
        for path in paths or []:
            sources.append(_flat(read_path(path)))
        if export or patient:
            if mctx.fhir_client is None:
                fail("set CDS_FHIR_BASE_URL for --export or --patient")
            client = mctx.shared_client()
            if export:
                sources.append(client.bulk_export(group_id=group, patient_level=group is None, types=list(MONITORED_TYPES)))
            for pid in patient or []:
                sources.append(client.read("Patient", pid) for _ in (0,))
                for rtype in MONITORED_TYPES[1:]:
                    sources.append(client.search(rtype, [("patient", pid)]))
        if not sources:
            fail("give paths, --export or --patient")
        counts = run_backfill(mctx, chain.from_iterable(sources))
    except InputError as exc:
        fail(str(exc))
    except FhirError as exc:
        fail(f"FHIR server: {exc}")
    if evaluate_now:
        from service.queue import TASK_EVALUATE

        pending = [args[0] for name, args, _ in mctx.queue.sent if name == TASK_EVALUATE]
        for patient_ref in pending:
            evaluate_patient_state(mctx, patient_ref)
        counts["evaluated"] = len(pending)
    typer.echo(" ".join(f"{k}={v}" for k, v in counts.items()))


def _flat(items: Any) -> Any:
    from service.cds.grouping import flatten

    for item in items:
        yield from flatten([item], {})


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
