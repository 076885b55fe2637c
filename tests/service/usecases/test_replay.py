"""Replaying failed events: what an operator is told about each id, and a broker outage that must not hide them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.repositories import InboundEventRepository, Repositories
from service.db.session import make_engine, make_session_factory, session_scope
from service.queue import TASK_PROCESS_EVENT, MemoryQueue
from service.usecases import monitor
from tests.service.conftest import RunCli
from tests.service.usecases.conftest import MakeMonitor

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class DownQueue(MemoryQueue):
    def send(self, name: str, args: list[Any], countdown: float | None = None) -> None:
        raise ConnectionError("broker down")


def ledger_with(factory: sessionmaker[Session]) -> tuple[int, int]:
    """One failed event and one handled event."""
    with session_scope(factory) as session:
        ledger = InboundEventRepository(session)
        failed, _ = ledger.create_if_absent(dedup_key="failed", kind="resource", now=T0)
        handled, _ = ledger.create_if_absent(dedup_key="handled", kind="resource", now=T0)
        ledger.claim_for_processing(failed.id, now=T0)
        ledger.mark_status(failed.id, "failed", "FhirTransientError", now=T0)
        ledger.mark_status(handled.id, "handled", now=T0)
        return failed.id, handled.id


def status_of(factory: sessionmaker[Session], event_id: int) -> str:
    with session_scope(factory) as session:
        event = InboundEventRepository(session).get(event_id)
        assert event is not None
        return event.status


def test_replay_names_the_ids_it_did_not_replay(db_session_factory: sessionmaker[Session], make_monitor: MakeMonitor) -> None:
    failed, handled = ledger_with(db_session_factory)
    queue = MemoryQueue()
    result = monitor.replay_failed(make_monitor(queue), [failed, handled, 999_999])
    assert result.replayed == [failed]
    assert result.not_failed == {handled: "handled", 999_999: ""}
    assert result.enqueue_error is None
    assert queue.sent == [(TASK_PROCESS_EVENT, [failed], None)]


def test_an_unreachable_broker_leaves_the_replayed_events_queued_for_the_sweeper(
    db_session_factory: sessionmaker[Session], make_monitor: MakeMonitor
) -> None:
    failed, _ = ledger_with(db_session_factory)
    result = monitor.replay_failed(make_monitor(DownQueue()), None)
    assert result.replayed == [failed]
    assert result.enqueue_error == "ConnectionError"
    assert status_of(db_session_factory, failed) == "queued", "visible and picked up by the sweeper, not silently lost"


@pytest.mark.parametrize("ids", [["999999"], []], ids=["unknown-id", "no-id"])
def test_cli_replay_of_nothing_exits_2(run_cli: RunCli, tmp_path: Path, ids: list[str]) -> None:
    assert run_cli(["migrate"], CDS_DATA_DIR=str(tmp_path))[0] == 0
    code, lines = run_cli(["events", "replay", *ids], CDS_DATA_DIR=str(tmp_path))
    assert code == 2
    usage = "calcinosis-cds: error: give event ids, --writeback evaluation ids or --all"
    assert lines[0] == ("calcinosis-cds: event 999999 does not exist: not replayed" if ids else usage)


def failed_writeback_in(url: str) -> int:
    """An evaluation whose write-back failed (the EHR refused it), in the database at ``url``; returns its id."""
    engine = make_engine(url, pool_size=1)
    try:
        with session_scope(make_session_factory(engine)) as session:
            repos = Repositories(session)
            evaluation_id = repos.evaluations.add(
                patient_ref="Patient/p9",
                evaluated_at=T0,
                inputs_hash="h",
                inputs=[],
                rules_version="r",
                mappings_version="m",
                calciphylaxis_tier="none",
                metastatic_tier="high",
                renal_context="R2",
                assessment={},
            )
            repos.writeback_requests.add(evaluation_id, "Patient/p9", next_sweep_at=T0, now=T0)
            repos.writeback_requests.finish(evaluation_id, "failed", error="FhirPermanentError: HTTP 422", now=T0)
            return evaluation_id
    finally:
        engine.dispose()


def writeback_status(url: str, evaluation_id: int) -> str:
    engine = make_engine(url, pool_size=1)
    try:
        with session_scope(make_session_factory(engine)) as session:
            return Repositories(session).writeback_requests.statuses([evaluation_id])[evaluation_id]
    finally:
        engine.dispose()


def test_cli_lists_and_replays_failed_write_backs(run_cli: RunCli, tmp_path: Path) -> None:
    """`events --failed` shows a failed write-back (ids and the error type only) and `events replay --writeback`
    puts it back on the queue (the embedded SQLite broker here)."""
    env = {"CDS_DATA_DIR": str(tmp_path)}
    assert run_cli(["migrate"], **env)[0] == 0
    url = Settings(data_dir=tmp_path).effective_database_url
    evaluation_id = failed_writeback_in(url)

    code, lines = run_cli(["events", "--failed"], **env)
    assert code == 0
    assert "no failed events" in lines
    row = next(line for line in lines if "Patient/p9" in line)
    assert str(evaluation_id) in row.split()[:3]
    assert "FhirPermanentError: HTTP 422" in row
    code, lines = run_cli(["events"], **env)
    assert code == 0 and "write-backs  failed=1 pending=0 superseded=0 written=0" in lines

    code, lines = run_cli(["events", "replay", "--writeback", str(evaluation_id), "--writeback", "999999"], **env)
    assert code == 0, lines
    assert "calcinosis-cds: write-back of evaluation 999999 does not exist: not replayed" in lines
    assert f"replayed 1 write-back(s): {evaluation_id}" in lines
    assert not any(line.startswith("replayed") and "event(s)" in line for line in lines), "no event was asked for"
    assert writeback_status(url, evaluation_id) == "pending"
    assert "no failed write-backs" in run_cli(["events", "--failed"], **env)[1]

    code, lines = run_cli(["events", "replay", "--writeback", str(evaluation_id)], **env)
    assert code == 2
    assert lines[0] == f"calcinosis-cds: write-back of evaluation {evaluation_id} is pending, not failed: not replayed"
