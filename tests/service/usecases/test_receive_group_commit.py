"""Group commit in monitor.receive: concurrent calls share a transaction, yet each is answered for itself."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import InboundEvent
from service.db.session import session_scope
from service.queue import TASK_EVALUATE, MemoryQueue, NotSent
from service.usecases import monitor
from tests.builders import changed
from tests.service.usecases.conftest import MakeMonitor


class GatedQueue(MemoryQueue):
    """Blocks the first send until released, so the calls made meanwhile queue up behind the leader."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.first = threading.Event()
        self.release = threading.Event()
        self.fail = fail
        self.calls = 0

    def send(self, name: str, args: list[Any], countdown: float | None = None) -> None:
        self.calls += 1
        if self.calls == 1:
            self.first.set()
            assert self.release.wait(10)
        elif self.fail:
            raise ConnectionError("broker down")
        super().send(name, args, countdown)


@pytest.fixture
def context(make_monitor: MakeMonitor, monkeypatch: pytest.MonkeyPatch) -> Any:
    batches: list[int] = []
    original = monitor._receive_transaction

    def recording(ctx: monitor.MonitorContext, batch: list[Any]) -> None:
        batches.append(len(batch))
        original(ctx, batch)

    monkeypatch.setattr(monitor, "_receive_transaction", recording)

    def make(queue: MemoryQueue) -> tuple[monitor.MonitorContext, list[int]]:
        return make_monitor(queue), batches

    return make


def run_behind_a_leader(ctx: monitor.MonitorContext, queue: GatedQueue, followers: list[list[Any]]) -> list[Any]:
    """One call leads (and blocks in its first send); the followers call meanwhile; then the leader is released."""
    results: list[Any] = [None] * (len(followers) + 1)

    def call(i: int, notifications: list[Any]) -> None:
        try:
            results[i] = monitor.receive(ctx, notifications, "r4-resource")
        except Exception as exc:  # the test looks at it
            results[i] = exc

    leader = threading.Thread(target=call, args=(0, [changed("lead", "p0")]))
    leader.start()
    assert queue.first.wait(10)
    threads = [threading.Thread(target=call, args=(i + 1, n)) for i, n in enumerate(followers)]
    for t in threads:
        t.start()
    group = ctx._group_commit
    deadline = time.monotonic() + 10
    while len(group.queue) < len(followers) and time.monotonic() < deadline:  # all queued behind the busy leader
        time.sleep(0.005)
    queue.release.set()
    for t in [leader, *threads]:
        t.join(20)
    return results


def ledger_rows(factory: sessionmaker[Session]) -> int:
    with session_scope(factory) as session:
        return int(session.scalar(select(func.count()).select_from(InboundEvent)) or 0)


def test_concurrent_calls_share_one_transaction(context: Any, db_session_factory: sessionmaker[Session]) -> None:
    queue = GatedQueue()
    ctx, batches = context(queue)
    followers = [[changed("a", "p1")], [changed("b", "p1")], [changed("a", "p1")], [changed("c", "p2"), changed("d", "p2")]]
    results = run_behind_a_leader(ctx, queue, followers)
    assert batches == [1, 4]  # the leader alone, then the four followers in one transaction
    assert [(r.accepted, r.duplicates) for r in results] == [(1, 0), (1, 0), (1, 0), (0, 1), (2, 0)]
    assert ledger_rows(db_session_factory) == 5
    evaluations = sorted(args[0] for name, args, _ in queue.sent if name == TASK_EVALUATE)
    assert evaluations == ["Patient/p0", "Patient/p1", "Patient/p2"]  # one per patient that became dirty


def test_a_failing_notification_fails_only_its_own_call(context: Any, db_session_factory: sessionmaker[Session]) -> None:
    queue = GatedQueue()
    ctx, batches = context(queue)
    poison = changed("x" * 600, "p9")  # its ledger key is longer than the column: refused
    results = run_behind_a_leader(ctx, queue, [[changed("a", "p1")], [poison], [changed("b", "p2")]])
    assert batches == [1, 3, 1, 1, 1]  # the group failed, then each call in a transaction of its own
    assert isinstance(results[2], ValueError)
    assert [(r.accepted, r.duplicates) for r in (results[0], results[1], results[3])] == [(1, 0), (1, 0), (1, 0)]
    assert ledger_rows(db_session_factory) == 3


def test_broker_failure_after_commit_is_reported_and_redelivery_is_a_duplicate(
    context: Any, db_session_factory: sessionmaker[Session]
) -> None:
    queue = GatedQueue(fail=True)
    ctx, _ = context(queue)
    results = run_behind_a_leader(ctx, queue, [[changed("a", "p1")], [changed("b", "p2")]])
    for result in (results[1], results[2]):  # answered 503, as the broker's failure
        assert isinstance(result, NotSent) and isinstance(result.__cause__, ConnectionError)
    assert ledger_rows(db_session_factory) == 3  # but recorded: nothing accepted is lost
    queue.fail = False
    again = monitor.receive(ctx, [changed("a", "p1")], "r4-resource")
    assert (again.accepted, again.duplicates) == (0, 1)
