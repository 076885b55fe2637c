"""The evaluate command as CONTRACT.md specifies it, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import bundle, esrd, patient, renal_panel
from tests.schema import assert_valid

ROOT = Path(__file__).resolve().parents[2]
SYNTHEA = ROOT / "tests" / "data" / "synthea"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def case_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "case.json"
    path.write_text(json.dumps(bundle(patient(), esrd(), *renal_panel(alb=2.8, p=7.5, ca=10.0))))
    return path


def test_json_format_contract(case_file) -> None:
    r = cli("evaluate", str(case_file), "--now", "2025-07-01T00:00:00Z", "--format", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert isinstance(data, list) and len(data) == 1
    a = data[0]
    for key in (
        "patient",
        "evaluated_at",
        "rules_version",
        "mappings_version",
        "renal_context",
        "calciphylaxis",
        "metastatic_calcification",
        "cards",
        "excluded",
    ):
        assert key in a
    assert a["evaluated_at"] == "2025-07-01T00:00:00Z"
    assert set(a["calciphylaxis"]) >= {"tier", "incomplete_data", "major_factors", "minor_factors"}
    assert a["metastatic_calcification"]["ca_x_p"] == {**a["metastatic_calcification"]["ca_x_p"], "value": 75.0, "unit": "mg2/dL2"}


def test_cards_and_fhir_formats(case_file) -> None:
    r = cli("evaluate", str(case_file), "--now", "2025-07-01T00:00:00Z", "--format", "cards")
    assert r.returncode == 0
    for response in json.loads(r.stdout):
        assert_valid(response, "CDSResponse")
    r = cli("evaluate", str(case_file), "--now", "2025-07-01T00:00:00Z", "--format", "fhir")
    bundle_out = json.loads(r.stdout)
    assert bundle_out["resourceType"] == "Bundle" and bundle_out["type"] == "collection"
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(bundle_out)
    assert {e["resource"]["resourceType"] for e in bundle_out["entry"]} == {"RiskAssessment"}


def test_text_format_and_directory_and_ndjson(tmp_path) -> None:
    r = cli("evaluate", str(SYNTHEA), "--now", "2020-06-01T00:00:00Z")
    assert r.returncode == 0
    assert r.stdout.count("Patient/") >= 5
    nd = tmp_path / "x.ndjson"
    nd.write_text("\n".join(json.dumps(x) for x in (patient(), esrd())) + "\n")
    r = cli("evaluate", str(nd), "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["renal_context"] == "R2"


def test_sorted_by_patient(tmp_path) -> None:
    path = tmp_path / "two.json"
    path.write_text(json.dumps(bundle(patient("zz"), patient("aa"))))
    data = json.loads(cli("evaluate", str(path), "--format", "json").stdout)
    assert [a["patient"] for a in data] == ["Patient/aa", "Patient/zz"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "no such file"),
        (b"", "empty file"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a FHIR resource"),
        (b'{"a": 1}', "not a FHIR resource"),
        (b'{"resourceType": "Patient"}\n{oops}\n', "not valid JSON"),
    ],
)
def test_errors_one_line_exit_2(tmp_path, content, needle) -> None:
    path = tmp_path / "in.json"
    if content is not None:
        path.write_bytes(content)
    r = cli("evaluate", str(path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("now", ["yesterday", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-10:00"])
def test_bad_now_exit_2(case_file, now) -> None:
    r = cli("evaluate", str(case_file), "--now", now)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_bad_mapping_refuses_to_run(case_file, tmp_path) -> None:
    bad = tmp_path / "mappings"
    bad.mkdir()
    for f in (ROOT / "mappings").glob("*.yaml"):
        (bad / f.name).write_text(f.read_text())
    (bad / "units.yaml").write_text((bad / "units.yaml").read_text() + "  - {code: x, dimension: mass, factor: '1', colour: red}\n")
    import os

    env = {**os.environ, "CDS_MAPPINGS_DIR": str(bad)}
    r = subprocess.run([sys.executable, "-m", "service", "evaluate", str(case_file)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 2
    assert "units.yaml:" in r.stderr and len(r.stderr.strip().splitlines()) == 1
