"""Benchmark: the monitoring pipeline end to end, on real PostgreSQL and Redis, with real processes.

For each worker count (default 1, 2 and 4) the bench

1. creates a fresh PostgreSQL database, migrates it (``calcinosis-cds migrate``) and flushes its Redis db;
2. starts the API (``calcinosis-cds serve``) and N Celery workers (N separate processes, each
   ``calcinosis-cds worker --concurrency 1``, so each has a consumer process and one pool process);
3. generates ``--patients`` patients, each with a Patient, a Condition (ESRD, CKD 4 or type 2 diabetes) and
   ``--results`` lab Observations (Ca, phosphate, albumin, PTH in panels, recent dates, realistic values);
4. sends every resource as an R4 rest-hook notification with payload (HAPI's ``PUT
   /fhir/notifications/{Type}/{id}``, shared-secret channel header) from ``--clients`` concurrent HTTP
   connections, paced at ``--rate`` notifications/s (0: as fast as the API answers) for the whole run;
5. waits until no patient is dirty, then measures from the database:

   - accepted/s: notifications answered 2xx per second of sending;
   - end-to-end throughput: notifications / (first POST → the stored assessment of the last patient that
     reflects its last notification);
   - latency p50/p95/max: for every notification, from its POST to the first stored evaluation whose
     ``inputs`` contain that resource at that version (``evaluations.created_at``, written just before the
     commit);
   - evaluations per notification (coalescing: a patient's burst of results evaluates once or twice);
   - peak RSS per worker (consumer + pool process, from ``/proc/PID/status`` VmRSS) and of the API;
   - CPU seconds used by the API and by the workers, and the machine's busy CPU over the run.

``--order panels`` (default) delivers each patient's data as bursts (Patient + Condition, then one panel of
3-4 results at a time) interleaved at random across patients, as a dialysis unit's lab feed does;
``--order patient`` delivers each patient's resources back to back (a backfill-like stream).

Usage::

    .venv/bin/python bench/pipeline.py                      # 1, 2 and 4 workers, 1,000 patients x 30 results
    .venv/bin/python bench/pipeline.py --workers 2 --rate 0  # one configuration, unpaced
    .venv/bin/python bench/pipeline.py --patients 100 --results 10 --workers 1   # a quick smoke run

Needs PostgreSQL (``--pg-url``, default ``postgresql://postgres@127.0.0.1:5432/postgres``) and Redis
(``--redis-url``, default ``redis://127.0.0.1:6379/9``: only that db is flushed). Everything is bounded in
time (``--timeout`` per run); the processes and the database are removed at the end, also on failure or
Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import redis
from benchutil import cpu_s, free_port, machine, process_tree, rss_kib
from psycopg import sql
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("calcinosis-cds"))
SECRET = "bench-channel-secret"
REQUEST_TIMEOUT_S = 30.0

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


# ------------------------------------------------------------------------------------------ data


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Notification:
    patient: str  # "Patient/<id>"
    reference: str  # "Type/id" of the delivered resource
    version: str
    path: str  # request path (HAPI form)
    body: bytes


def _observation(oid: str, pid: str, code: str, value: float, unit: str, when: datetime, now: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"versionId": "1", "lastUpdated": _iso(now)},
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": _iso(when),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


def _condition(cid: str, pid: str, code: str, display: str, now: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "meta": {"versionId": "1", "lastUpdated": _iso(now)},
        "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "active"}]},
        "verificationStatus": {"coding": [{"system": VERIFICATION, "code": "confirmed"}]},
        "code": {"coding": [{"system": SNOMED, "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{pid}"},
        "onsetDateTime": _iso(now - timedelta(days=700)),
    }


def generate(patients: int, results: int, seed: int, order: str) -> list[Notification]:
    """The notification stream: each patient's bursts in clinical order, bursts of different patients
    interleaved at random (``panels``) or each patient's resources back to back (``patient``)."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    bursts_by_patient: list[list[list[dict[str, Any]]]] = []
    for i in range(patients):
        pid = f"bench{i:05d}"
        kind = rng.random()
        esrd = kind < 0.45
        if esrd:
            renal = ("46177005", "End-stage renal disease")  # ESRD: on dialysis
        elif kind < 0.65:
            renal = ("431857002", "Chronic kidney disease stage 4")
        else:
            renal = ("44054006", "Diabetes mellitus type 2")
        patient = {
            "resourceType": "Patient",
            "id": pid,
            "meta": {"versionId": "1", "lastUpdated": _iso(now)},
            "gender": rng.choice(["female", "male"]),
            "birthDate": f"{rng.randint(1935, 1995)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        }
        bursts: list[list[dict[str, Any]]] = [[patient, _condition(f"{pid}-c1", pid, renal[0], renal[1], now)]]
        # Panels of Ca, P, albumin (+ PTH every other panel), oldest first, within the last ~80 days.
        n, panel = 0, 0
        while n < results:
            when = now - timedelta(days=80 - panel * 10, hours=rng.random() * 6)
            tests: list[tuple[str, float, str]] = [
                ("17861-6", round(rng.gauss(9.4 if esrd else 9.2, 0.7), 1), "mg/dL"),  # calcium
                ("2777-1", round(max(1.5, rng.gauss(6.2 if esrd else 4.2, 1.4)), 1), "mg/dL"),  # phosphate
                ("1751-7", round(min(5.0, max(2.0, rng.gauss(3.6, 0.4))), 1), "g/dL"),  # albumin
            ]
            if panel % 2 == 0:
                tests.append(("2731-8", round(max(10.0, rng.gauss(520 if esrd else 140, 220 if esrd else 50))), "pg/mL"))  # PTH
            burst = []
            for code, value, unit in tests[: results - n]:
                n += 1
                burst.append(_observation(f"{pid}-o{n}", pid, code, value, unit, when, now))
            bursts.append(burst)
            panel += 1
        bursts_by_patient.append(bursts)

    order_of_bursts: list[list[dict[str, Any]]] = []
    if order == "patient":
        for bursts in bursts_by_patient:
            order_of_bursts.extend(bursts)
    else:  # a uniformly random interleaving that keeps each patient's own order
        slots = [i for i, bursts in enumerate(bursts_by_patient) for _ in bursts]
        rng.shuffle(slots)
        cursor = [0] * patients
        for i in slots:
            order_of_bursts.append(bursts_by_patient[i][cursor[i]])
            cursor[i] += 1
    out: list[Notification] = []
    for burst in order_of_bursts:
        for resource in burst:
            ref = f"{resource['resourceType']}/{resource['id']}"
            patient_ref = ref if resource["resourceType"] == "Patient" else resource["subject"]["reference"]
            out.append(Notification(patient_ref, ref, resource["meta"]["versionId"], f"/fhir/notifications/{ref}", orjson.dumps(resource)))
    return out


# --------------------------------------------------------------------------------- HTTP load


@dataclass
class Sent:
    scheduled: float = 0.0
    sent: float = 0.0
    answered: float = 0.0
    status: int = 0


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes) -> int:
    writer.write(head + body)
    await writer.drain()
    header = await reader.readuntil(b"\r\n\r\n")
    lines = header.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def _load(port: int, items: list[Notification], rate: float, clients: int, deadline: float) -> list[Sent]:
    """Send every notification from ``clients`` keep-alive connections (a minimal HTTP/1.1 client, so the
    load generator takes little of the machine's CPU), paced at ``rate``/s (0: unpaced)."""
    records = [Sent() for _ in items]
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    heads = [
        (
            f"PUT {n.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/fhir+json\r\n"
            f"Authorization: Bearer {SECRET}\r\nContent-Length: {len(n.body)}\r\n\r\n"
        ).encode()
        for n in items
    ]

    async def producer() -> None:
        start = time.time()
        for i in range(len(items)):
            if rate > 0:
                due = start + i / rate
                delay = due - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                records[i].scheduled = due
            else:
                records[i].scheduled = start
            queue.put_nowait(i)
        for _ in range(clients):
            queue.put_nowait(None)

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (i := await queue.get()) is not None:
                if time.time() > deadline:
                    continue
                rec = records[i]
                rec.sent = time.time()
                for attempt in range(5):  # 5xx: the FHIR server would retry; so do we
                    try:
                        rec.status = await asyncio.wait_for(_request(reader, writer, heads[i], items[i].body), REQUEST_TIMEOUT_S)
                    except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                        writer.close()
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                        rec.status = 0
                    if 200 <= rec.status < 300:
                        break
                    await asyncio.sleep(0.05 * (attempt + 1))
                rec.answered = time.time()
        finally:
            writer.close()

    await asyncio.gather(producer(), *(client() for _ in range(clients)))
    return records


