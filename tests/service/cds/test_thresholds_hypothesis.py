"""Property tests: unit conversion and rounding before comparison, in both unit systems (REFERENCE §2.1)."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from service.cds.rules import rnd
from tests.builders import ALB, CA, CA_MOL, P_MOL, P, esrd, obs

CA_MMOL_TO_MG = Decimal("4.0078")
P_MMOL_TO_MG = Decimal("3.0974")

two_dp = st.decimals(min_value=Decimal("1.00"), max_value=Decimal("20.00"), places=2)


def _near(threshold: str) -> st.SearchStrategy[Decimal]:
    t = Decimal(threshold)
    return st.sampled_from([t - Decimal("0.01"), t, t + Decimal("0.01")]) | st.decimals(min_value=t - 1, max_value=t + 1, places=2)


@settings(max_examples=60, deadline=None)
@given(p=_near("5.5"), si=st.booleans())
def test_renal_phosphate_threshold_both_unit_systems(run, p: Decimal, si: bool) -> None:
    value, code, unit = (p, P, "mg/dL")
    if si:
        # The same amount reported in mmol/L with six decimals: rounding after conversion recovers p.
        value, code, unit = ((p / P_MMOL_TO_MG).quantize(Decimal("0.000001")), P_MOL, "mmol/L")
    ev = run(esrd(), obs(code, str(value), unit, days=2), obs(CA, 8.0, days=2), obs(ALB, 4.2, "g/dL", days=2))
    assert ev.assessment.metastatic_calcification.hyperphosphatemia is (p > Decimal("5.5"))


@settings(max_examples=60, deadline=None)
@given(ca=_near("10.2"), si=st.booleans())
def test_renal_calcium_threshold_both_unit_systems(run, ca: Decimal, si: bool) -> None:
    value, code, unit = (ca, CA, "mg/dL")
    if si:
        value, code, unit = ((ca / CA_MMOL_TO_MG).quantize(Decimal("0.000001")), CA_MOL, "mmol/L")
    ev = run(esrd(), obs(code, str(value), unit, days=2), obs(P, 3.0, days=2), obs(ALB, 4.2, "g/dL", days=2))
    assert ev.assessment.metastatic_calcification.hypercalcemia is (ca > Decimal("10.2"))


@settings(max_examples=80, deadline=None)
@given(
    ca=st.decimals(min_value=Decimal("8.00"), max_value=Decimal("12.00"), places=2),
    p=st.decimals(min_value=Decimal("4.00"), max_value=Decimal("9.00"), places=2),
)
def test_product_rounded_to_one_decimal_before_comparison(run, ca: Decimal, p: Decimal) -> None:
    ev = run(obs(CA, str(ca), days=2), obs(P, str(p), days=2), obs(ALB, 4.2, "g/dL", days=2))
    product = rnd(ca * p, 1)
    cxp = ev.assessment.metastatic_calcification.ca_x_p
    assert cxp is not None and Decimal(str(cxp.value)) == product
    tier = ev.assessment.metastatic_calcification.tier
    if product > 70:
        assert tier == "high"
    elif product >= 55:
        assert tier == "moderate"
    else:
        assert tier != "high"


@settings(max_examples=40, deadline=None)
@given(ca=st.sampled_from(["10.00", "7.00"]))
def test_product_exactly_70_is_not_high(run, ca: str) -> None:
    p = "7.00" if ca == "10.00" else "10.00"
    assert run(obs(CA, ca, days=2), obs(P, p, days=2)).assessment.metastatic_calcification.tier == "moderate"


@settings(max_examples=60, deadline=None)
@given(ca=two_dp, alb=st.decimals(min_value=Decimal("1.50"), max_value=Decimal("5.00"), places=2))
def test_corrected_calcium_is_rounded_decimal_arithmetic(run, ca: Decimal, alb: Decimal) -> None:
    ev = run(obs(CA, str(ca), days=2), obs(ALB, str(alb), "g/dL", days=2))
    expected = rnd(ca + Decimal("0.8") * (Decimal("4.0") - alb), 2) if alb < 4 else ca
    assert Decimal(ev.assessment.calcium["corrected_mg_dl"]) == expected


@settings(max_examples=60, deadline=None)
@given(mg=st.decimals(min_value=Decimal("0.50"), max_value=Decimal("20.00"), places=2))
def test_calcium_mmol_round_trip(catalog, mg: Decimal) -> None:
    mmol = catalog.convert(mg, "mg/dL", "calcium_ionized")
    back = catalog.convert(mmol, "mmol/L", "calcium_total")
    assert rnd(back, 2) == mg
