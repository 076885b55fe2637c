"""Benchmark: CDS Hooks patient-view latency over real HTTP, against the service in its own process.

Starts ``python -m service serve`` (uvicorn, one process unless ``--server-workers``, development mode, a temporary data directory,
``CDS_BENCH_FLOOR_ROUTE=1``) and, for the fallback scenario, a minimal FHIR server in another process.
Then, for each scenario and concurrency level, sends warm-up requests followed by measured ones
(asyncio + aiohttp, or httpx with ``--client httpx``; one keep-alive connection per concurrent caller) and prints
req/s, p50/p95/p99 and the CPU per request of the service and of the client.

Scenarios (same patient, a dialysis patient with one year of records, ~200 resources, dated relative to now):
  full      every prefetch key filled in the request body
  fallback  no prefetch: the service fetches every key from the FHIR server (fhirServer + fhirAuthorization)
  floor     POST /bench/floor of the same app with the full-prefetch body: reads the body, returns a fixed card

Targets: p95(full) / p95(floor) <= 3 at concurrency 8; p95(fallback) well under 500 ms.

Usage: python bench/cds_hooks.py [--requests 400] [--rounds 3] [--warmup 50] [--concurrency 1,8,32] [--server-workers 1]
                                 [--scenarios full,fallback,floor] [--client aiohttp|httpx] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import httpx
import orjson
from benchutil import free_port, machine, process_tree_cpu

ROOT = Path(__file__).resolve().parents[1]
SECTION = "CDS Hooks latency (bench/cds_hooks.py)"
PATIENT_ID = "bench-dialysis-1"
FHIR_TOKEN = "bench-access-token"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"


# --- the patient --------------------------------------------------------------------------------
class PatientRecord:
    """One dialysis patient's year, by resource type; every date relative to ``now``."""

    def __init__(self, pid: str, now: datetime) -> None:
        self.pid = pid
        self.now = now
        self._n = 0
        self.patient = {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1956-09-12"}
        self.observations = self._observations()
        self.conditions = self._conditions()
        self.medication_requests = self._medication_requests()
        self.medication_statements = self._medication_statements()
        self.medication_administrations = self._medication_administrations()
        self.procedures = self._procedures()

    # helpers
    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n}"

    def _at(self, days: float) -> str:
        return (self.now - timedelta(days=days)).isoformat(timespec="seconds").replace("+00:00", "Z")

    def _subject(self) -> dict[str, str]:
        return {"reference": f"Patient/{self.pid}"}

    def _obs(self, code: str, display: str, value: float, unit: str, days: float) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": self._id("obs"),
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
            "subject": self._subject(),
            "effectiveDateTime": self._at(days),
            "issued": self._at(days - 0.2),
            "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
        }

    def _observations(self) -> list[dict[str, Any]]:
        out = []
        for month in range(12):  # monthly dialysis labs, the latest 3 days ago
            days = 3 + 30 * month
            out.append(self._obs("17861-6", "Calcium [Mass/volume] in Serum or Plasma", round(9.4 - 0.05 * month, 1), "mg/dL", days))
            out.append(self._obs("2777-1", "Phosphate [Mass/volume] in Serum or Plasma", round(7.5 - 0.15 * month, 1), "mg/dL", days))
            out.append(self._obs("1751-7", "Albumin [Mass/volume] in Serum or Plasma", round(2.8 + 0.04 * month, 2), "g/dL", days))
            out.append(self._obs("33914-3", "eGFR (MDRD)", round(8.5 + 0.2 * month, 1), "mL/min/{1.73_m2}", days))
            out.append(self._obs("6768-6", "Alkaline phosphatase [Enzymatic activity/volume]", 140 - 2 * month, "U/L", days))
            out.append(self._obs("39156-5", "Body mass index", round(31.4 - 0.1 * month, 1), "kg/m2", days))
        for quarter in range(4):  # quarterly intact PTH
            out.append(self._obs("2731-8", "Parathyrin.intact [Mass/volume]", 640 - 40 * quarter, "pg/mL", 3 + 91 * quarter))
        for week in range(52):  # pre-dialysis weight
            out.append(self._obs("29463-7", "Body weight", round(86.0 - 0.03 * week, 1), "kg", 1 + 7 * week))
        return out

    def _condition(self, code: str, display: str, onset_days: float) -> dict[str, Any]:
        return {
            "resourceType": "Condition",
            "id": self._id("cond"),
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}]}],
            "code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
            "subject": self._subject(),
            "onsetDateTime": self._at(onset_days),
            "recordedDate": self._at(onset_days),
        }

    def _conditions(self) -> list[dict[str, Any]]:
        return [
            self._condition("46177005", "End-stage renal disease", 1400),
            self._condition("105502003", "Dependence on renal dialysis", 1390),
            self._condition("91478007", "Secondary hyperparathyroidism", 1100),
            self._condition("38341003", "Hypertensive disorder", 4000),
            self._condition("44054006", "Diabetes mellitus type 2", 5000),
            self._condition("707323002", "Anemia in chronic kidney disease", 1200),
            self._condition("49436004", "Atrial fibrillation", 500),
            self._condition("414916001", "Obesity", 3000),
        ]

    def _med_request(self, code: str, display: str, days: float, status: str) -> dict[str, Any]:
        return {
            "resourceType": "MedicationRequest",
            "id": self._id("mr"),
            "status": status,
            "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code, "display": display}], "text": display},
            "subject": self._subject(),
            "authoredOn": self._at(days),
            "dosageInstruction": [{"text": "as directed", "route": {"coding": [{"system": SNOMED, "code": "26643006", "display": "Oral route"}]}}],
        }

    def _medication_requests(self) -> list[dict[str, Any]]:
        out = []
        for i in range(6):  # monthly warfarin renewals, the latest active
            out.append(self._med_request("855332", "warfarin sodium 5 MG Oral Tablet", 10 + 30 * i, "active" if i == 0 else "completed"))
        for i in range(4):
            out.append(self._med_request("749206", "sevelamer carbonate 800 MG Oral Tablet", 20 + 91 * i, "active" if i == 0 else "completed"))
        for i in range(2):
            out.append(self._med_request("197433", "calcium acetate Oral Tablet", 300 + 30 * i, "stopped"))
        for i in range(3):
            out.append(self._med_request("1894", "calcitriol", 25 + 120 * i, "active" if i == 0 else "completed"))
        for i in range(3):
            out.append(self._med_request("407990", "cinacalcet", 30 + 120 * i, "active" if i == 0 else "completed"))
        for i in range(2):
            out.append(self._med_request("105694", "epoetin alfa", 15 + 180 * i, "active" if i == 0 else "completed"))
        return out

    def _medication_statements(self) -> list[dict[str, Any]]:
        out = []
        for code, display, status in [
            ("2418", "cholecalciferol", "completed"),
            ("17767", "amlodipine", "active"),
            ("6918", "metoprolol", "active"),
            ("83367", "atorvastatin", "active"),
            ("1191", "aspirin", "stopped"),
            ("274783", "insulin glargine", "active"),
        ]:
            out.append(
                {
                    "resourceType": "MedicationStatement",
                    "id": self._id("ms"),
                    "status": status,
                    "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code, "display": display}], "text": display},
                    "subject": self._subject(),
                    "effectivePeriod": {"start": self._at(700)},
                }
            )
        return out

    def _medication_administrations(self) -> list[dict[str, Any]]:
        return [
            {
                "resourceType": "MedicationAdministration",
                "id": self._id("ma"),
                "status": "completed",
                "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "24909", "display": "iron sucrose"}], "text": "iron sucrose"},
                "subject": self._subject(),
                "effectiveDateTime": self._at(2 + 14 * i),
                "dosage": {
                    "route": {"coding": [{"system": SNOMED, "code": "47625008", "display": "Intravenous route"}]},
                    "dose": {"value": 100, "unit": "mg", "system": UCUM, "code": "mg"},
                },
            }
            for i in range(26)
        ]

    def _procedures(self) -> list[dict[str, Any]]:
        return [
            {
                "resourceType": "Procedure",
                "id": self._id("proc"),
                "status": "completed",
                "code": {"coding": [{"system": SNOMED, "code": "302497006", "display": "Hemodialysis"}], "text": "Hemodialysis"},
                "subject": self._subject(),
                "performedDateTime": self._at(1 + 30 * i),
            }
            for i in range(12)
        ]

    # views
    def by_type(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "Observation": self.observations,
            "Condition": self.conditions,
            "MedicationRequest": self.medication_requests,
            "MedicationStatement": self.medication_statements,
            "MedicationAdministration": self.medication_administrations,
            "Procedure": self.procedures,
        }

    def count(self) -> int:
        return 1 + sum(len(v) for v in self.by_type().values())

    def prefetch(self) -> dict[str, Any]:
        def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
            return {"resourceType": "Bundle", "type": "searchset", "total": len(resources), "entry": [{"resource": r} for r in resources]}

        t = self.by_type()
        return {
            "patient": self.patient,
            "observations": searchset(t["Observation"]),
            "conditions": searchset(t["Condition"]),
            "medicationRequests": searchset(t["MedicationRequest"]),
            "medicationStatements": searchset(t["MedicationStatement"]),
            "medicationAdministrations": searchset(t["MedicationAdministration"]),
            "procedures": searchset(t["Procedure"]),
        }


