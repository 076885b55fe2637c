"""Issued cards are recorded in batches off the request path, and flushed on close."""

from __future__ import annotations

from service.db.migrate import upgrade_to_head
from service.db.repositories import IssuedCardRepository
from service.db.session import make_engine, make_session_factory, session_scope
from service.usecases.audit import IssuedCardRecorder


def card(uuid: str) -> dict:
    return {"uuid": uuid, "source": {"topic": {"code": "calciphylaxis-risk"}}, "detail": "x\n\nRule `calciphylaxis.tier` · rules 1"}


def test_recorder_batches_and_flushes_on_close(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'a.sqlite'}"
    upgrade_to_head(url)
    sessions = make_session_factory(make_engine(url))
    recorder = IssuedCardRecorder(sessions, interval_s=60)  # no timed flush during the test
    recorder.add("calcinosis-risk", "Patient/p1", [card("u1"), card("u2")])
    recorder.add("calcinosis-risk", "Patient/p1", [card("u1")])  # the same card shown again: one row
    recorder.close()
    with session_scope(sessions) as session:
        rows = IssuedCardRepository(session).list_for_patient("Patient/p1")
        assert sorted(r.card_uuid for r in rows) == ["u1", "u2"]
        assert {r.rule_id for r in rows} == {"calciphylaxis.tier"}


def test_full_queue_drops_oldest_and_counts(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'b.sqlite'}"
    upgrade_to_head(url)
    recorder = IssuedCardRecorder(make_session_factory(make_engine(url)), interval_s=60, max_pending=2)
    recorder.add("calcinosis-risk", "Patient/p1", [card("a"), card("b"), card("c")])
    assert recorder.dropped == 1
    assert recorder.flush() == 2
    recorder.close()
