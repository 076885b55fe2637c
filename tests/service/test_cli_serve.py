"""``serve`` checks the mappings and thresholds once and hands them to the app it builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from service import cli
from service.api import state
from service.config import get_settings
from service.terminology import checks
from service.usecases import monitor


def test_serve_loads_the_mappings_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {"CDS_DATA_DIR": str(tmp_path), "CDS_DATABASE_URL": "", "CDS_BROKER_URL": "", "CDS_FHIR_BASE_URL": ""}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    loads: list[Path] = []
    real = checks.load_rule_catalog

    def counting(directory: Path) -> Any:
        loads.append(directory)
        return real(directory)

    for module in (checks, state, monitor):
        monkeypatch.setattr(module, "load_rule_catalog", counting)
    served: list[Any] = []
    # the server itself is not under test
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: served.append(server.config.app))
    try:
        result = CliRunner().invoke(cli.app, ["serve", "--port", "0"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert len(served) == 1
    ctx = served[0].state.ctx
    try:
        assert len(loads) == 1
        assert ctx.catalog.observations  # the app serves the catalog serve checked
    finally:
        ctx.issued_cards.close()
        ctx.engine.dispose()
