"""``serve`` checks the mappings and thresholds once and hands them to the app it builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import uvicorn

from service.api import state
from service.terminology import checks
from service.usecases import monitor
from tests.service.conftest import RunCli


def test_serve_loads_the_mappings_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, run_cli: RunCli) -> None:
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
    code, lines = run_cli(["serve", "--port", "0"], CDS_DATA_DIR=str(tmp_path), CDS_DATABASE_URL="", CDS_BROKER_URL="", CDS_FHIR_BASE_URL="")
    assert code == 0, lines
    assert len(served) == 1
    ctx = served[0].state.ctx
    try:
        assert len(loads) == 1
        assert ctx.catalog.observations  # the app serves the catalog serve checked
    finally:
        ctx.issued_cards.close()
        ctx.engine.dispose()
