"""Write a CDS Hooks patient-view request with its dates shifted so the newest is ~2 days ago.

docs/examples/patient-view.json is a fixed example (a dialysis patient on warfarin with a high Ca×P);
labs older than their windows are stale, so `make run` writes a fresh copy to var/ for the curl example.
Usage: python scripts/example_request.py [SOURCE] [DEST]
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def _dates(node: Any, out: list[datetime]) -> None:
    if isinstance(node, dict):
        for v in node.values():
            _dates(v, out)
    elif isinstance(node, list):
        for v in node:
            _dates(v, out)
    elif isinstance(node, str) and ISO.match(node):
        out.append(datetime.fromisoformat(node.replace("Z", "+00:00")))


def _shift(node: Any, delta: timedelta) -> Any:
    if isinstance(node, dict):
        return {k: _shift(v, delta) for k, v in node.items()}
    if isinstance(node, list):
        return [_shift(v, delta) for v in node]
    if isinstance(node, str) and ISO.match(node):
        moved = datetime.fromisoformat(node.replace("Z", "+00:00")) + delta
        return moved.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return node


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "docs" / "examples" / "patient-view.json"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else root / "var" / "patient-view.json"
    doc = json.loads(src.read_text())
    found: list[datetime] = []
    _dates(doc, found)
    delta = (datetime.now(UTC) - timedelta(days=2)) - max(found) if found else timedelta()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(_shift(doc, delta), indent=2))
    print(dst)


if __name__ == "__main__":
    main()
