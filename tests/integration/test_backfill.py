"""The Synthea Bulk Data NDJSON cohort (tests/data/bulk) backfilled through the same ledger, per-patient state and
worker pipeline as notifications (``calcinosis-cds backfill`` with a worker running, not ``--evaluate-now``)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DATA
from tests.integration.support import Stack, run_cli, wait_until

pytestmark = pytest.mark.integration

BULK = DATA / "bulk"


def cohort() -> tuple[set[str], int]:
    """Patient ids with at least one resource, and the number of monitored resources in the files."""
    patients: set[str] = set()
    count = 0
    for path in sorted(BULK.glob("*.ndjson")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            resource = json.loads(line)
            count += 1
            if resource["resourceType"] == "Patient":
                patients.add(resource["id"])
            else:
                patients.add(resource["subject"]["reference"].removeprefix("Patient/"))
    return patients, count


def parse_counts(stdout: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in stdout.split())}


def test_bulk_ndjson_backfill_through_the_pipeline(worker_alive: Stack) -> None:
    stack = worker_alive
    patients, resources = cohort()
    assert len(patients) >= 10

    first = run_cli(["backfill", str(BULK)], stack.env, timeout=180)
    assert first.returncode == 0, first.stderr
    counts = parse_counts(first.stdout)
    assert counts == {"resources": resources, "new": resources, "duplicates": 0}

    def all_assessed() -> bool:
        refs = [f"Patient/{p}" for p in patients]
        done = stack.scalar("SELECT count(DISTINCT patient_ref) FROM evaluations WHERE patient_ref = ANY(:r)", r=refs)
        return int(done) == len(patients)

    wait_until(all_assessed, timeout=90, interval=0.5, what="every backfilled patient to have a stored assessment")
    for pid in sorted(patients):
        assessment = stack.assessment(pid)
        assert assessment is not None and assessment["patient"] == f"Patient/{pid}"
        assert assessment["inputs"], "evaluated from the backfilled resources"
    wait_until(lambda: all(stack.settled(p) for p in patients), timeout=30, what="the cohort to settle")
    evaluations = {p: stack.evaluations(p) for p in patients}
    ledger = int(stack.scalar("SELECT count(*) FROM inbound_events WHERE kind = 'backfill'"))

    second = run_cli(["backfill", str(BULK)], stack.env, timeout=180)
    assert second.returncode == 0, second.stderr
    assert parse_counts(second.stdout) == {"resources": resources, "new": 0, "duplicates": resources}
    assert int(stack.scalar("SELECT count(*) FROM inbound_events WHERE kind = 'backfill'")) == ledger
    assert all(stack.settled(p) for p in patients), "nothing new to evaluate"
    assert {p: stack.evaluations(p) for p in patients} == evaluations
