"""Issued cards and CDS Hooks feedback: the same outcome for a card is stored once."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db.repositories import CardFeedbackRepository, IssuedCardRepository
from service.db.session import session_scope

SERVICE = "calcinosis-risk"


def test_feedback_is_idempotent(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    reason = {"reason": {"code": "patient-refused", "system": "urn:x"}, "userComment": "n/a"}
    with session_scope(db_session_factory) as session:
        repo = CardFeedbackRepository(session)
        assert repo.record_feedback(
            service_id=SERVICE, card_uuid="c1", outcome="overridden", outcome_timestamp=t0, override_reason=reason, now=t0
        )
        assert not repo.record_feedback(service_id=SERVICE, card_uuid="c1", outcome="overridden", outcome_timestamp=t0)
        assert repo.record_feedback(
            service_id=SERVICE,
            card_uuid="c1",
            outcome="accepted",
            outcome_timestamp=t0,
            accepted_suggestions=[{"id": "s1"}],
            now=t0 + timedelta(seconds=1),
        )
        assert repo.record_feedback(service_id="other-service", card_uuid="c1", outcome="accepted", outcome_timestamp=t0)
        with pytest.raises(ValueError):
            repo.record_feedback(service_id=SERVICE, card_uuid="c1", outcome="ignored", outcome_timestamp=t0)
    with session_scope(db_session_factory) as session:
        repo = CardFeedbackRepository(session)
        mine = repo.list_feedback(service_id=SERVICE)
        assert [(f.card_uuid, f.outcome) for f in mine] == [("c1", "accepted"), ("c1", "overridden")]
        assert mine[1].override_reason == reason
        assert mine[0].accepted_suggestions == [{"id": "s1"}]
        assert mine[1].outcome_timestamp == t0
        assert len(repo.list_feedback(card_uuid="c1")) == 3
        assert len(repo.list_feedback(card_uuid="c1", limit=1)) == 1
        assert [f.outcome for f in repo.list_feedback(service_id=SERVICE, since=t0 + timedelta(seconds=1))] == ["accepted"]


def test_issued_cards_and_the_audit_join(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        cards = IssuedCardRepository(session)
        cards.record_many(
            [{"card_uuid": "c1", "service_id": SERVICE, "patient_ref": "Patient/p1", "topic": "calciphylaxis", "rule_id": "calci.high"}],
            issued_at=t0,
        )
        # a known uuid is not stored again (the card read below keeps its rule and time)
        cards.record_many([{"card_uuid": "c1", "service_id": SERVICE, "patient_ref": "Patient/p1", "topic": None, "rule_id": None}])
        CardFeedbackRepository(session).record_feedback(
            service_id=SERVICE, card_uuid="c1", outcome="accepted", outcome_timestamp=t0, now=t0
        )
        CardFeedbackRepository(session).record_feedback(
            service_id=SERVICE, card_uuid="unknown", outcome="accepted", outcome_timestamp=t0, now=t0 + timedelta(seconds=1)
        )
    with session_scope(db_session_factory) as session:
        cards = IssuedCardRepository(session)
        card = cards.get("c1")
        assert card is not None and card.rule_id == "calci.high" and card.issued_at == t0
        assert [c.card_uuid for c in cards.list_for_patient("Patient/p1")] == ["c1"]
        joined = CardFeedbackRepository(session).list_feedback_with_cards(service_id=SERVICE)
        assert [(f.card_uuid, c.rule_id if c else None) for f, c in joined] == [("unknown", None), ("c1", "calci.high")]


def test_issued_cards_recorded_in_one_batch_skip_known_uuids(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    row = {"service_id": SERVICE, "patient_ref": "Patient/p2", "topic": "calciphylaxis", "rule_id": "calci.high"}
    with session_scope(db_session_factory) as session:
        IssuedCardRepository(session).record_many([{**row, "card_uuid": "b1"}, {**row, "card_uuid": "b2"}], issued_at=t0)
    with session_scope(db_session_factory) as session:
        # a batch repeating a stored uuid and one of its own: each card is stored once, the first row wins
        IssuedCardRepository(session).record_many(
            [{**row, "card_uuid": "b1", "rule_id": "other"}, {**row, "card_uuid": "b3"}, {**row, "card_uuid": "b3"}], issued_at=t0
        )
        IssuedCardRepository(session).record_many([])
    with session_scope(db_session_factory) as session:
        stored = {c.card_uuid: c.rule_id for c in IssuedCardRepository(session).list_for_patient("Patient/p2")}
    assert stored == {"b1": "calci.high", "b2": "calci.high", "b3": "calci.high"}
