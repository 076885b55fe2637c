"""Benchmark: what one RiskAssessment write-back costs, with and without reading its basis again first.

In one process, against the project's FHIR server double over real HTTP (loopback, ``tests/fakes/fhir_server.py``)
and a database (a temporary SQLite file, or ``--database-url`` for PostgreSQL), the bench evaluates ``--patients``
high-risk patients (ESRD, Ca x P 75, albumin: both flags raised) and times ``write_back`` for each, called as the
worker's task calls it:

  first write, confirm off   every flag PUT (the cost before the basis check existed)
  first write, confirm on    the basis read again (one ``_id`` search per resource type), then every flag PUT
  daily recheck, unchanged   the recheck of an unchanged patient (confirm on): the basis read again, nothing written

It prints, per phase, the wall time per write-back (p50, p95, max), the HTTP requests per write-back, and the
CPU seconds of this process per write-back (the server double runs in threads of the same process, so its CPU is
included; the figures bound the service's own cost from above).

Usage: python bench/writeback.py [--patients 200] [--postgres]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import machine  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from service.config import Settings  # noqa: E402
from service.db.base import Base  # noqa: E402
from service.db.repositories import Repositories  # noqa: E402
from service.db.session import make_engine, make_session_factory, session_scope  # noqa: E402
from service.queue import MemoryQueue  # noqa: E402
from service.terminology.loader import load_catalog  # noqa: E402
from service.usecases import monitor  # noqa: E402
from service.usecases.monitor import MonitorContext  # noqa: E402
from tests import builders as b  # noqa: E402
from tests.fakes.databases import create_postgres_database, drop_postgres_database  # noqa: E402
from tests.fakes.fhir_server import FakeFhirServer  # noqa: E402


def _patient(fhir: FakeFhirServer, ctx: MonitorContext) -> tuple[str, int]:
    pid = f"wb-{uuid.uuid4().hex[:10]}"
    when = (datetime.now(UTC) - timedelta(days=1)).isoformat().replace("+00:00", "Z")
    subject = f"Patient/{pid}"
    resources = [
        b.patient(pid),
        b.condition("46177005", subject=subject, rid=f"c-{pid}"),
        b.obs(b.CA, 10.0, subject=subject, when=when, rid=f"ca-{pid}"),
        b.obs(b.P, 7.5, subject=subject, when=when, rid=f"p-{pid}"),
        b.obs(b.ALB, 4.1, "g/dL", subject=subject, when=when, rid=f"alb-{pid}"),
    ]
    monitor.backfill(ctx, fhir.put_all(resources))
    evaluation_id = monitor.evaluate_patient_state(ctx, subject)
    assert evaluation_id is not None
    return subject, evaluation_id


def _phase(name: str, fhir: FakeFhirServer, runs: list[Callable[[], dict[str, str]]], expect: Callable[[dict[str, str]], bool]) -> dict[str, Any]:
    fhir.clear_requests()
    walls: list[float] = []
    cpu0 = time.process_time()
    for run in runs:
        t0 = time.perf_counter()
        result = run()
        walls.append(time.perf_counter() - t0)
        if not expect(result):
            raise SystemExit(f"{name}: unexpected result {result}")
    cpu = time.process_time() - cpu0
    q = statistics.quantiles(walls, n=100) if len(walls) >= 2 else walls * 99
    return {
        "phase": name,
        "n": len(walls),
        "p50_ms": statistics.median(walls) * 1000,
        "p95_ms": q[94] * 1000,
        "max_ms": max(walls) * 1000,
        "requests": len(fhir.requests) / len(walls),
        "gets": sum(1 for r in fhir.requests if r.method == "GET") / len(walls),
        "cpu_ms": cpu / len(walls) * 1000,
    }


def _run(ctx: MonitorContext, fhir: FakeFhirServer, count: int, *, recheck: bool) -> list[dict[str, Any]]:
    confirm = ctx.settings.writeback_confirm_basis
    patients = [_patient(fhir, ctx) for _ in range(count)]

    def first(evaluation_id: int) -> Callable[[], dict[str, str]]:
        return lambda: monitor.write_back(ctx, evaluation_id)

    def again(subject: str, evaluation_id: int) -> Callable[[], dict[str, str]]:
        def run() -> dict[str, str]:
            with session_scope(ctx.sessions) as session:
                Repositories(session).writeback_requests.reopen(evaluation_id, subject, next_sweep_at=datetime.now(UTC))
            return monitor.write_back(ctx, evaluation_id)

        return run

    rows = [_phase(f"first write, confirm {'on' if confirm else 'off'}", fhir, [first(e) for _, e in patients],
                   lambda r: set(r.values()) == {"written"})]
    if recheck:
        rows.append(_phase("daily recheck, unchanged", fhir, [again(s, e) for s, e in patients], lambda r: set(r.values()) == {"unchanged"}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--postgres", action="store_true", help="run on a fresh PostgreSQL database (CDS_TEST_POSTGRES_URL's server) instead of SQLite")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, FakeFhirServer() as fhir:
        url = create_postgres_database("cds_bench") if args.postgres else f"sqlite:///{tmp}/bench.sqlite"
        engine = make_engine(url, pool_size=2)
        try:
            Base.metadata.create_all(engine)
            sessions: sessionmaker[Session] = make_session_factory(engine)
            catalog = load_catalog(ROOT / "mappings")
            rows: list[dict[str, Any]] = []
            for confirm in (False, True):
                settings = Settings(data_dir=Path(tmp), fhir_base_url=fhir.base_url, fhir_max_retries=0, writeback_enabled=True,
                                    writeback_confirm_basis=confirm)
                ctx = MonitorContext.from_settings(settings, catalog=catalog, sessions=sessions, queue=MemoryQueue())
                rows += _run(ctx, fhir, args.patients, recheck=confirm)
        finally:
            engine.dispose()
            if args.postgres:
                drop_postgres_database(url)

    m = machine()
    print(f"bench/writeback.py: {args.patients} patients, {'PostgreSQL' if args.postgres else 'SQLite'}; {m['cpu']}, {m['nproc']} CPUs, "
          f"Python {m['python']}, load {m['load']}")
    print("| phase | write-backs | p50 ms | p95 ms | max ms | HTTP requests each | of them GET | CPU ms each |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        figures = " | ".join(f"{r[k]:.1f}" for k in ("p50_ms", "p95_ms", "max_ms", "requests", "gets", "cpu_ms"))
        print(f"| {r['phase']} | {r['n']} | {figures} |")


if __name__ == "__main__":
    main()