def patient_view(pid: str, *, prefetch: dict[str, Any] | None = None, fhir_server: str | None = None) -> bytes:
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/bench", "patientId": pid},
    }
    if fhir_server is not None:
        body["fhirServer"] = fhir_server
        body["fhirAuthorization"] = {"access_token": FHIR_TOKEN, "token_type": "Bearer", "expires_in": 300, "scope": "user/*.read", "subject": "bench"}
    if prefetch is not None:
        body["prefetch"] = prefetch
    return orjson.dumps(body)


# --- a minimal FHIR server (a subprocess: python bench/cds_hooks.py --fhir-stub DATA PORTFILE) -------------
def run_fhir_stub(data_file: Path, port_file: Path) -> None:
    """Serve the patient's record over HTTP/1.1 keep-alive with asyncio: read by id, search by type.
    Pre-serialized answers, so what is measured is the CDS service, not this server."""
    data = orjson.loads(data_file.read_bytes())
    pid = data["patient"]["id"]
    answers: dict[str, bytes] = {f"/fhir/Patient/{pid}": orjson.dumps(data["patient"])}
    for rtype, resources in data["by_type"].items():
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(resources), "entry": [{"resource": r} for r in resources]}
        answers[f"/fhir/{rtype}"] = orjson.dumps(bundle)
    empty = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []})
    not_found = orjson.dumps({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]})

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                _method, target, _version = request_line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                parts = urlsplit(target)
                if headers.get("authorization") != f"Bearer {FHIR_TOKEN}":
                    status, payload = "401 Unauthorized", not_found
                elif parts.path in answers:
                    query = parse_qs(parts.query)
                    wrong_patient = "patient" in query and query["patient"] != [pid]
                    status, payload = "200 OK", (empty if wrong_patient else answers[parts.path])
                else:
                    status, payload = "404 Not Found", not_found
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/fhir+json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        port_file.write_text(str(server.sockets[0].getsockname()[1]))
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --- processes ----------------------------------------------------------------------------------------
def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout_s} s")


