"""Read FHIR R4 JSON, Bundles and NDJSON from files and directories (the CLI's and backfill's input side)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson


class InputError(Exception):
    """An input path cannot be read or is not FHIR JSON. The message is one line, without content."""


def _files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file() and child.suffix.lower() in (".json", ".ndjson", ".jsonl"):
                yield child
    elif path.is_file():
        yield path
    elif not path.exists():
        raise InputError(f"{path}: no such file or directory")
    else:
        raise InputError(f"{path}: not a regular file or directory")


def read_path(path: Path) -> Iterator[dict[str, Any]]:
    """Yield top-level resources (Bundles unflattened) from a file or directory."""
    for file in _files(path):
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise InputError(f"{file}: cannot read ({exc.strerror or type(exc).__name__})") from None
        yield from parse_bytes(data, str(file))


def parse_bytes(data: bytes, name: str) -> Iterator[dict[str, Any]]:
    stripped = data.lstrip()
    if not stripped:
        raise InputError(f"{name}: empty file")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        doc = None
        if b"\n" in stripped.rstrip():
            yield from _ndjson(data, name)
            return
        raise InputError(f"{name}: not valid JSON") from None
    if isinstance(doc, dict) and isinstance(doc.get("resourceType"), str):
        yield doc
        return
    raise InputError(f"{name}: not a FHIR resource (a JSON object with resourceType, a Bundle, or NDJSON)")


def _ndjson(data: bytes, name: str) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise InputError(f"{name}:{number}: not valid JSON (NDJSON line)") from None
        if not (isinstance(doc, dict) and isinstance(doc.get("resourceType"), str)):
            raise InputError(f"{name}:{number}: not a FHIR resource")
        yield doc
