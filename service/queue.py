"""The task-queue port, and enqueue-after-commit.

The service sends tasks by name (``send_task``) and never imports the ``workers`` package. Jobs
collected during a transaction are sent only after it commits and dropped on rollback, so a worker
never looks for a row that is not there yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from service.db.session import session_scope

if TYPE_CHECKING:
    from service.config import Settings

#: Task name prefix → queue (CONTRACT/issue: queues for ingest, evaluate and write-back).
QUEUES = {"cds.ingest": "ingest", "cds.maintenance": "ingest", "cds.evaluate": "evaluate", "cds.writeback": "writeback"}
TASK_PROCESS_EVENT = "cds.ingest.process_event"
TASK_EVALUATE = "cds.evaluate.patient"
TASK_WRITEBACK = "cds.writeback.evaluation"
TASK_SWEEP = "cds.maintenance.sweep"
TASK_RECONCILE = "cds.maintenance.reconcile"


def queue_for(task_name: str) -> str:
    return QUEUES[task_name.rsplit(".", 1)[0]]


class TaskQueue(Protocol):
    def send(self, name: str, args: list[Any], countdown: float | None = None) -> None: ...


class CeleryQueue:
    """Producer side of Celery: a minimal app on the same broker, sending by task name.

    Publishing is bounded in time: with a Redis broker that accepts connections but never answers, a send fails
    within seconds (each wait for the connection or for an answer lasts at most ``socket_timeout_s``; a failed
    publish is retried at most ``publish_max_retries`` times) instead of blocking its caller, and the notification
    receiver's group commit behind it, without limit. The caller's transaction is committed by then
    (:class:`NotSent`): the sweeper sends the work once the broker answers again."""

    def __init__(self, broker_url: str, *, socket_timeout_s: float | None = None, publish_max_retries: int = 1) -> None:
        from celery import Celery

        transport_options: dict[str, Any] = {"max_retries": 1}
        if socket_timeout_s is not None and broker_url.startswith(("redis://", "rediss://")):
            transport_options.update(socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s)
        self.app = Celery("calcinosis-cds-producer", broker=broker_url, set_as_current=False)
        self.app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_retry_on_startup=False,
            broker_connection_max_retries=1,
            broker_transport_options=transport_options,
            task_publish_retry_policy={"max_retries": publish_max_retries, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        )
        if socket_timeout_s is not None:
            self.app.conf.broker_connection_timeout = socket_timeout_s

    @classmethod
    def from_settings(cls, settings: Settings) -> CeleryQueue:
        return cls(
            settings.effective_broker_url,
            socket_timeout_s=settings.broker_socket_timeout_s,
            publish_max_retries=settings.broker_publish_max_retries,
        )

    def send(self, name: str, args: list[Any], countdown: float | None = None) -> None:
        self.app.send_task(name, args=args, countdown=countdown, queue=queue_for(name))

    def close(self) -> None:
        self.app.close()


class MemoryQueue:
    """Records sent jobs (for tests and the offline CLI); sends nothing."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], float | None]] = []

    def send(self, name: str, args: list[Any], countdown: float | None = None) -> None:
        self.sent.append((name, list(args), countdown))


class NotSent(Exception):
    """The transaction committed, but sending its jobs failed (``__cause__``). Nothing is lost: the ledger and the
    evaluation queue hold the work, and the sweeper (or a redelivery) sends it again."""


@dataclass
class Jobs:
    items: list[tuple[str, list[Any], float | None]] = field(default_factory=list)

    def add(self, name: str, *args: Any, countdown: float | None = None) -> None:
        self.items.append((name, list(args), countdown))

    def send(self, queue: TaskQueue) -> None:
        """Send every job, after the commit that made them; a broker failure is :class:`NotSent`."""
        try:
            for name, args, countdown in self.items:
                queue.send(name, args, countdown)
        except Exception as exc:  # any broker client's error
            raise NotSent() from exc


@contextmanager
def unit_of_work(sessions: sessionmaker[Session], queue: TaskQueue) -> Iterator[tuple[Session, Jobs]]:
    """A transaction whose jobs are sent after commit (and never if it rolls back)."""
    jobs = Jobs()
    with session_scope(sessions) as session:
        yield session, jobs
    jobs.send(queue)