@dataclass
class Processes:
    service: subprocess.Popen[bytes]
    stub: subprocess.Popen[bytes]
    service_url: str
    fhir_url: str

    def stop(self) -> None:
        # uvicorn shuts down gracefully on SIGINT; the stub has nothing to flush (SIGTERM ends it quietly).
        for process, sig in ((self.service, signal.SIGINT), (self.stub, signal.SIGTERM)):
            if process.poll() is None:
                process.send_signal(sig)
        for process in (self.service, self.stub):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def start(workdir: Path, record: PatientRecord, server_workers: int = 1) -> Processes:
    data_dir = workdir / "data"
    data_dir.mkdir()
    env = {
        **os.environ,
        "CDS_DEV_MODE": "true",
        "CDS_ENVIRONMENT": "local",
        "CDS_DATA_DIR": str(data_dir),
        "CDS_DATABASE_URL": "",
        "CDS_BROKER_URL": "",
        "CDS_BENCH_FLOOR_ROUTE": "1",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("CDS_REDIS_URL", None)
    migrate = subprocess.run([sys.executable, "-m", "service", "migrate"], cwd=ROOT, env=env, capture_output=True)
    if migrate.returncode != 0:
        raise RuntimeError(f"migration failed: {migrate.stderr.decode()[-2000:]}")

    data_file = workdir / "patient.json"
    data_file.write_bytes(orjson.dumps({"patient": record.patient, "by_type": record.by_type()}))
    port_file = workdir / "fhir.port"
    stub = subprocess.Popen([sys.executable, __file__, "--fhir-stub", str(data_file), str(port_file)], cwd=ROOT)
    port = free_port()
    service_log = (workdir / "service.log").open("wb")
    service = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(server_workers)],
        cwd=ROOT,
        env=env,
        stdout=service_log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or stub.poll() is not None:
            raise RuntimeError("the FHIR stub did not start")
        time.sleep(0.05)
    processes = Processes(service, stub, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port_file.read_text()}/fhir")
    try:
        wait_http(f"{processes.service_url}/healthz")
    except RuntimeError:
        processes.stop()
        raise RuntimeError(f"the service did not start; see {workdir / 'service.log'}") from None
    return processes


