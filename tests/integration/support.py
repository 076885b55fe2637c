"""Helpers for the integration tests: real processes (``calcinosis-cds serve|worker|beat|migrate``) on the real
PostgreSQL and Redis of this machine, a FakeFhirServer over real HTTP, polling, and FHIR data "as of now".

Nothing here runs Celery in eager mode: every task goes through Redis to a worker process started with the
command the container image and the Helm chart use.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import orjson
import redis
from sqlalchemy import Engine, text

from tests import builders as b

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("calcinosis-cds")
REDIS_SERVER_URL = "redis://127.0.0.1:6379/0"
SHARED_SECRET = "integration-shared-secret"
HMAC_SECRET = "integration-medplum-hmac"
ADMIN_TOKEN = "integration-admin-token"
RISK_SYSTEM = "https://calcinosis-cds.org/fhir/NamingSystem/risk-assessment"
FHIR_JSON = "application/fhir+json"
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ polling


def wait_until(
    predicate: Callable[[], T | Literal[False] | None], timeout: float = 20.0, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except Exception as exc:  # a transient error while polling counts as "not yet"
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------ Redis


def redis_ping(url: str = REDIS_SERVER_URL) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def flush_redis_db(url: str) -> None:
    """Empty one Redis database (the tests' own db number only; never the whole server)."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def stop_redis() -> None:
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True, timeout=10, check=False)
    wait_until(lambda: not redis_ping(), timeout=10, what="Redis to stop")


def start_redis() -> None:
    if redis_ping():
        return
    Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
    Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "", "--appendonly", "no",
         "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"],
        capture_output=True, timeout=10, check=False,
    )
    wait_until(redis_ping, timeout=20, what="Redis to answer PING")


@contextlib.contextmanager
def redis_stopped() -> Iterator[None]:
    """Stop the machine's Redis for the block; it is always started again (and answering PING) afterwards."""
    stop_redis()
    try:
        yield
    finally:
        start_redis()


# ------------------------------------------------------------------------------------------------ processes


class Process:
    """A ``calcinosis-cds`` subprocess in its own process group (so a worker's pool children go with it)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            [str(CLI), *args], env=env, cwd=str(ROOT), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 30.0) -> None:
        def seen() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}):\n{self.log()[-3000:]}")
            return needle in self.log()

        try:
            wait_until(seen, timeout=timeout, what=f"{self.name} to log {needle!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log ---\n{self.log()[-3000:]}") from None

    def children(self) -> list[int]:
        """Pids of the direct children (a prefork worker's pool processes)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown, no acknowledgement, nothing flushed."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        self._log.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)  # the main process shuts its pool down (Celery warm shutdown)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        # Pool children or a daemonised grandchild must not outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self._log.close()


def wait_healthy(process: Process, url: str, timeout: float = 60.0) -> None:
    """Until the server ``process`` started answers ``{url}/healthz`` (its log's tail if it exits first)."""

    def healthy() -> bool:
        if not process.alive():
            raise AssertionError(f"{process.name} exited:\n{process.log()[-3000:]}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=timeout, what=f"{process.name} ({' '.join(process.args)}) to answer /healthz")


#: Prometheus samples by (name, sorted labels).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metric_samples(text: str) -> Samples:
    """Parse a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout, check=False)


def base_env(**overrides: str) -> dict[str, str]:
    """The parent environment without any CDS_* variable of the developer's shell, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    env.update({"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "CDS_LOG_LEVEL": "INFO"})
    env.update(overrides)
    return env


# ------------------------------------------------------------------------------------------------ the stack


@dataclass
class Stack:
    """API + worker(s) (+ beat) on one PostgreSQL database and one Redis database."""

    env: dict[str, str]
    engine: Engine
    log_dir: Path
    api: Process | None = None
    api_url: str = ""
    workers: list[Process] = field(default_factory=list)
    beat: Process | None = None
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30.0))

    # --- processes --------------------------------------------------------------------------------
    def start_api(self, port: int | None = None, extra_args: list[str] | None = None) -> Process:
        port = port or free_port()
        self.api = Process("api", ["serve", "--host", "127.0.0.1", "--port", str(port), *(extra_args or [])], self.env, self.log_dir)
        self.api_url = f"http://127.0.0.1:{port}"
        wait_healthy(self.api, self.api_url, timeout=30)
        return self.api

    def start_worker(self, *args: str) -> Process:
        worker = Process("worker", ["worker", *args], self.env, self.log_dir)
        worker.wait_for_log(" ready.")
        self.workers.append(worker)
        return worker

    def start_beat(self) -> Process:
        self.beat = Process("beat", ["beat"], self.env, self.log_dir)
        self.beat.wait_for_log("beat: Starting")
        return self.beat

    def stop(self) -> None:
        for proc in [*self.workers, self.beat, self.api]:
            if proc is not None:
                proc.stop()
        self.workers.clear()
        self.http.close()

    # --- HTTP -------------------------------------------------------------------------------------
    def notify(
        self, body: bytes | dict[str, Any] | None = None, *, path: str = "", method: str = "POST",
        headers: dict[str, str] | None = None, auth: bool = True, content_type: str = FHIR_JSON,
    ) -> httpx.Response:
        """Send a notification as a FHIR server would (channel header with the shared secret by default)."""
        raw = b"" if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
        hdrs = {"Content-Type": content_type}
        if auth:
            hdrs["Authorization"] = f"Bearer {SHARED_SECRET}"
        hdrs.update(headers or {})
        url = f"{self.api_url}/fhir/notifications{'/' + path if path else ''}"
        return self.http.request(method, url, content=raw, headers=hdrs)

    def assessment(self, pid: str) -> dict[str, Any] | None:
        resp = self.http.get(f"{self.api_url}/patients/{pid}/assessment", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return resp.json()

    def wait_assessment(self, pid: str, predicate: Callable[[dict[str, Any]], bool] = lambda a: True, timeout: float = 30.0
                        ) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            a = self.assessment(pid)
            return a if a is not None and predicate(a) else None

        return wait_until(ready, timeout=timeout, what=f"the stored assessment of Patient/{pid}")

    # --- database ---------------------------------------------------------------------------------
    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]

    def evaluations(self, pid: str) -> int:
        return int(self.scalar("SELECT count(*) FROM evaluations WHERE patient_ref = :p", p=f"Patient/{pid}"))

    def events(self, **where: Any) -> list[dict[str, Any]]:
        clause = " AND ".join(f"{k} = :{k}" for k in where) or "TRUE"
        return self.rows(f"SELECT * FROM inbound_events WHERE {clause} ORDER BY id", **where)

    def event(self, event_id: int) -> dict[str, Any]:
        return self.rows("SELECT * FROM inbound_events WHERE id = :i", i=event_id)[0]

    def stored(self, rtype: str, rid: str) -> dict[str, Any] | None:
        found = self.rows("SELECT * FROM patient_resources WHERE resource_type = :t AND resource_id = :i", t=rtype, i=rid)
        return found[0] if found else None

    def settled(self, pid: str) -> bool:
        """No evaluation pending for the patient (not dirty) and every event about it finished."""
        dirty = self.scalar("SELECT count(*) FROM patient_evaluation_queue WHERE patient_ref = :p AND dirty_since IS NOT NULL",
                            p=f"Patient/{pid}")
        return int(dirty) == 0


