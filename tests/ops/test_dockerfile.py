"""Dockerfile invariants, checked statically.

No Docker engine runs on the development machines, so the image build itself is verified where Docker
runs (CI elsewhere, users); these tests keep the properties that matter from regressing.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|KEY|CREDENTIAL", re.I)
# repo[:tag] with an exact version tag (major.minor.patch), optionally followed by @sha256:digest.
PINNED = re.compile(r"^[a-z0-9][a-z0-9._/-]*:\d+\.\d+\.\d+[A-Za-z0-9._-]*(@sha256:[a-f0-9]{64})?$")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped (enough for these checks)."""
    instructions: list[Instruction] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, args = buffer.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        buffer = ""
    assert not buffer, "dangling line continuation"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text(encoding="utf-8"))


def of(instructions: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in instructions if i.keyword == keyword]


def _declared_names(args: str) -> list[str]:
    """Variable names of an ENV or ARG instruction (`A=1 B=2`, `A 1` or `NAME`)."""
    parts = shlex.split(args)
    if len(parts) >= 2 and "=" not in parts[0]:
        return [parts[0]]  # legacy `ENV NAME value`
    return [p.split("=", 1)[0] for p in parts]


def test_base_images_are_pinned(instructions: list[Instruction]) -> None:
    global_args: dict[str, str] = {}
    for inst in instructions:
        if inst.keyword == "FROM":
            break
        if inst.keyword == "ARG" and "=" in inst.args:
            name, value = inst.args.split("=", 1)
            global_args[name.strip()] = value.strip().strip('"')
    stages: set[str] = set()
    froms = of(instructions, "FROM")
    assert len(froms) >= 2, "multi-stage build expected (builder + runtime)"
    for args in froms:
        words = [w for w in args.split() if not w.startswith("--")]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
        if image in stages:
            continue
        assert "latest" not in image, image
        assert PINNED.match(image), f"base image not pinned to an exact version: {image}"
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2])
    assert re.match(r"python:3\.11\.\d+-slim", global_args.get("PYTHON_IMAGE", "")), "runtime base: python:3.11.x-slim"


def test_runs_as_numeric_non_root_user(instructions: list[Instruction]) -> None:
    users = of(instructions, "USER")
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER must be a numeric non-root uid, got {users[-1]}"
    assert user == "10001"
    # The last stage ends as that user: nothing runs as root after it.
    last_user = max(i for i, inst in enumerate(instructions) if inst.keyword == "USER")
    assert not [inst for inst in instructions[last_user:] if inst.keyword == "RUN"]


def test_no_secrets_in_env_or_arg(instructions: list[Instruction]) -> None:
    for inst in instructions:
        if inst.keyword in {"ENV", "ARG"}:
            for name in _declared_names(inst.args):
                assert not SECRET_NAME.search(name), f"{inst.keyword} {name}: secrets are runtime-only"


def test_no_remote_add_and_no_env_file_copied(instructions: list[Instruction]) -> None:
    for args in of(instructions, "ADD"):
        assert not re.search(r"(^|\s)(https?|git)[:@]", args), f"ADD from a URL: {args}"
    for args in of(instructions, "COPY") + of(instructions, "ADD"):
        sources = [w for w in shlex.split(args) if not w.startswith("--")][:-1]
        assert not any(".env" in s or s in {".", "./"} for s in sources), f"copies too much or .env: {args}"


def test_healthcheck_calls_healthz_with_python(instructions: list[Instruction]) -> None:
    (check,) = of(instructions, "HEALTHCHECK")
    assert "CMD" in check and "/healthz" in check and "python" in check
    assert "curl" not in check and "wget" not in check


def test_entrypoint_cmd_expose(instructions: list[Instruction]) -> None:
    assert json.loads(of(instructions, "ENTRYPOINT")[-1]) == ["calcinosis-cds"]
    assert json.loads(of(instructions, "CMD")[-1]) == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    assert "8080" in of(instructions, "EXPOSE")[-1].split()


def test_read_only_root_friendly(instructions: list[Instruction]) -> None:
    env = " ".join(of(instructions, "ENV"))
    assert "CDS_DATA_DIR=/var/lib/calcinosis" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert any("/var/lib/calcinosis" in v for v in of(instructions, "VOLUME"))


def test_oci_labels(instructions: list[Instruction]) -> None:
    labels = " ".join(of(instructions, "LABEL"))
    for key in ("title", "description", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_dockerignore_excludes_secrets_and_local_state() -> None:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    patterns = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    for required in (".env", ".git", "var/", "tests/"):
        assert required in patterns, required
    assert ".venv" in patterns or ".venv/" in patterns
    assert "!.env" not in patterns