# --- load ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    scenario: str
    concurrency: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    round_p95_ms: list[float] = field(default_factory=list)  # p95 of each round, in order
    server_cpu_s: float | None = None  # CPU the service's processes used during the measured requests (Linux only)
    client_cpu_s: float = 0.0  # CPU this process (the load client) used during the measured requests

    def add(self, other: Result) -> None:
        """Pool another round of the same scenario and level."""
        self.requests += other.requests
        self.seconds += other.seconds
        self.client_cpu_s += other.client_cpu_s
        self.latencies_ms += other.latencies_ms
        self.round_p95_ms += other.round_p95_ms
        if self.server_cpu_s is not None and other.server_cpu_s is not None:
            self.server_cpu_s += other.server_cpu_s
        else:
            self.server_cpu_s = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def server_cpu_ms_per_request(self) -> str:
        return "n/a" if self.server_cpu_s is None else f"{1000 * self.server_cpu_s / self.requests:.2f}"

    def client_cpu_ms_per_request(self) -> str:
        return f"{1000 * self.client_cpu_s / self.requests:.2f}"

    def pct(self, p: int) -> float:
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[p - 1]


#: How one request is sent: ``post(body) -> (status, content)``.
Post = Callable[[bytes], Awaitable[tuple[int, bytes]]]


