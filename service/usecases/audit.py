"""Issued-card audit rows, written in batches off the request path.

Every card returned to an EHR is recorded (uuid, service, patient, topic, rule) so feedback can be joined to what
was shown. Writing one row per card inside each call cost about an eighth of a call's CPU; the recorder queues
them and a background thread writes each batch in one transaction. A full queue drops the oldest rows and
counts them (audit completeness is traded for never slowing or failing an EHR call), and ``close`` flushes.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.db.repositories import IssuedCardRepository
from service.db.session import session_scope
from service.logging import get_logger

log = get_logger("calcinosis-cds.audit")


class IssuedCardRecorder:
    def __init__(self, sessions: sessionmaker[Session], *, interval_s: float = 0.5, max_pending: int = 100_000) -> None:
        self.sessions = sessions
        self.interval_s = interval_s
        self._pending: deque[dict[str, Any]] = deque(maxlen=max_pending)
        self.dropped = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="issued-cards", daemon=True)
        self._thread.start()

    def add(self, service_id: str, patient_ref: str, cards: list[dict[str, Any]]) -> None:
        for card in cards:
            if len(self._pending) == self._pending.maxlen:
                self.dropped += 1
            self._pending.append(
                {
                    "card_uuid": card["uuid"],
                    "service_id": service_id,
                    "patient_ref": patient_ref,
                    "topic": card["source"]["topic"]["code"],
                    "rule_id": card["detail"].rsplit("Rule `", 1)[-1].split("`", 1)[0],
                }
            )

    def flush(self) -> int:
        batch: list[dict[str, Any]] = []
        while self._pending:
            batch.append(self._pending.popleft())
        if not batch:
            return 0
        try:
            with session_scope(self.sessions) as session:
                IssuedCardRepository(session).record_many(batch)
        except Exception as exc:
            log.warning("issued_cards_not_recorded", rows=len(batch), error=type(exc).__name__)
            return 0
        return len(batch)

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        self.flush()
