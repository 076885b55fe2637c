"""The medication-order-risk card (order-select/order-sign) on the pure core: when it fires, its indicator, and which
suggestions it offers in which setting (a binder swap only in kidney failure with a phosphate above the M2 threshold
and no current non-calcium binder, and the card says why when it is withheld; no removal of an IV calcium order)."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from service.cds.engine import Evaluation
from service.cds.orders import order_risk_cards, patient_settings
from service.cds.thresholds import Thresholds
from service.terminology.catalog import Catalog
from tests import builders as b
from tests.service.api.support import CALCIUM_ACETATE, SEVELAMER, WARFARIN, draft_order

CALCIUM_GLUCONATE_INJECTION = "1668250"  # parenteral product
CALCIUM_CARBONATE = "282465"  # calcium carbonate 1250 MG Oral Tablet

TRANSPLANT = b.condition("Z94.0", b.ICD10, display="Kidney transplant status")
CKD4 = b.condition("N18.4", b.ICD10, display="Chronic kidney disease, stage 4 (severe)")
CALCIPHYLAXIS = b.condition("237900002", display="Calciphylaxis")
ESRD = b.esrd()
ESRF_WITH_TRANSPLANT = b.condition("236436003", display="End stage renal failure with renal transplant")


def egfr(value: float) -> dict[str, Any]:
    return b.obs(b.EGFR, value, "mL/min/{1.73_m2}", days=5)


def phosphate(value: float, days: float = 5) -> dict[str, Any]:
    return b.obs(b.P, value, days=days)


def draft(code: str, display: str | None = None) -> dict[str, Any]:
    return draft_order("draft-1", code, "p1", display=display)


@pytest.fixture
def cards_for(run: Callable[..., Evaluation], catalog: Catalog) -> Callable[..., list[dict[str, Any]]]:
    def _cards(order: dict[str, Any], *record: dict[str, Any]) -> list[dict[str, Any]]:
        evaluation = run(*record)
        return order_risk_cards([order], evaluation.outcome, evaluation.facts, evaluation.context, catalog, {})

    return _cards


def actions(card: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for s in card.get("suggestions", []) for a in s["actions"]]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        pytest.param((ESRD,), {"kidney_failure"}, id="esrd"),
        pytest.param((egfr(12),), {"kidney_failure"}, id="egfr-below-15"),
        pytest.param((TRANSPLANT, egfr(55)), {"kidney_transplant"}, id="transplant-functioning"),
        pytest.param((TRANSPLANT, egfr(12)), {"kidney_failure", "kidney_transplant"}, id="transplant-failing"),
        pytest.param((ESRF_WITH_TRANSPLANT, egfr(58)), {"kidney_transplant"}, id="esrf-with-transplant-functioning"),
        pytest.param((ESRF_WITH_TRANSPLANT, egfr(12)), {"kidney_failure", "kidney_transplant"}, id="esrf-with-transplant-failing"),
        pytest.param((CKD4,), {"ckd4"}, id="ckd4"),
        pytest.param((egfr(22),), {"ckd4"}, id="egfr-15-29"),
        pytest.param((CALCIPHYLAXIS, egfr(80)), {"established_calciphylaxis"}, id="established-non-renal"),
        pytest.param((egfr(80),), set(), id="non-renal"),
    ],
)
def test_patient_settings(run: Callable[..., Evaluation], record: tuple[dict[str, Any], ...], expected: set[str]) -> None:
    assert patient_settings(run(*record).outcome) == expected


@pytest.mark.parametrize(
    "record",
    [(ESRD, phosphate(6.2)), (egfr(12), phosphate(6.2)), (CALCIPHYLAXIS, ESRD, phosphate(6.2)), (ESRD, phosphate(5.51))],
    ids=["esrd", "egfr-below-15", "established-in-kidney-failure", "phosphate-just-above-5.5"],
)
def test_calcium_binder_in_kidney_failure_with_a_high_phosphate_offers_a_non_calcium_binder(
    cards_for: Callable[..., list[dict[str, Any]]], record: tuple[dict[str, Any], ...]
) -> None:
    [card] = cards_for(draft(CALCIUM_ACETATE), *record)
    assert card["indicator"] == "warning"
    assert card["selectionBehavior"] == "at-most-one"
    [update] = [a for a in actions(card) if a["type"] == "update"]
    assert [c["code"] for c in update["resource"]["medicationCodeableConcept"]["coding"]] == [SEVELAMER]
    assert "dosageInstruction" not in update["resource"]
    assert [a["resourceId"] for a in actions(card) if a["type"] == "delete"] == ["MedicationRequest/draft-1"]
    assert "is not proposed" not in card["detail"]


@pytest.mark.parametrize(
    ("record", "why"),
    [
        pytest.param((ESRD, phosphate(5.5)), "latest phosphate not above 5.5 mg/dL", id="phosphate-5.5-is-not-above"),
        pytest.param((ESRD, phosphate(2.4)), "latest phosphate not above 5.5 mg/dL", id="phosphate-low"),
        pytest.param((ESRD, phosphate(6.2, days=120)), "no valid phosphate result in the window", id="phosphate-stale"),
        pytest.param((ESRD,), "no valid phosphate result in the window", id="no-phosphate"),
    ],
)
def test_calcium_binder_in_kidney_failure_without_a_high_phosphate_offers_removal_only(
    cards_for: Callable[..., list[dict[str, Any]]], record: tuple[dict[str, Any], ...], why: str
) -> None:
    """The switch to a non-calcium binder treats hyperphosphatemia (REFERENCE §2.3 M2: P > 5.5 mg/dL in R1/R2). With a
    normal phosphate the calcium salt may be given for the calcium itself (hypocalcaemia), so no swap is proposed."""
    [card] = cards_for(draft(CALCIUM_ACETATE), *record)
    assert card["indicator"] == "warning"
    assert [a["type"] for a in actions(card)] == ["delete"]
    assert f"is not proposed: {why}." in card["detail"]


def test_the_phosphate_condition_reads_the_operators_threshold(run: Callable[..., Evaluation], catalog: Catalog) -> None:
    """The threshold is Thresholds.phosphate_renal_above, not a constant: raised to 6.5, a phosphate of 6.2 no longer
    brings the swap, and the card names the operator's threshold."""
    order, record = draft(CALCIUM_ACETATE), (ESRD, phosphate(6.2))
    for thresholds, expected in ((Thresholds(), ["update", "delete"]), (Thresholds(phosphate_renal_above=Decimal("6.5")), ["delete"])):
        evaluation = run(*record, thresholds=thresholds)
        [card] = order_risk_cards([order], evaluation.outcome, evaluation.facts, evaluation.context, catalog, {})
        assert [a["type"] for a in actions(card)] == expected
    assert "is not proposed: latest phosphate not above 6.5 mg/dL." in card["detail"]


