""".env.example documents every setting of service/config.py, and nothing else.

Format: each variable is a line `NAME=value` or, for a default left untouched, `# NAME=default`, preceded by
at least one comment line explaining it. Nested Thresholds are documented as the CDS_THRESHOLDS__* group.
"""

from __future__ import annotations

import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from service.cds.thresholds import Thresholds
from service.config import Settings
from tests.conftest import ROOT

ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ASSIGNMENT = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
NESTED = {"thresholds": Thresholds}
# Settings that may carry credentials (URLs with passwords) besides the SecretStr fields.
CREDENTIAL_URLS = {"database_url", "broker_url", "redis_url"}
COMPOSE_SECRETS = {"POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH"}


@dataclass(frozen=True)
class Entry:
    name: str
    value: str
    commented: bool
    line: int


def parse(path: Path) -> list[Entry]:
    lines = path.read_text(encoding="utf-8").splitlines()
    entries = []
    for number, line in enumerate(lines, start=1):
        match = ASSIGNMENT.match(line)
        if match:
            entries.append(Entry(match.group(2), match.group(3), bool(match.group(1)), number))
    return entries


@pytest.fixture(scope="module")
def entries() -> list[Entry]:
    return parse(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def names(entries: list[Entry]) -> dict[str, Entry]:
    by_name: dict[str, Entry] = {}
    for entry in entries:
        assert entry.name not in by_name, f"{entry.name} documented twice (lines {by_name[entry.name].line}, {entry.line})"
        by_name[entry.name] = entry
    return by_name


def env_name(field: str) -> str:
    """``CDS_<FIELD>``, or the variable a field reads under another library's name (PROMETHEUS_MULTIPROC_DIR)."""
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else f"CDS_{field.upper()}"


ALIASES = {env_name(f) for f in Settings.model_fields} - {f"CDS_{f.upper()}" for f in Settings.model_fields}


def _is_secret(field: str) -> bool:
    annotation = Settings.model_fields[field].annotation
    return SecretStr in (typing.get_args(annotation) or (annotation,))


def test_every_setting_is_documented(names: dict[str, Entry]) -> None:
    missing = []
    for field in Settings.model_fields:
        if field in NESTED:
            prefix = f"CDS_{field.upper()}__"
            if not any(n.startswith(prefix) for n in names):
                missing.append(f"{prefix}* (group)")
        elif env_name(field) not in names:
            missing.append(env_name(field))
    assert not missing, f"settings missing from .env.example: {missing}"


def test_nothing_unknown(names: dict[str, Entry]) -> None:
    compose_text = "\n".join(
        line for line in COMPOSE_FILE.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")
    )
    compose_vars = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", compose_text))
    unknown = []
    for name in names:
        if name.startswith("CDS_"):
            field, _, sub = name[4:].lower().partition("__")
            known_nested = field in NESTED and sub in NESTED[field].model_fields
            if field not in Settings.model_fields or (sub and not known_nested):
                unknown.append(name)
        elif name not in compose_vars and name not in ALIASES:
            unknown.append(f"{name} (not a setting, not used by docker-compose.yml)")
    assert not unknown, f"unknown names in .env.example: {unknown}"


def test_every_variable_is_explained() -> None:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if not ASSIGNMENT.match(line):
            continue
        cursor = number - 1
        explained = False
        while cursor >= 0 and lines[cursor].strip():
            previous = lines[cursor]
            if previous.startswith("#") and not ASSIGNMENT.match(previous) and len(previous.strip("# =")) > 3:
                explained = True
                break
            cursor -= 1
        assert explained, f"line {number + 1} ({line.split('=')[0]}) has no explanation comment above it"


def test_secrets_are_empty(names: dict[str, Entry]) -> None:
    secret_names = {f"CDS_{f.upper()}" for f in Settings.model_fields if _is_secret(f) or f in CREDENTIAL_URLS}
    secret_names |= COMPOSE_SECRETS
    assert {"CDS_SUBSCRIPTION_SECRET", "CDS_FHIR_BEARER_TOKEN", "CDS_DATABASE_URL"} <= secret_names
    for name in sorted(secret_names):
        assert name in names, f"{name} is not documented"
        assert names[name].value == "", f"{name} must be empty in .env.example"


def test_settings_are_commented_defaults(names: dict[str, Entry]) -> None:
    """A copied .env changes nothing until a line is uncommented."""
    for name, entry in names.items():
        if name.startswith("CDS_"):
            assert entry.commented, f"{name}: settings are shown commented, with their default"


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CDS_"):
            monkeypatch.delenv(key)


def test_documented_defaults_are_the_real_defaults(names: dict[str, Entry], monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    defaults = Settings()
    checked = 0
    for name, entry in names.items():
        if not name.startswith("CDS_") or entry.value == "":
            continue
        field, _, sub = name[4:].lower().partition("__")
        if field in {"data_dir", "mappings_dir", "sandbox_jwks_file"}:
            continue  # shown relative to the repository; the real default is an absolute path
        monkeypatch.setenv(name, entry.value)
        try:
            parsed = Settings()
        finally:
            monkeypatch.delenv(name)
        if sub:
            got, want = getattr(getattr(parsed, field), sub), getattr(getattr(defaults, field), sub)
        else:
            got, want = getattr(parsed, field), getattr(defaults, field)
        assert got == want, f"{name}={entry.value} parses to {got!r}, but the default is {want!r}"
        checked += 1
    assert checked >= 30


def test_list_settings_are_shown_as_json(names: dict[str, Entry]) -> None:
    for field, info in Settings.model_fields.items():
        if typing.get_origin(info.annotation) is list:
            value = names[f"CDS_{field.upper()}"].value
            assert isinstance(json.loads(value), list), f"CDS_{field.upper()} must be a JSON list"
