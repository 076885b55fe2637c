"""Helpers of the use-case tests."""

from __future__ import annotations

from service.db.models import EventStatus
from service.queue import TASK_PROCESS_EVENT, MemoryQueue
from service.usecases import monitor
from service.usecases.monitor import MonitorContext


def drain(ctx: MonitorContext) -> list[tuple[int, str]]:
    """Run every queued ledger event (and the ones they queue) as a worker would, a permanent error marking the
    event failed; returns (event id, status) in the order they ran."""
    queue = ctx.queue
    assert isinstance(queue, MemoryQueue)
    done: list[tuple[int, str]] = []
    while True:
        pending = [args[0] for name, args, _ in queue.sent if name == TASK_PROCESS_EVENT and args[0] not in {e for e, _ in done}]
        if not pending:
            return done
        for event_id in pending:
            try:
                status = monitor.process_event(ctx, event_id)
            except monitor.PermanentEventError as exc:
                monitor.mark_failed(ctx, event_id, exc)
                status = EventStatus.FAILED
            done.append((event_id, status))
