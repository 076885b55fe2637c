"""Benchmark: evaluate every Synthea bundle in-process; compare with orjson.loads alone on the same files.

Prints resources/s and the ratio (parse + evaluate) / (parse alone). Target ratio ≤ 2.0.
Usage: python bench/evaluate.py [DIR] [--repeat N]   (DIR defaults to ../shared/data/synthea-r4, else tests/data/synthea)
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

from service.cds.engine import evaluate_resources
from service.cds.grouping import flatten
from service.cds.thresholds import Thresholds
from service.cds.validate import clear_verdicts
from service.terminology.loader import load_catalog

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    default = ROOT.parent / "shared" / "data" / "synthea-r4"
    parser.add_argument("directory", nargs="?", type=Path, default=default if default.exists() else ROOT / "tests" / "data" / "synthea")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--now", default="2020-06-01T00:00:00+00:00")
    args = parser.parse_args()
    files = sorted(args.directory.glob("*.json"))
    blobs = [f.read_bytes() for f in files]
    catalog = load_catalog()
    thresholds = Thresholds()
    now = datetime.fromisoformat(args.now).astimezone(UTC)
    n_resources = sum(len(flatten([orjson.loads(b)], {})) for b in blobs)

    parse_times, full_times = [], []
    for _ in range(args.repeat):
        gc.collect()
        t0 = time.perf_counter()
        for b in blobs:
            orjson.loads(b)
        parse_times.append(time.perf_counter() - t0)
        clear_verdicts()  # every run validates cold, as on files never seen before
        gc.collect()
        t0 = time.perf_counter()
        patients = 0
        for b in blobs:
            evs, _ = evaluate_resources([orjson.loads(b)], catalog=catalog, thresholds=thresholds, now=now)
            patients += len(evs)
        full_times.append(time.perf_counter() - t0)
    parse, full = statistics.median(parse_times), statistics.median(full_times)
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"files: {len(files)} ({sum(map(len, blobs)) / 1e6:.1f} MB), resources: {n_resources}, patients per run: {patients}")
    print(f"orjson.loads alone:   {parse * 1000:8.1f} ms  ({n_resources / parse:,.0f} resources/s)")
    print(f"parse + evaluate:     {full * 1000:8.1f} ms  ({n_resources / full:,.0f} resources/s)")
    print(f"ratio (evaluate/parse): {full / parse:.2f}  (target ≤ 2.0; median of {args.repeat} runs)")


if __name__ == "__main__":
    main()