# ------------------------------------------------------------------------------------------------ FHIR data


def now_iso(delta: timedelta = timedelta(0)) -> str:
    return (datetime.now(UTC) - delta).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_pid(prefix: str = "it") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def lab(pid: str, code: str, value: float, unit: str = "mg/dL", *, rid: str | None = None, days: float = 1, **fields: Any
        ) -> dict[str, Any]:
    """An Observation dated ``days`` before the real current time (the pipeline evaluates at the real time)."""
    return b.obs(code, value, unit, subject=f"Patient/{pid}", when=now_iso(timedelta(days=days)), rid=rid or f"o-{uuid.uuid4().hex[:10]}",
                 **fields)


def esrd(pid: str) -> dict[str, Any]:
    return b.condition("46177005", display="End-stage renal disease", subject=f"Patient/{pid}", rid=f"c-{uuid.uuid4().hex[:10]}")


def high_risk(pid: str) -> list[dict[str, Any]]:
    """Patient, ESRD and a same-draw panel with Ca×P 75 (> 70): metastatic calcification tier ``high``."""
    return [
        b.patient(pid),
        esrd(pid),
        lab(pid, b.CA, 10.0),
        lab(pid, b.P, 7.5),
        lab(pid, b.ALB, 4.1, "g/dL"),
    ]


def with_meta(resource: dict[str, Any], version: int, updated: datetime | None = None) -> dict[str, Any]:
    out = dict(resource)
    out["meta"] = {"versionId": str(version), "lastUpdated": (updated or datetime.now(UTC)).isoformat().replace("+00:00", "Z")}
    return out


def collection(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def medplum_signature(body: bytes, secret: str = HMAC_SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def risk_assessments(fake: Any, pid: str) -> list[dict[str, Any]]:
    """Current RiskAssessments on the FHIR server double for the patient."""
    return [r for r in fake.resources("RiskAssessment") if (r.get("subject") or {}).get("reference") == f"Patient/{pid}"]


def risk_of(fake: Any, pid: str, flag: str) -> list[dict[str, Any]]:
    value = f"{pid}-{flag}"
    return [r for r in fake.resources("RiskAssessment") if any(i.get("value") == value for i in r.get("identifier", []))]


def tier_of(risk: dict[str, Any]) -> str:
    q = risk["prediction"][0]["qualitativeRisk"]
    codings = q.get("coding") or []
    return str(codings[0]["code"]) if codings else str(q.get("text"))
