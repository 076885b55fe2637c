"""Fixtures of the service tests: the CLI run in process, and the FHIR server double."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from typer.testing import CliRunner

from service import cli
from service.config import get_settings
from tests.fakes.fhir_server import FakeFhirServer

#: ``run_cli(args, **env)``: exit code and non-blank output lines of ``calcinosis-cds *args`` with ``CDS_*`` ``env``.
RunCli = Callable[..., tuple[int, list[str]]]


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch) -> RunCli:
    """Runs the CLI in process with the given settings and no other ``CDS_*`` variable of the shell (as
    ``tests.integration.support.base_env`` does for a subprocess), read afresh (the settings are cached per process).
    Starting Celery would replace the test process (``os.execvp``): it fails the test instead, unless a test replaces
    ``cli._exec_celery`` itself."""
    for name in [n for n in os.environ if n.startswith("CDS_")]:
        monkeypatch.delenv(name)

    def never(args: list[str]) -> None:
        raise AssertionError(f"Celery was started with {args}")

    monkeypatch.setattr(cli, "_exec_celery", never)

    def run(args: list[str], **env: str) -> tuple[int, list[str]]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(cli.app, args)
        finally:
            get_settings.cache_clear()
        return result.exit_code, [line for line in result.output.splitlines() if line.strip()]

    return run


@pytest.fixture
def fhir() -> Iterator[FakeFhirServer]:
    """The FHIR server double over real HTTP; a test fails if the double itself raised."""
    with FakeFhirServer() as srv:
        yield srv
        assert not srv.errors, srv.errors