def test_calcium_carbonate_for_a_hypocalcaemic_patient_already_on_sevelamer_offers_removal_only(
    cards_for: Callable[..., list[dict[str, Any]]],
) -> None:
    """The pharmacist's case: ESRD, Ca 7.1, P 2.4, an active sevelamer order; sevelamer must not be proposed again, and
    the card says why."""
    [card] = cards_for(draft(CALCIUM_CARBONATE), ESRD, *b.renal_panel(ca=7.1, p=2.4, alb=3.9, pth=300, days=2), b.med_request(SEVELAMER))
    assert [a["type"] for a in actions(card)] == ["delete"]
    assert "is not proposed: latest phosphate not above 5.5 mg/dL; already on a non-calcium phosphate binder." in card["detail"]


@pytest.mark.parametrize(
    ("sevelamer", "expected"),
    [
        pytest.param(b.med_request(SEVELAMER), ["delete"], id="active"),
        pytest.param(b.med_request(SEVELAMER, status="on-hold"), ["delete"], id="on-hold"),
        pytest.param(b.med_request(SEVELAMER, status="stopped"), ["update", "delete"], id="stopped"),
    ],
)
def test_a_current_non_calcium_binder_withholds_the_swap_even_with_a_high_phosphate(
    cards_for: Callable[..., list[dict[str, Any]]], sevelamer: dict[str, Any], expected: list[str]
) -> None:
    [card] = cards_for(draft(CALCIUM_ACETATE), ESRD, phosphate(7.0), sevelamer)
    assert [a["type"] for a in actions(card)] == expected
    assert ("is not proposed: already on a non-calcium phosphate binder." in card["detail"]) == (expected == ["delete"])