@asynccontextmanager
async def _client(kind: str, url: str, concurrency: int) -> AsyncIterator[Post]:
    """A keep-alive client with one connection per concurrent caller. ``aiohttp`` costs the client process about a
    fifth of what ``httpx`` does per request, so the floor then measures the service rather than the client."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if kind == "aiohttp":
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency), timeout=aiohttp.ClientTimeout(total=60)
        ) as session:

            async def post_aiohttp(body: bytes) -> tuple[int, bytes]:
                async with session.post(url, data=body, headers=headers) as response:
                    return response.status, await response.read()

            yield post_aiohttp
    else:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:

            async def post_httpx(body: bytes) -> tuple[int, bytes]:
                response = await client.post(url, content=body, headers=headers)
                return response.status_code, response.content

            yield post_httpx


async def _callers(post: Post, url: str, body: bytes, concurrency: int, n: int, expect_cards: bool) -> tuple[float, list[float]]:
    """``n`` requests from ``concurrency`` callers, each sending its next request when the last is answered."""
    latencies: list[float] = []
    remaining = n

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            status, content = await post(body)
            elapsed = (time.perf_counter() - t0) * 1000
            if status != 200:
                raise RuntimeError(f"{url}: HTTP {status}: {content[:300]!r}")
            if expect_cards and b"calciphylaxis-risk" not in content:
                raise RuntimeError(f"{url}: the expected calciphylaxis-risk card is missing")
            latencies.append(elapsed)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def measure(
    scenario: str, url: str, body: bytes, concurrency: int, n: int, warmup: int, server_pid: int, client: str
) -> Result:
    """Warm-up and measured requests on the same client and connections: the measured window (latencies and both CPU
    readings) holds requests only, not the client's start, its connects or its close."""
    expect_cards = scenario != "floor"
    async with _client(client, url, concurrency) as post:
        await _callers(post, url, body, concurrency, warmup, expect_cards)
        cpu_before, client_before = process_tree_cpu(server_pid), time.process_time()
        seconds, latencies = await _callers(post, url, body, concurrency, n, expect_cards)
        cpu_after, client_after = process_tree_cpu(server_pid), time.process_time()
    result = Result(scenario, concurrency, n, seconds, latencies, client_cpu_s=client_after - client_before)
    if cpu_before is not None and cpu_after is not None and cpu_before.keys() == cpu_after.keys():  # else n/a
        result.server_cpu_s = sum(cpu_after.values()) - sum(cpu_before.values())
    result.round_p95_ms.append(result.pct(95))
    return result


# --- report ---------------------------------------------------------------------------------------------
def table(results: list[Result]) -> list[str]:
    lines = [
        "| scenario | concurrency | req/s | p50 ms | p95 ms | p99 ms | service CPU ms/req | client CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario} | {r.concurrency} | {r.rps:.0f} | {r.pct(50):.1f} | {r.pct(95):.1f} | {r.pct(99):.1f} "
            f"| {r.server_cpu_ms_per_request()} | {r.client_cpu_ms_per_request()} |"
        )
    return lines


def verdicts(results: list[Result]) -> list[str]:
    by = {(r.scenario, r.concurrency): r for r in results}
    out = []
    full8, floor8 = by.get(("full", 8)), by.get(("floor", 8))
    if full8 and floor8:
        ratio = full8.pct(95) / floor8.pct(95)
        rounds = [f / b for f, b in zip(full8.round_p95_ms, floor8.round_p95_ms, strict=True)]  # in round order
        spread = f"; per round {', '.join(f'{r:.2f}' for r in rounds)}" if len(rounds) > 1 else ""
        out.append(f"p95(full prefetch) / p95(floor) at concurrency 8, pooled over the rounds: {ratio:.2f} (target <= 3): "
                   f"{'MET' if ratio <= 3 else 'MISSED'}{spread}")
    for c in sorted({r.concurrency for r in results if r.scenario == "fallback"}):
        fb = by[("fallback", c)]
        out.append(f"p95 with FHIR fallback at concurrency {c}: {fb.pct(95):.1f} ms (target well under 500 ms): {'MET' if fb.pct(95) < 500 else 'MISSED'}")
    return out


