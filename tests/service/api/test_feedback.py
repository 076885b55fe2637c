"""Card feedback (CDS Hooks 2.0 ``POST {service}/feedback``) as the Sandbox sends it, and its audit read."""

from __future__ import annotations

import io
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient

from tests.schema import assert_valid
from tests.service.api.conftest import ADMIN_TOKEN, TESTSERVER
from tests.service.api.support import RISK, Issuer, PatientData, high_risk_dialysis_patient, hook_request

FEEDBACK_URL = f"{TESTSERVER}/cds-services/{RISK}/feedback"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def sandbox_feedback(card: str, outcome: str = "overridden") -> dict[str, Any]:
    """Exactly what the CDS Hooks Sandbox posts when a card is dismissed with a reason."""
    item: dict[str, Any] = {"card": card, "outcome": outcome, "outcomeTimestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
    if outcome == "overridden":
        item["overrideReason"] = {"reason": {"code": "not-clinically-relevant", "system": "https://calcinosis-cds.org/fhir/CodeSystem/override-reason"}}
    else:  # CDS Hooks 2.0: an accepted outcome names the suggestion(s) taken
        item["acceptedSuggestions"] = [{"id": str(uuid.uuid4())}]
    return {"feedback": [item]}


def send(client: TestClient, issuer: Issuer, document: Any, service: str = RISK) -> httpx.Response:
    url = f"{TESTSERVER}/cds-services/{service}/feedback"
    return client.post(f"/cds-services/{service}/feedback", json=document, headers=issuer.bearer(url))


def stored(client: TestClient, card: str) -> list[dict[str, Any]]:
    response = client.get(f"/cds-services/{RISK}/feedback", params={"card": card}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["feedback"]


def issued_card(client: TestClient, issuer: Issuer, user: str = "Practitioner/pr1", patient: PatientData | None = None) -> dict[str, Any]:
    patient = patient or high_risk_dialysis_patient()
    aud = f"{TESTSERVER}/cds-services/{RISK}"
    body = hook_request(RISK, patient.pid, prefetch=patient.prefetch(), userId=user)
    response = client.post(f"/cds-services/{RISK}", json=body, headers=issuer.bearer(aud))
    assert response.status_code == 200, response.text
    return response.json()["cards"][0]


def card_reason(card: dict[str, Any], index: int) -> dict[str, str]:
    """The card's ``index``-th override reason, as the Sandbox sends it back."""
    reason = card["overrideReasons"][index]
    return {"code": reason["code"], "system": reason["system"]}


def test_sandbox_feedback_on_an_issued_card_is_recorded_once(signed_client: TestClient, issuer: Issuer) -> None:
    card = issued_card(signed_client, issuer)
    document = sandbox_feedback(card["uuid"])
    assert_valid(document, "FeedbackRequest")
    reason = card["overrideReasons"][1]
    document["feedback"][0]["overrideReason"]["reason"] = {"code": reason["code"], "system": reason["system"]}

    first = send(signed_client, issuer, document)
    assert first.status_code == 200, first.text
    again = send(signed_client, issuer, document)  # the Sandbox retries; a browser may double-submit
    assert again.status_code == 200, again.text

    rows = stored(signed_client, card["uuid"])
    assert len(rows) == 1
    row = rows[0]
    assert row["service"] == RISK and row["card"] == card["uuid"] and row["outcome"] == "overridden"
    assert row["overrideReason"]["reason"]["code"] == reason["code"]


def test_the_audit_read_says_what_each_card_was_about_and_which_cards_it_never_issued(signed_client: TestClient, issuer: Issuer) -> None:
    """A quality review joins a dismissal to the card shown: patient, topic, rule and when it was issued. Feedback
    naming a card this service has no record of is kept (its audit row may have been dropped) and says so."""
    patient = high_risk_dialysis_patient()
    card = issued_card(signed_client, issuer, patient=patient)
    signed_client.app.state.ctx.issued_cards.flush()  # type: ignore[attr-defined]  # written off the request path
    stranger = str(uuid.uuid4())
    for uuid_ in (card["uuid"], stranger):
        assert send(signed_client, issuer, sandbox_feedback(uuid_)).status_code == 200

    issued = stored(signed_client, card["uuid"])[0]["issued"]
    assert issued["patient"] == f"Patient/{patient.pid}" and issued["topic"] == card["source"]["topic"]["code"]
    assert issued["rule"] == "calciphylaxis.tier" and datetime.fromisoformat(issued["issuedAt"]) <= datetime.now(UTC)
    assert stored(signed_client, stranger)[0]["issued"] is None


def test_two_clinicians_overriding_the_same_card_are_two_feedbacks(signed_client: TestClient, issuer: Issuer) -> None:
    """Two calls about the same patient (each its own hookInstance and user): each clinician's override is kept, with
    its own reason and time; the first one's retried POST is still stored once."""
    patient = high_risk_dialysis_patient()  # the same record for both
    first, second = issued_card(signed_client, issuer, patient=patient), issued_card(signed_client, issuer, "Practitioner/pr2", patient)
    assert first["detail"] == second["detail"]
    dismissals = []
    for card, reason, at in ((first, card_reason(first, 1), "2026-03-01T10:00:00Z"), (second, card_reason(second, 3), "2026-03-01T11:30:00Z")):
        document = sandbox_feedback(card["uuid"])
        document["feedback"][0].update(outcomeTimestamp=at, overrideReason={"reason": reason})
        dismissals.append(document)
    for document in (dismissals[0], dismissals[1], dismissals[0]):
        assert send(signed_client, issuer, document).status_code == 200
    rows = [row for card in (first, second) for row in stored(signed_client, card["uuid"])]
    assert [(r["overrideReason"]["reason"]["code"], datetime.fromisoformat(r["outcomeTimestamp"]).strftime("%H:%M")) for r in rows] == [
        (card_reason(first, 1)["code"], "10:00"),
        (card_reason(second, 3)["code"], "11:30"),
    ]


def test_accepted_feedback_with_suggestions(signed_client: TestClient, issuer: Issuer) -> None:
    card = str(uuid.uuid4())
    document = {
        "feedback": [
            {
                "card": card,
                "outcome": "accepted",
                "outcomeTimestamp": "2026-03-01T10:00:00Z",
                "acceptedSuggestions": [{"id": str(uuid.uuid4())}],
            }
        ]
    }
    assert_valid(document, "FeedbackRequest")
    assert send(signed_client, issuer, document).status_code == 200
    rows = stored(signed_client, card)
    assert [r["outcome"] for r in rows] == ["accepted"]
    assert rows[0]["acceptedSuggestions"] == document["feedback"][0]["acceptedSuggestions"]


def test_overridden_then_accepted_are_two_outcomes(signed_client: TestClient, issuer: Issuer) -> None:
    card = str(uuid.uuid4())
    assert send(signed_client, issuer, sandbox_feedback(card, "overridden")).status_code == 200
    assert send(signed_client, issuer, sandbox_feedback(card, "accepted")).status_code == 200
    assert sorted(r["outcome"] for r in stored(signed_client, card)) == ["accepted", "overridden"]


MARKER = "FEEDBACK-MARKER-51b2"


@pytest.mark.parametrize(
    "document",
    [
        pytest.param({"feedback": []}, id="empty-list"),
        pytest.param({}, id="no-feedback"),
        pytest.param([{"card": MARKER}], id="array"),
        pytest.param({"feedback": [{"card": MARKER, "outcome": "ignored", "outcomeTimestamp": "2026-01-01T00:00:00Z"}]}, id="bad-outcome"),
        pytest.param({"feedback": [{"card": MARKER, "outcome": "accepted"}]}, id="no-timestamp"),
        pytest.param({"feedback": [{"card": "c", "outcome": "accepted", "outcomeTimestamp": MARKER}]}, id="bad-timestamp"),
        pytest.param(
            {"feedback": [{"card": MARKER, "outcome": "overridden", "outcomeTimestamp": "2026-11-22", "overrideReason": {"userComment": MARKER}}]},
            id="date-only-timestamp",
        ),
        pytest.param({"feedback": [{"card": MARKER, "outcome": "overridden", "outcomeTimestamp": "2026-11-22T10:00"}]}, id="timestamp-without-seconds"),
        pytest.param({"feedback": [{"card": MARKER, "outcome": "overridden", "outcomeTimestamp": "2026-W47-1T10:00:00Z"}]}, id="week-date-timestamp"),
        pytest.param({"feedback": [{"card": MARKER, "outcome": "accepted", "outcomeTimestamp": "2026-11-22T10:00:00Z"}]}, id="accepted-without-suggestions"),
        pytest.param(
            {"feedback": [{"card": MARKER, "outcome": "accepted", "outcomeTimestamp": "2026-11-22T10:00:00Z", "acceptedSuggestions": []}]},
            id="accepted-with-no-suggestion",
        ),
        pytest.param({"feedback": [{"outcome": "accepted", "outcomeTimestamp": "2026-01-01T00:00:00Z"}]}, id="no-card"),
        pytest.param({"feedback": [{"card": "x" * 200, "outcome": "accepted", "outcomeTimestamp": "2026-01-01T00:00:00Z"}]}, id="long-card"),
        pytest.param({"feedback": [{"card": "c", "outcome": "accepted", "outcomeTimestamp": "2026-01-01T00:00:00Z", MARKER: 1}]}, id="extra-field"),
        pytest.param(
            {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00:00Z", "overrideReason": {"reason": {"code": MARKER}}}]},
            id="reason-without-system",
        ),
    ],
)
def test_invalid_feedback_is_400(signed_client: TestClient, issuer: Issuer, document: Any) -> None:
    response = send(signed_client, issuer, document)
    assert response.status_code == 400, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert MARKER not in response.text


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        pytest.param("2026-11-22T10:00:00Z", "2026-11-22T10:00:00+00:00", id="utc"),
        pytest.param("2026-11-22T10:00:00.123+01:00", "2026-11-22T09:00:00.123000+00:00", id="offset-and-fraction"),
        pytest.param("2026-11-22t10:00:00z", "2026-11-22T10:00:00+00:00", id="lower-case-separators"),
        pytest.param("2026-11-22T10:00:00", "2026-11-22T10:00:00+00:00", id="no-offset-read-as-utc"),
    ],
)
def test_a_date_time_outcome_timestamp_is_stored(signed_client: TestClient, issuer: Issuer, timestamp: str, expected: str) -> None:
    card = str(uuid.uuid4())
    document = {"feedback": [{"card": card, "outcome": "overridden", "outcomeTimestamp": timestamp}]}
    assert send(signed_client, issuer, document).status_code == 200
    [row] = stored(signed_client, card)
    read = datetime.fromisoformat(row["outcomeTimestamp"])
    assert (read if read.tzinfo else read.replace(tzinfo=UTC)).astimezone(UTC).isoformat() == expected


def test_malformed_json_feedback_is_400(signed_client: TestClient, issuer: Issuer) -> None:
    response = signed_client.post(
        f"/cds-services/{RISK}/feedback", content=b'{"feedback": [', headers={"Content-Type": "application/json", **issuer.bearer(FEEDBACK_URL)}
    )
    assert response.status_code == 400


def test_feedback_for_an_unknown_service_is_404(signed_client: TestClient, issuer: Issuer) -> None:
    response = send(signed_client, issuer, sandbox_feedback(str(uuid.uuid4())), service="no-such-service")
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"


def test_feedback_without_a_token_is_401(signed_client: TestClient) -> None:
    response = signed_client.post(f"/cds-services/{RISK}/feedback", json=sandbox_feedback(str(uuid.uuid4())))
    assert response.status_code == 401
    assert "www-authenticate" in response.headers


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": ADMIN_TOKEN}], ids=["none", "wrong", "no-scheme"])
def test_feedback_audit_read_needs_the_admin_token(signed_client: TestClient, headers: dict[str, str]) -> None:
    response = signed_client.get(f"/cds-services/{RISK}/feedback", headers=headers)
    assert response.status_code == 401
    assert "feedback" not in response.json()


def test_feedback_audit_read_needs_the_admin_token_in_development_mode_too(make_client: Callable[..., TestClient]) -> None:
    client = make_client(dev_mode=True)
    assert client.get(f"/cds-services/{RISK}/feedback").status_code == 401
    assert client.get(f"/cds-services/{RISK}/feedback", headers=ADMIN).status_code == 200


def test_feedback_in_development_mode_needs_no_jwt(make_client: Callable[..., TestClient]) -> None:
    client = make_client(dev_mode=True)
    card = str(uuid.uuid4())
    assert client.post(f"/cds-services/{RISK}/feedback", json=sandbox_feedback(card)).status_code == 200
    assert len(stored(client, card)) == 1


def test_feedback_is_counted(signed_client: TestClient, issuer: Issuer) -> None:
    assert send(signed_client, issuer, sandbox_feedback(str(uuid.uuid4()))).status_code == 200
    assert 'cds_feedback_total{outcome="overridden",service="calcinosis-risk"}' in signed_client.get("/metrics").text


def test_an_unexpected_error_is_logged_with_the_route_not_the_path_as_sent(
    monkeypatch: pytest.MonkeyPatch, make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """A database without the schema (never migrated) makes the audit read fail unexpectedly: a 500, and a log line that
    names the route's template, not the path segments the caller chose."""
    client = make_client(database_url=f"sqlite:///{tmp_path / 'never-migrated.sqlite'}")
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    response = client.get("/cds-services/John%20Smith%20MRN%20123/feedback", headers=ADMIN)
    assert response.status_code == 500
    assert response.json()["issue"][0]["diagnostics"] == "internal error"
    [line] = [orjson.loads(text) for text in captured.getvalue().splitlines() if text.startswith("{") and '"unhandled_error"' in text]
    assert (line["route"], line["error"]) == ("/cds-services/{service_id}/feedback", "OperationalError")
    assert "Smith" not in captured.getvalue()


@pytest.mark.parametrize(
    "timestamp",
    ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59-00:01"],
    ids=["before-year-1-in-utc", "after-year-9999-in-utc", "one-minute-past"],
)
def test_an_outcome_timestamp_with_no_utc_form_is_400(signed_client: TestClient, issuer: Issuer, timestamp: str) -> None:
    """Valid RFC 3339, but outside what a datetime holds once in UTC (as it is stored): the caller's error, not a 500."""
    card = str(uuid.uuid4())
    response = send(signed_client, issuer, {"feedback": [{"card": card, "outcome": "overridden", "outcomeTimestamp": timestamp}]})
    assert response.status_code == 400, response.text
    assert response.json()["issue"][0]["diagnostics"] == "invalid feedback: outcomeTimestamp is not a date-time"
    assert stored(signed_client, card) == []


def test_the_extreme_outcome_timestamps_that_have_a_utc_form_are_stored(signed_client: TestClient, issuer: Issuer) -> None:
    for timestamp, expected in [("0001-01-01T00:00:00-01:00", "0001-01-01T01:00:00+00:00"), ("9999-12-31T23:59:59+01:00", "9999-12-31T22:59:59+00:00")]:
        card = str(uuid.uuid4())
        assert send(signed_client, issuer, {"feedback": [{"card": card, "outcome": "overridden", "outcomeTimestamp": timestamp}]}).status_code == 200
        [row] = stored(signed_client, card)
        assert datetime.fromisoformat(row["outcomeTimestamp"]).astimezone(UTC).isoformat() == expected


def _with_nul(where: str) -> tuple[dict[str, Any], str]:
    card = str(uuid.uuid4())
    item: dict[str, Any] = {"card": card, "outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00:00Z",
                            "overrideReason": {"reason": {"system": "https://example.org/reasons", "code": "other"}, "userComment": "fine"}}
    if where == "card":
        item["card"] = card[:8] + "\u0000"
    elif where == "userComment":
        item["overrideReason"]["userComment"] = "patient said\u0000NUL"
    elif where == "reason.code":
        item["overrideReason"]["reason"]["code"] = "other\u0000"
    elif where == "acceptedSuggestions.id":
        item.update(outcome="accepted", acceptedSuggestions=[{"id": "s\u0000"}])
    return {"feedback": [item]}, card


@pytest.mark.parametrize("where", ["card", "userComment", "reason.code", "acceptedSuggestions.id"])
def test_a_nul_character_in_feedback_is_400_on_postgresql(make_client: Callable[..., TestClient], pg_url: str, where: str) -> None:
    """PostgreSQL cannot store U+0000 in text or JSONB (a 500 before): refused as invalid, the field named, no echo."""
    client = make_client(dev_mode=True, database_url=pg_url)
    document, card = _with_nul(where)
    response = client.post(f"/cds-services/{RISK}/feedback", json=document)
    assert response.status_code == 400, response.text
    diagnostics = response.json()["issue"][0]["diagnostics"]
    assert diagnostics.startswith("invalid feedback: feedback.0.") and where.split(".")[0] in diagnostics
    assert "NUL" not in response.text and "\\u0000" not in response.text
    assert stored(client, card) == []
    clean, clean_card = _with_nul("nowhere")
    assert client.post(f"/cds-services/{RISK}/feedback", json=clean).status_code == 200  # the same client stores feedback
    assert len(stored(client, clean_card)) == 1