def test_calcium_carbonate_in_non_uremic_calciphylaxis_offers_removal_only(cards_for: Callable[..., list[dict[str, Any]]]) -> None:
    """The pharmacist's case: calciphylaxis with eGFR 88 and P 3.1. The KDIGO advice to restrict calcium-based binders
    is for CKD G5D; it does not apply, so sevelamer is not proposed (the card still warns and offers removal)."""
    [card] = cards_for(
        draft(CALCIUM_CARBONATE), CALCIPHYLAXIS, egfr(88), *b.renal_panel(ca=8.9, p=3.1, alb=3.9, pth=40, days=2)
    )
    assert card["indicator"] == "warning"
    assert [a["type"] for a in actions(card)] == ["delete"]
    assert "is not proposed: offered only in kidney failure." in card["detail"]


def test_end_stage_renal_failure_with_transplant_is_r2_on_a_transplant_basis(run: Callable[..., Evaluation]) -> None:
    """SNOMED 236436003 stays R2 (REFERENCE §2.2), but the kidney failure it names is treated by the transplant: the
    renal context rests on the transplant, as for 737295003, not on ESRD."""
    outcome = run(ESRF_WITH_TRANSPLANT, egfr(58)).outcome
    assert outcome.renal == "R2"
    assert outcome.renal_bases == {"kidney_transplant"}


@pytest.mark.parametrize(
    "record",
    [(TRANSPLANT, egfr(55), phosphate(6.2)), (ESRF_WITH_TRANSPLANT, egfr(58), phosphate(6.2)), (CKD4, phosphate(6.2))],
    ids=["transplant", "esrf-with-transplant", "ckd4"],
)
def test_calcium_binder_after_a_transplant_or_in_ckd4_warns_without_proposing_a_swap(
    cards_for: Callable[..., list[dict[str, Any]]], record: tuple[dict[str, Any], ...]
) -> None:
    """Calcium carbonate or acetate there is often a calcium supplement: sevelamer is not the sound alternative."""
    [card] = cards_for(draft(CALCIUM_ACETATE), *record)
    assert card["indicator"] == "warning"
    assert [a["type"] for a in actions(card)] == ["delete"]


def test_iv_calcium_order_is_information_without_a_removal(cards_for: Callable[..., list[dict[str, Any]]]) -> None:
    """IV calcium is often emergency treatment (hyperkalaemia): the card informs, it does not propose removing it."""
    [card] = cards_for(draft(CALCIUM_GLUCONATE_INJECTION), ESRD)
    assert card["indicator"] == "info"
    assert "suggestions" not in card and "selectionBehavior" not in card
    assert "monitor the IV site" in card["detail"]
    assert "case reports" in card["detail"]


def test_warfarin_for_a_transplant_recipient_warns_and_offers_removal_only(cards_for: Callable[..., list[dict[str, Any]]]) -> None:
    [card] = cards_for(draft(WARFARIN), TRANSPLANT, egfr(55))
    assert card["indicator"] == "warning"
    assert [a["type"] for a in actions(card)] == ["delete"]


def test_no_card_outside_a_renal_context_or_established_calciphylaxis(cards_for: Callable[..., list[dict[str, Any]]]) -> None:
    assert cards_for(draft(CALCIUM_ACETATE), egfr(80)) == []


def test_card_text_names_the_drug_once_whether_or_not_the_order_carries_a_display(cards_for: Callable[..., list[dict[str, Any]]]) -> None:
    [plain] = cards_for(draft(CALCIUM_ACETATE), ESRD)
    assert plain["detail"].startswith("**This order adds a calcium-based phosphate binder** in a patient with renal context R2.")
    [card] = cards_for(draft(CALCIUM_ACETATE, display="calcium acetate 667 MG Oral Capsule"), ESRD)
    assert card["detail"].startswith("**The order for calcium acetate 667 MG Oral Capsule adds a calcium-based phosphate binder**")
