"""Replaying failed events: what an operator is told about each id, and a broker outage that must not hide them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db.repositories import InboundEventRepository
from service.db.session import session_scope
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
    assert lines[0] == ("calcinosis-cds: event 999999 does not exist: not replayed" if ids else "calcinosis-cds: error: give event ids or --all")
