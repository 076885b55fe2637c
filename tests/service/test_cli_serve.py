"""``serve`` checks the mappings and thresholds once and hands them to the app it builds."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from uvicorn.supervisors import Multiprocess

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


REPLAY_WARNING = (
    "calcinosis-cds: warning: 2 processes without CDS_REDIS_URL each keep their own JWT replay cache: "
    "a token can be replayed once per process (set CDS_REDIS_URL)"
)


@pytest.mark.parametrize(("redis_url", "warned", "port"), [("", True, 18161), ("redis://127.0.0.1:6379/1", False, 18162)])
def test_serve_with_several_processes_warns_without_a_shared_replay_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, run_cli: RunCli, redis_url: str, warned: bool, port: int
) -> None:
    """Outside production (which refuses to start without CDS_REDIS_URL) the processes still start, with a warning."""
    started: list[int] = []
    # the processes themselves are not under test (and the supervisor's signal handlers are not left in pytest's process)
    monkeypatch.setattr(Multiprocess, "run", lambda supervisor: started.append(supervisor.processes_num))
    monkeypatch.setattr(signal, "signal", lambda sig, handler: None)
    code, lines = run_cli(["serve", "--port", str(port), "--workers", "2"], CDS_DATA_DIR=str(tmp_path), CDS_REDIS_URL=redis_url)
    assert code == 0, lines
    assert started == [2]
    assert (REPLAY_WARNING in lines) is warned, lines
