"""Validate documents against the CDS Hooks 2.0.1 JSON Schema copied into tests/data."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMA_PATH = Path(__file__).resolve().parent / "data" / "cds-hooks-2.0.1.schema.json"


@cache
def _validator(definition: str) -> Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    registry = Registry().with_resource(schema["$id"], Resource.from_contents(schema))
    return Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{definition}"}, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_errors(document: Any, definition: str) -> list[str]:
    """Messages of every violation of ``#/$defs/<definition>`` (empty when valid)."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(definition).iter_errors(document)]


def assert_valid(document: Any, definition: str) -> None:
    errors = schema_errors(document, definition)
    assert not errors, errors