def write_markdown(path: Path, body_lines: list[str]) -> None:
    """Replace (or append) the section of this benchmark, keeping every other section."""
    section = "\n".join([f"## {SECTION}", "", *body_lines]).rstrip() + "\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    replaced = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(replaced.rstrip() + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="measured requests per scenario, level and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each row pools its rounds' requests")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up requests before each measurement")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--scenarios", default="full,fallback,floor")
    parser.add_argument("--markdown", type=Path, help="write the results into this Markdown file's section")
    parser.add_argument("--server-workers", type=int, default=1, help="uvicorn worker processes of the service (serve --workers)")
    parser.add_argument(
        "--client", choices=("aiohttp", "httpx"), default="aiohttp", help="the load client (httpx: the figures of sessions 1-4)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (service log)")
    parser.add_argument("--fhir-stub", nargs=2, metavar=("DATA", "PORTFILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fhir_stub:
        run_fhir_stub(Path(args.fhir_stub[0]), Path(args.fhir_stub[1]))
        return

    levels = [int(c) for c in args.concurrency.split(",")]
    scenarios = [s.strip() for s in args.scenarios.split(",")]
    record = PatientRecord(PATIENT_ID, datetime.now(UTC))
    workdir = Path(tempfile.mkdtemp(prefix="cds-bench-"))
    processes = start(workdir, record, args.server_workers)
    try:
        full_body = patient_view(record.pid, prefetch=record.prefetch())
        bodies = {
            "full": (f"{processes.service_url}/cds-services/calcinosis-risk", full_body),
            "fallback": (f"{processes.service_url}/cds-services/calcinosis-risk", patient_view(record.pid, fhir_server=processes.fhir_url)),
            "floor": (f"{processes.service_url}/bench/floor", full_body),
        }
        info = machine()
        load_before = info["load"]
        print(f"patient: {record.count()} resources; full-prefetch body {len(full_body) / 1024:.0f} KiB")
        print(f"machine: {info['nproc']} CPU(s), {info['cpu']}, Python {info['python']}, load average {info['load']}")
        pooled: dict[tuple[str, int], Result] = {}
        # Rounds outer, then levels, then scenarios: the runs compared with each other are close in time, and a
        # burst of noise on this shared machine lands in one round of one scenario, not in all of its samples.
        for round_no in range(1, args.rounds + 1):
            for level in levels:
                for scenario in scenarios:
                    url, body = bodies[scenario]
                    result = asyncio.run(measure(scenario, url, body, level, args.requests, args.warmup, processes.service.pid, args.client))
                    p50, p95, p99 = result.pct(50), result.pct(95), result.pct(99)
                    print(f"round {round_no} {scenario:>8} c={level:<3} {result.rps:7.0f} req/s  p50 {p50:7.1f}  p95 {p95:7.1f}  "
                          f"p99 {p99:7.1f} ms  service CPU {result.server_cpu_ms_per_request()} ms/req  "
                          f"client CPU {result.client_cpu_ms_per_request()} ms/req", flush=True)
                    if (scenario, level) in pooled:
                        pooled[(scenario, level)].add(result)
                    else:
                        pooled[(scenario, level)] = result
        results = list(pooled.values())
        results.sort(key=lambda r: (scenarios.index(r.scenario), r.concurrency))
        lines = table(results)
        summary = verdicts(results)
        print()
        print("\n".join(lines))
        print()
        print("\n".join(summary))
        if args.markdown:
            command = "python bench/cds_hooks.py " + " ".join(sys.argv[1:])
            doc = [
                f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}: `{command.strip()}`",
                "",
                f"Machine: {info['nproc']} CPU(s) ({info['cpu']}), Python {info['python']}, {info['os']}; "
                f"load average (1, 5, 15 min) before the run {load_before}, after {machine()['load']}.",
                "",
                f"The service runs as `python -m service serve --workers {args.server_workers}` (uvicorn with uvloop and httptools, "
                f"{args.server_workers} process(es), development mode, SQLite in a temporary "
                f"directory); the client is asyncio + {args.client} in another process, one keep-alive connection per concurrent caller; "
                f"{args.rounds} interleaved round(s) of {args.warmup} warm-up then {args.requests} measured requests per row, "
                f"pooled (the ratio is also given per round). Patient: a dialysis patient with one year "
                f"of records, {record.count()} resources ({len(full_body) / 1024:.0f} KiB full-prefetch body). `fallback` sends no "
                f"prefetch: the service fetches the 7 keys from a minimal FHIR server (asyncio, pre-serialized answers, one page) "
                f"in a third process. `floor` is `POST /bench/floor` of the same app (`CDS_BENCH_FLOOR_ROUTE=1`) with the "
                f"full-prefetch body: it reads the body and returns a fixed card.",
                "",
                *lines,
                "",
                *(f"- {s}" for s in summary),
            ]
            write_markdown(args.markdown, doc)
            print(f"\nwritten to {args.markdown}")
    finally:
        processes.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
