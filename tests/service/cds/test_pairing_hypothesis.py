"""Pairing picks the usable value nearest in time (ties: the newest) and validates only the candidates it tries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from service.cds.model import CaseFacts, LabSeries, LabValue, PatientInfo, Source
from service.cds.rules import _Ctx
from service.cds.thresholds import Thresholds

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def lab(i: int, hours_ago: int) -> LabValue:
    when = NOW - timedelta(hours=hours_ago)
    source = Source(f"Observation/a{i}", "1", "http://loinc.org", "x", "Albumin")
    return LabValue("albumin", "Albumin", Decimal("3.1"), "g/dL", Decimal("3.1"), "g/dL", when, None, "final", source)


def ctx_for(labs: list[LabValue]) -> _Ctx:
    facts = CaseFacts(patient=PatientInfo("Patient/p", True, None, None), labs={"albumin": LabSeries(labs, lambda lab: lab)})
    return _Ctx(facts, Thresholds(), NOW, catalog=None)  # type: ignore[arg-type]


def reference(labs: list[LabValue], valid: dict[str, bool], moment: datetime, max_hours: int, days: int) -> LabValue | None:
    """The rule as first written: every in-window value validated, then the nearest within max_hours."""
    best, best_gap = None, None
    for v in labs:
        if not (NOW - timedelta(days=days) <= v.effective <= NOW) or not valid[v.source.reference]:
            continue
        gap = abs(v.effective - moment)
        if gap <= timedelta(hours=max_hours) and (best_gap is None or gap < best_gap):
            best, best_gap = v, gap
    return best


@settings(max_examples=300, deadline=None)
@given(
    hours=st.lists(st.integers(0, 24 * 200), min_size=0, max_size=12),
    validity=st.lists(st.booleans(), min_size=12, max_size=12),
    moment_hours=st.integers(0, 24 * 120),
    max_hours=st.sampled_from([24, 72]),
    days=st.sampled_from([30, 90]),
)
def test_closest_matches_validate_everything_first(hours, validity, moment_hours, max_hours, days) -> None:
    labs = sorted((lab(i, h) for i, h in enumerate(hours)), key=lambda v: v.effective, reverse=True)
    valid = {v.source.reference: validity[i] for i, v in enumerate(labs)}
    ctx = ctx_for(labs)
    ctx.f._valid.update(valid)  # verdicts known up front: no FHIR needed
    moment = NOW - timedelta(hours=moment_hours)
    assert ctx.closest("albumin", days, moment, max_hours) == reference(labs, valid, moment, max_hours, days)


def test_only_the_candidates_tried_are_validated() -> None:
    labs = [lab(0, 1), lab(1, 30), lab(4, 60), lab(2, 700), lab(3, 900)]
    ctx = ctx_for(labs)
    consulted: list[str] = []
    real = ctx.f.usable

    def usable(fact):  # type: ignore[no-untyped-def]
        consulted.append(fact.source.reference)
        return fact.source.reference != "Observation/a0" and real(fact)

    ctx.f.usable = usable  # type: ignore[method-assign]
    assert ctx.closest("albumin", 90, NOW, 72) is labs[1]  # the nearest (a0) is invalid: the next nearest
    assert consulted == ["Observation/a0", "Observation/a1"]  # a4 (in range, farther), a2 and a3 are never validated