# ------------------------------------------------------------------------------- processes


def _cpu_by_command(names: tuple[str, ...]) -> dict[int, float]:
    """CPU seconds so far of every process whose command name is one of ``names`` (PostgreSQL, Redis)."""
    out: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as fh:
                comm = fh.read().strip()
        except OSError:
            continue
        if comm in names:
            out[int(entry)] = cpu_s(int(entry))
    return out


def _cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def _machine_busy() -> tuple[float, float]:
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


class Sampler(threading.Thread):
    """Peak RSS per process tree and CPU seconds per process, every ``interval`` seconds."""

    def __init__(self, roots: dict[str, int], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.peak_kib: dict[str, int] = {name: 0 for name in roots}
        self.cpu: dict[int, float] = {}
        self.members: dict[str, set[int]] = {name: set() for name in roots}
        self._stop_event = threading.Event()

    def sample(self) -> None:
        for name, root in self.roots.items():
            pids = process_tree(root)
            self.members[name].update(pids)
            self.peak_kib[name] = max(self.peak_kib[name], sum(rss_kib(p) for p in pids))
            for p in pids:
                self.cpu[p] = max(self.cpu.get(p, 0.0), cpu_s(p))

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self.sample()

    def cpu_of(self, prefix: str) -> float:
        return sum(self.cpu.get(p, 0.0) for name, pids in self.members.items() if name.startswith(prefix) for p in pids)


def _start_profilers(directory: Path, workers: int, roots: dict[str, int]) -> list[subprocess.Popen[bytes]]:
    """py-spy (``pip install py-spy``) on the API and on each worker's pool processes, until the run ends."""
    directory.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).with_name("py-spy"))
    targets = [("api", roots["api"])]
    for w in range(workers):
        targets.extend((f"worker{w}-{pid}", pid) for pid in process_tree(roots[f"worker{w}"]))
    procs = []
    for name, pid in targets:
        out = directory / f"{name}-w{workers}.txt"
        procs.append(subprocess.Popen([spy, "record", "-p", str(pid), "-r", "100", "--gil", "-f", "raw", "-o", str(out), "--nonblocking"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


@dataclass
class Stack:
    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([CLI, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log_text(self, name: str) -> str:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        end = time.time() + 10
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, end - time.time()))
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _wait_for(what: str, check: Any, timeout: float, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if check():
            return
        dead = [name for name, p in procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}")
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def _http_ok(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


# ---------------------------------------------------------------------------------- database


def _libpq(url: str, database: str | None = None) -> str:
    u = make_url(url)
    parts = [f"host={u.host or '127.0.0.1'}", f"port={u.port or 5432}", f"user={u.username or 'postgres'}",
             f"dbname={database or u.database or 'postgres'}", "connect_timeout=5"]
    if u.password:
        parts.append(f"password={u.password}")
    return " ".join(parts)


def _sqlalchemy_url(url: str, database: str) -> str:
    return make_url(url).set(drivername="postgresql+psycopg", database=database).render_as_string(hide_password=False)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ------------------------------------------------------------------------------------ one run


def run_once(args: argparse.Namespace, workers: int, items: list[Notification]) -> dict[str, Any]:
    dbname = f"cds_bench_{os.getpid()}_{workers}"
    admin = _libpq(args.pg_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    broker = redis.Redis.from_url(args.redis_url)
    broker.flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="cds-bench-"))
    port = free_port()
    env = {
        **os.environ,
        "CDS_DATABASE_URL": _sqlalchemy_url(args.pg_url, dbname),
        "CDS_BROKER_URL": args.redis_url,
        "CDS_DATA_DIR": str(tmp),
        "CDS_PORT": str(port),
        "CDS_HOST": "127.0.0.1",
        "CDS_SUBSCRIPTION_SECRET": SECRET,
        "CDS_LOG_LEVEL": args.log_level,
        "CDS_DB_POOL_SIZE": str(args.pool_size),
        "PYTHONUNBUFFERED": "1",
    }
    if args.coalesce_window is not None:
        env["CDS_COALESCE_WINDOW_S"] = str(args.coalesce_window)
    stack = Stack(env=env, logs=tmp)
    result: dict[str, Any] = {"workers": workers, "notifications": len(items)}
    try:
        migrate = subprocess.run([CLI, "migrate"], env=env, capture_output=True, timeout=120)
        if migrate.returncode != 0:
            raise RuntimeError(f"migrate failed: {migrate.stderr.decode(errors='replace')[-500:]}")
        serve_args = ["serve", "--port", str(port)]
        if args.api_workers > 1:
            serve_args += ["--workers", str(args.api_workers)]
        api = stack.start("api", serve_args)
        for w in range(workers):
            stack.start(f"worker{w}", ["worker", "--concurrency", "1", "--pool", args.pool])
        _wait_for("the API", lambda: _http_ok(port, "/healthz"), 60, stack.procs)
        _wait_for(
            "the workers",
            lambda: all(" ready." in stack.log_text(f"worker{w}") for w in range(workers)),
            90,
            stack.procs,
        )
        roots = {"api": api.pid, **{f"worker{w}": stack.procs[f"worker{w}"].pid for w in range(workers)}}
        sampler = Sampler(roots)
        sampler.sample()
        cpu_before = {"api": sampler.cpu_of("api"), "worker": sampler.cpu_of("worker")}
        pg0, redis0, self0 = _cpu_by_command(("postgres",)), _cpu_by_command(("redis-server",)), sum(os.times()[:2])
        busy0, total0 = _machine_busy()
        sampler.start()
        profilers = _start_profilers(args.profile, workers, roots) if args.profile else []

        deadline = time.time() + args.timeout
        t_start = time.time()
        records = asyncio.run(_load(port, items, args.rate, args.clients, deadline))
        t_sent = time.time()
        ok = sum(1 for r in records if 200 <= r.status < 300)

        # Wait for the pipeline to drain: every notification answered and no patient dirty.
        with psycopg.connect(_libpq(args.pg_url, dbname), autocommit=True) as conn:
            while time.time() < deadline:
                dirty = conn.execute("SELECT count(*) FROM patient_evaluation_queue WHERE dirty_since IS NOT NULL").fetchone()
                if dirty is not None and dirty[0] == 0:
                    break
                time.sleep(0.2)
            drained = time.time() < deadline
            rows = conn.execute("SELECT patient_ref, created_at, inputs FROM evaluations").fetchall()
            ledger = conn.execute("SELECT count(*) FROM inbound_events").fetchone()
        t_drained = time.time()
        sampler.stop()
        busy1, total1 = _machine_busy()
        cpu_pg = _cpu_delta(pg0, _cpu_by_command(("postgres",)))
        cpu_redis = _cpu_delta(redis0, _cpu_by_command(("redis-server",)))
        cpu_self = sum(os.times()[:2]) - self0
        for prof in profilers:
            with contextlib.suppress(ProcessLookupError):
                prof.send_signal(signal.SIGINT)
        for prof in profilers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                prof.wait(30)

        # The first stored evaluation that includes each resource at its version.
        first_seen: dict[tuple[str, str | None], float] = {}
        for _, created_at, inputs in sorted(rows, key=lambda r: r[1]):
            stamp = created_at.timestamp()
            for item in inputs:
                first_seen.setdefault((item["reference"], item.get("version")), stamp)
        latencies: list[float] = []
        missing = 0
        last_by_patient: dict[str, float] = {}
        for n, rec in zip(items, records, strict=True):
            seen = first_seen.get((n.reference, n.version))
            if seen is None or not (200 <= rec.status < 300):
                missing += 1
                continue
            latencies.append(max(0.0, seen - rec.sent))
            last_by_patient[n.patient] = max(last_by_patient.get(n.patient, 0.0), seen)
        first_post = min((r.sent for r in records if r.sent), default=t_start)
        last_answer = max((r.answered for r in records), default=t_sent)
        last_assessment = max(last_by_patient.values(), default=t_drained)
        lag = [max(0.0, r.sent - r.scheduled) for r in records if r.sent]
        result.update(
            accepted=ok,
            ledger_rows=ledger[0] if ledger else 0,
            drained=drained,
            send_s=last_answer - first_post,
            accepted_per_s=ok / max(last_answer - first_post, 1e-9),
            e2e_s=last_assessment - first_post,
            e2e_per_s=ok / max(last_assessment - first_post, 1e-9),
            p50_s=_percentile(latencies, 0.50),
            p95_s=_percentile(latencies, 0.95),
            max_s=max(latencies, default=float("nan")),
            not_in_any_evaluation=missing,
            evaluations=len(rows),
            evaluations_per_notification=len(rows) / max(ok, 1),
            client_lag_p95_s=_percentile(lag, 0.95),
            http_p95_ms=_percentile([(r.answered - r.sent) * 1000 for r in records if r.sent], 0.95),
            rss_worker_mib=[sampler.peak_kib[f"worker{w}"] / 1024 for w in range(workers)],
            rss_api_mib=sampler.peak_kib["api"] / 1024,
            cpu_api_s=sampler.cpu_of("api") - cpu_before["api"],
            cpu_workers_s=sampler.cpu_of("worker") - cpu_before["worker"],
            cpu_postgres_s=cpu_pg,
            cpu_redis_s=cpu_redis,
            cpu_load_generator_s=cpu_self,
            cpu_machine_busy_s=busy1 - busy0,
            cpu_machine_total_s=total1 - total0,
        )
        result["cpu_other_processes_s"] = result["cpu_machine_busy_s"] - (
            result["cpu_api_s"] + result["cpu_workers_s"] + cpu_pg + cpu_redis + cpu_self
        )
        failures = [name for name in stack.procs if "Traceback" in stack.log_text(name)]
        if failures:
            result["tracebacks_in_logs"] = failures
    finally:
        stack.stop()
        if args.keep:
            print(f"kept logs in {tmp} and database {dbname}", file=sys.stderr)
        else:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
        broker.flushdb()
        broker.close()
    return result


def _table(results: list[dict[str, Any]]) -> str:
    head = (
        "| worker processes | notifications | accepted/s | end-to-end/s | latency p50 | latency p95 | max | POST p95 | "
        "evaluations (per notification) | peak RSS per worker | API RSS | CPU s: API / workers / PostgreSQL / other / machine busy |"
    )
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['workers']} | error: {r['error']} |" + " |" * 10)
            continue
        rss = ", ".join(f"{m:.0f}" for m in r["rss_worker_mib"])
        lines.append(
            f"| {r['workers']} | {r['accepted']:,}{'' if r['drained'] else ' (not drained)'} | {r['accepted_per_s']:.0f} | "
            f"{r['e2e_per_s']:.0f} | {r['p50_s']:.2f} s | {r['p95_s']:.2f} s | {r['max_s']:.2f} s | {r['http_p95_ms']:.0f} ms | "
            f"{r['evaluations']:,} ({r['evaluations_per_notification']:.3f}) | {rss} MiB | {r['rss_api_mib']:.0f} MiB | "
            f"{r['cpu_api_s']:.0f} / {r['cpu_workers_s']:.0f} / {r['cpu_postgres_s']:.0f} / {r['cpu_other_processes_s']:.0f} / "
            f"{r['cpu_machine_busy_s']:.0f} of {r['cpu_machine_total_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker process counts (default 1,2,4)")
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--results", type=int, default=30, help="lab results per patient")
    parser.add_argument("--rate", type=float, default=500.0, help="offered notifications/s (0: as fast as answered)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP connections")
    parser.add_argument("--order", choices=["panels", "patient"], default="panels")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run (sending and draining)")
    parser.add_argument("--pool", choices=["prefork", "solo"], default="prefork", help="Celery pool of each worker process")
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn processes of the API")
    parser.add_argument("--pool-size", type=int, default=5, help="CDS_DB_POOL_SIZE")
    parser.add_argument("--coalesce-window", type=float, default=None, help="CDS_COALESCE_WINDOW_S (default: the setting's)")
    parser.add_argument("--log-level", default="INFO", help="CDS_LOG_LEVEL of API and workers")
    parser.add_argument("--pg-url", default=os.environ.get("CDS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--redis-url", default=os.environ.get("CDS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"))
    parser.add_argument("--seed", type=int, default=20250701)
    parser.add_argument("--keep", action="store_true", help="keep the database and the logs")
    parser.add_argument("--profile", type=Path, help="record py-spy profiles (raw, collapsed stacks) of API and workers here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    items = generate(args.patients, args.results, args.seed, args.order)
    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, {info['os']}")
    print(
        f"load: {args.patients:,} patients x ({args.results} results + Patient + Condition) = {len(items):,} notifications, "
        f"order={args.order}, rate={'unpaced' if args.rate <= 0 else f'{args.rate:.0f}/s'}, {args.clients} HTTP connections, "
        f"pool={args.pool}, API processes={args.api_workers}"
    )
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results = []
    for n in counts:
        try:
            r = run_once(args, n, items)
        except (RuntimeError, TimeoutError, OSError, psycopg.Error, redis.RedisError) as exc:
            r = {"workers": n, "error": f"{type(exc).__name__}: {exc}"}
        results.append(r)
        print(json.dumps(r, default=str), file=sys.stderr)
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
