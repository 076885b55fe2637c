"""Lint, schema-check and render the Helm chart without a `helm` binary.

Runs in the separate Python >= 3.12 venv `.venv-helm` that `make lint-helm` creates, with:

- ``helm-sdkpy`` (Helm's Go library through cffi): ``Lint``, the same checks as ``helm lint``;
- ``helm-python-sdk`` (Helm v4 through ctypes): lint with a values overlay (messages with text) and offline
  rendering (``helm template``), which helm-sdkpy does not offer;
- ``jsonschema``: values.yaml, and values.yaml overlaid with helm/values-production.yaml, against
  values.schema.json.

Usage::

    .venv-helm/bin/python scripts/helm_lint.py            # every check; exit 1 on any error or warning
    .venv-helm/bin/python scripts/helm_lint.py render -f helm/values-production.yaml
        # prints the rendered manifests as one JSON array (used by tests/ops/test_helm.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "calcinosis-cds"
PRODUCTION_VALUES = ROOT / "helm" / "values-production.yaml"
KUBE_VERSION = "v1.30.0"
SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}

# Keep Helm's cache/config/data out of the user's home directory.
_HELM_HOME = Path(tempfile.gettempdir()) / "calcinosis-cds-helm-home"
for _var, _sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
    os.environ.setdefault(_var, str(_HELM_HOME / _sub))

import helm_python  # noqa: E402
import helm_sdkpy  # noqa: E402
import jsonschema  # noqa: E402
import yaml  # noqa: E402
from helm_python import chart as hp_chart  # noqa: E402


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def load_values(paths: list[Path]) -> dict[str, Any]:
    """User values files merged left to right (maps deep-merged, anything else replaced), like `-f a -f b`."""
    merged: dict[str, Any] = {}
    for path in paths:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"{path}: a values file must be a mapping")
        merged = _deep_merge(merged, data)
    return merged


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def coalesced(values: dict[str, Any] | None) -> dict[str, Any]:
    """The chart defaults overlaid with `values`, as Helm composes them for an install."""
    with hp_chart.Chart.load(CHART) as chart:
        return chart.merge_values(values or {})


def render(values: dict[str, Any] | None, *, name: str = "cds", namespace: str = "calcinosis") -> list[dict[str, Any]]:
    """Render the chart offline (`helm template`) and return the Kubernetes objects, hooks included."""
    with hp_chart.Chart.load(CHART) as chart:
        manifests = chart.render(values=values or {}, name=name, namespace=namespace, is_install=True)
    documents: list[dict[str, Any]] = []
    for path in sorted(manifests):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(manifests[path]):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                documents.append({"template": path, **doc})
    return documents


def lint_sdkpy(chart_dir: Path, label: str) -> list[str]:
    """helm-sdkpy's Lint (Helm's own linter). Its messages carry severity and path but no text."""
    config = helm_sdkpy.Configuration(namespace="calcinosis")
    result = asyncio.run(helm_sdkpy.Lint(config).run(str(chart_dir)))
    problems = []
    for message in result.get("Messages") or []:
        severity = int(message.get("Severity", 0))
        if severity >= 2:
            problems.append(f"[helm-sdkpy {label}] {SEVERITY.get(severity, severity)} {message.get('Path')}")
    if result.get("TotalChartsLinted") != 1:
        problems.append(f"[helm-sdkpy {label}] expected 1 chart linted, got {result.get('TotalChartsLinted')}")
    return problems


def lint_helm_python(values: dict[str, Any] | None, label: str) -> list[str]:
    """helm-python-sdk's lint with a values overlay; warnings count as problems (strict)."""
    report = hp_chart.lint(CHART, values=values, namespace="calcinosis", kube_version=KUBE_VERSION)
    problems = []
    for message in report.get("messages") or []:
        severity = int(message.get("severity", 0))
        text = f"{SEVERITY.get(severity, severity)} {message.get('path')}: {message.get('error')}"
        if severity >= 2:
            problems.append(f"[helm lint {label}] {text}")
        else:
            _log(f"  [helm lint {label}] {text}")
    return problems


def schema_problems(values: dict[str, Any], label: str) -> list[str]:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"[schema {label}] {'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(values), key=lambda e: list(e.absolute_path))
    ]


def render_problems(values: dict[str, Any] | None, label: str) -> list[str]:
    problems = []
    try:
        documents = render(values)
    except helm_python.HelmError as exc:  # a template that fails to render
        return [f"[render {label}] {exc}"]
    seen: set[tuple[str, str]] = set()
    for doc in documents:
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
        if not (doc.get("apiVersion") and kind and name):
            problems.append(f"[render {label}] {doc['template']}: object without apiVersion/kind/metadata.name")
            continue
        if (kind, name) in seen:
            problems.append(f"[render {label}] duplicate {kind}/{name}")
        seen.add((kind, name))
        if kind == "Secret" and (doc.get("data") or doc.get("stringData")):
            problems.append(f"[render {label}] Secret/{name} carries data: the chart only references Secrets")
    return problems


def run_all() -> int:
    production = load_values([PRODUCTION_VALUES])
    default_values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    problems: list[str] = []

    _log(f"helm-sdkpy {helm_sdkpy.__version__} ({helm_sdkpy.get_version()}), helm-python-sdk {helm_python.__version__}")

    _log("lint: default values")
    problems += lint_sdkpy(CHART, "default values")
    problems += lint_helm_python(None, "default values")

    _log(f"lint: {PRODUCTION_VALUES.relative_to(ROOT)}")
    # helm-sdkpy lints a chart directory with its own values.yaml: lint a copy whose values.yaml is the
    # coalesced production values.
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / CHART.name
        shutil.copytree(CHART, copy)
        (copy / "values.yaml").write_text(yaml.safe_dump(coalesced(production), sort_keys=False), encoding="utf-8")
        problems += lint_sdkpy(copy, "production values")
    problems += lint_helm_python(production, "production values")

    _log("schema: values.yaml, values.yaml + values-production.yaml")
    problems += schema_problems(default_values, "values.yaml")
    problems += schema_problems(coalesced(production), "values-production.yaml")

    _log("render: default and production values")
    problems += render_problems(None, "default values")
    problems += render_problems(production, "production values")

    for problem in problems:
        _log(problem)
    if problems:
        _log(f"helm chart: {len(problems)} problem(s)")
        return 1
    _log("helm chart: OK (lint, schema and render, default and production values)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("lint", help="every check (the default)")
    p_render = sub.add_parser("render", help="print the rendered manifests as a JSON array")
    p_render.add_argument("-f", "--values", action="append", type=Path, default=[], help="values file (repeatable)")
    p_render.add_argument("--set-json", action="append", default=[], help="JSON object merged over the values files")
    p_render.add_argument("--name", default="cds", help="release name")
    p_render.add_argument("--namespace", default="calcinosis")
    args = parser.parse_args(argv)

    if args.command == "render":
        values = load_values(args.values)
        for extra in args.set_json:
            values = _deep_merge(values, json.loads(extra))
        try:
            documents = render(values, name=args.name, namespace=args.namespace)
        except helm_python.HelmError as exc:
            _log(f"render failed: {exc}")
            return 1
        json.dump(documents, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    return run_all()


if __name__ == "__main__":
    sys.exit(main())
