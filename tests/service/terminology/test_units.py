"""Catalog.convert: every analyte and accepted unit, the REFERENCE §1.6 factors, aliases and refusals."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.terminology.catalog import Catalog, UnitConversionError

# REFERENCE §1.6, derived from the molar masses in analytes.yaml.
CA_MG_DL_PER_MMOL_L = Decimal("4.0078")
P_MG_DL_PER_MMOL_L = Decimal("3.0974")
PTH_PG_ML_PER_PMOL_L = Decimal("9.425")
VITD25_NMOL_L_PER_NG_ML = Decimal("1000") / Decimal("400.64")  # 2.4960
VITD125_PMOL_L_PER_PG_ML = Decimal("1000") / Decimal("416.64")  # 2.4002
MG_MG_DL_PER_MMOL_L = Decimal("2.4305")
CREA_UMOL_L_PER_MG_DL = Decimal("10000") / Decimal("113.12")  # 88.40

values = st.decimals(min_value=Decimal("0.001"), max_value=Decimal("10000"), places=3, allow_nan=False, allow_infinity=False)


def close(a: Decimal, b: Decimal, rel: Decimal = Decimal("1e-12")) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), Decimal(1))


# ----------------------------------------------------------------------------- every analyte, every unit
def test_every_accepted_unit_converts(catalog: Catalog) -> None:
    for name, analyte in catalog.analytes.items():
        for unit in analyte.units:
            out = catalog.convert(Decimal("1.5"), unit, name)
            assert out > 0, (name, unit)
        assert catalog.convert(Decimal("1.5"), analyte.canonical_unit, name) == Decimal("1.5")


# (analyte, value, unit, expected value in the canonical unit)
KNOWN = [
    ("calcium_total", "2.5", "mmol/L", "10.0195"),
    ("calcium_total", "10.2", "mg/dL", "10.2"),
    ("calcium_corrected_reported", "2.54", "mmol/L", "10.179812"),
    ("calcium_ionized", "5.2", "mg/dL", str(Decimal("5.2") / CA_MG_DL_PER_MMOL_L)),
    ("calcium_ionized", "1.30", "mmol/L", "1.30"),
    ("calcium_other", "1", "mg/dL", str(1 / CA_MG_DL_PER_MMOL_L)),
    ("phosphate", "1.8", "mmol/L", "5.57532"),
    ("pth_intact", "62", "pmol/L", "584.35"),
    ("pth_intact", "585", "ng/L", "585"),
    ("vitamin_d_25oh", "75", "nmol/L", str(Decimal(75) / VITD25_NMOL_L_PER_NG_ML)),
    ("vitamin_d_1_25", "120", "pmol/L", str(Decimal(120) / VITD125_PMOL_L_PER_PG_ML)),
    ("albumin", "35", "g/L", "3.5"),
    ("albumin", "3.5", "g/dL", "3.5"),
    ("creatinine", "884", "umol/L", str(Decimal(884) / CREA_UMOL_L_PER_MG_DL)),
    ("magnesium", "1", "mmol/L", "2.4305"),
    ("egfr", "14", "mL/min/{1.73_m2}", "14"),
    ("alp", "121", "U/L", "121"),
    ("bmi", "30.0", "kg/m2", "30.0"),
    ("body_weight", "70000", "g", "70"),
    ("body_weight", "100", "[lb_av]", "45.359237"),
    ("body_height", "1.75", "m", "175"),
    ("body_height", "70", "[in_i]", "177.8"),
]


@pytest.mark.parametrize(("analyte", "value", "unit", "expected"), KNOWN)
def test_known_conversions(catalog: Catalog, analyte: str, value: str, unit: str, expected: str) -> None:
    assert close(catalog.convert(Decimal(value), unit, analyte), Decimal(expected))


def test_reference_pth_threshold(catalog: Catalog) -> None:
    """REFERENCE §2.3 M4: 9 × ULN 65 pg/mL = 585 pg/mL ≈ 62.07 pmol/L."""
    assert round(catalog.convert(Decimal(585) / PTH_PG_ML_PER_PMOL_L, "pmol/L", "pth_intact"), 6) == 585


# ----------------------------------------------------------------------------- round trips (hypothesis)
@given(values)
def test_calcium_round_trip(catalog: Catalog, mg_dl: Decimal) -> None:
    mmol = catalog.convert(mg_dl, "mg/dL", "calcium_ionized")  # canonical mmol/L
    assert close(mmol, mg_dl / CA_MG_DL_PER_MMOL_L)
    back = catalog.convert(mmol, "mmol/L", "calcium_total")  # canonical mg/dL
    assert close(back, mg_dl)


@given(values)
def test_calcium_mmol_to_mg_dl_factor(catalog: Catalog, mmol: Decimal) -> None:
    for analyte in ("calcium_total", "calcium_corrected_reported"):
        assert close(catalog.convert(mmol, "mmol/L", analyte), mmol * CA_MG_DL_PER_MMOL_L)


@given(values)
def test_phosphate_mmol_to_mg_dl_factor(catalog: Catalog, mmol: Decimal) -> None:
    assert close(catalog.convert(mmol, "mmol/L", "phosphate"), mmol * P_MG_DL_PER_MMOL_L)


@given(values)
def test_phosphate_round_trip(catalog: Catalog, mg_dl: Decimal) -> None:
    # mg/dL is phosphate's canonical unit (identity); mmol/L -> mg/dL undoes mg/dL -> mmol/L
    assert catalog.convert(mg_dl, "mg/dL", "phosphate") == mg_dl
    mmol = mg_dl / P_MG_DL_PER_MMOL_L
    assert close(catalog.convert(mmol, "mmol/L", "phosphate"), mg_dl)


@given(values)
def test_pth_pmol_to_pg_ml(catalog: Catalog, pmol: Decimal) -> None:
    assert close(catalog.convert(pmol, "pmol/L", "pth_intact"), pmol * PTH_PG_ML_PER_PMOL_L)
    assert catalog.convert(pmol, "ng/L", "pth_intact") == pmol  # ng/L = pg/mL


@given(values)
def test_vitamin_d_25_nmol_to_ng_ml(catalog: Catalog, nmol: Decimal) -> None:
    assert close(catalog.convert(nmol, "nmol/L", "vitamin_d_25oh"), nmol / VITD25_NMOL_L_PER_NG_ML)


@given(values)
def test_vitamin_d_1_25_pmol_to_pg_ml(catalog: Catalog, pmol: Decimal) -> None:
    assert close(catalog.convert(pmol, "pmol/L", "vitamin_d_1_25"), pmol / VITD125_PMOL_L_PER_PG_ML)


@given(values)
def test_albumin_g_l_to_g_dl(catalog: Catalog, g_l: Decimal) -> None:
    assert close(catalog.convert(g_l, "g/L", "albumin"), g_l / 10)


@given(values)
def test_creatinine_umol_to_mg_dl(catalog: Catalog, umol: Decimal) -> None:
    assert close(catalog.convert(umol, "umol/L", "creatinine"), umol / CREA_UMOL_L_PER_MG_DL)
    assert catalog.convert(umol, "µmol/L", "creatinine") == catalog.convert(umol, "umol/L", "creatinine")


@given(values)
def test_magnesium_mmol_to_mg_dl(catalog: Catalog, mmol: Decimal) -> None:
    assert close(catalog.convert(mmol, "mmol/L", "magnesium"), mmol * MG_MG_DL_PER_MMOL_L)


@given(values, st.sampled_from(["calcium_total", "phosphate", "magnesium", "creatinine"]))
def test_conversion_is_linear(catalog: Catalog, value: Decimal, analyte: str) -> None:
    other = next(u for u in catalog.analytes[analyte].units if u != catalog.analytes[analyte].canonical_unit)
    one = catalog.convert(Decimal(1), other, analyte)
    assert close(catalog.convert(value, other, analyte), value * one)


def test_reference_factors_to_three_digits(catalog: Catalog) -> None:
    """The rounded factors REFERENCE §1.6 quotes."""
    assert round(catalog.convert(Decimal(1), "mmol/L", "calcium_total"), 3) == Decimal("4.008")
    assert round(catalog.convert(Decimal(1), "mmol/L", "phosphate"), 3) == Decimal("3.097")
    assert catalog.convert(Decimal(1), "pmol/L", "pth_intact").quantize(Decimal("0.01"), ROUND_HALF_UP) == Decimal("9.43")
    assert round(1 / catalog.convert(Decimal(1), "nmol/L", "vitamin_d_25oh"), 3) == Decimal("2.496")
    assert round(1 / catalog.convert(Decimal(1), "pmol/L", "vitamin_d_1_25"), 2) == Decimal("2.40")
    assert round(1 / catalog.convert(Decimal(1), "umol/L", "creatinine"), 1) == Decimal("88.4")
    assert round(1 / catalog.convert(Decimal(1), "mg/dL", "calcium_ionized"), 3) == Decimal("4.008")


# ----------------------------------------------------------------------------- aliases
@pytest.mark.parametrize(
    ("analyte", "alias", "unit"),
    [
        ("calcium_total", "mg/dl", "mg/dL"),
        ("calcium_total", "MG/DL", "mg/dL"),
        ("calcium_total", " mmol/l ", "mmol/L"),
        ("calcium_total", "mM", "mmol/L"),
        ("albumin", "g/dl", "g/dL"),
        ("albumin", "gm/dL", "g/dL"),
        ("creatinine", "µmol/L", "umol/L"),
        ("pth_intact", "pg/ml", "pg/mL"),
        ("vitamin_d_25oh", "ug/L", "ng/mL"),
        ("alp", "IU/L", "U/L"),
        ("alp", "[IU]/L", "U/L"),
        ("egfr", "mL/min/1.73m2", "mL/min/{1.73_m2}"),
        ("egfr", "mL/min/1.73 m2", "mL/min/{1.73_m2}"),
        ("bmi", "kg/m^2", "kg/m2"),
        ("body_weight", "lbs", "[lb_av]"),
    ],
)
def test_unit_aliases(catalog: Catalog, analyte: str, alias: str, unit: str) -> None:
    assert catalog.canonical_unit_code(alias) == unit
    value = Decimal("7.25")
    assert catalog.convert(value, alias, analyte) == catalog.convert(value, unit, analyte)


def test_canonical_unit_code_of_nothing(catalog: Catalog) -> None:
    assert catalog.canonical_unit_code(None) is None
    assert catalog.canonical_unit_code("furlong") is None


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("analyte", "unit"),
    [
        ("calcium_total", "mg/L"),  # REFERENCE §4: excluded, not rescaled
        ("calcium_total", "mg/l"),
        ("egfr", "mL/min"),  # not normalised to 1.73 m2
        ("egfr", "ml/min"),
        ("phosphate", "mEq/L"),  # unknown unit
        ("albumin", "mg/dL"),  # understood, but not accepted for albumin
        ("pth_intact", "ng/mL"),
        ("calcium_total", None),
        ("calcium_total", ""),
        ("alp", "ukat/L"),
    ],
)
def test_unacceptable_units_raise(catalog: Catalog, analyte: str, unit: str | None) -> None:
    with pytest.raises(UnitConversionError):
        catalog.convert(Decimal("9.5"), unit, analyte)


@given(values)
def test_mg_l_calcium_always_refused(catalog: Catalog, value: Decimal) -> None:
    with pytest.raises(UnitConversionError):
        catalog.convert(value, "mg/L", "calcium_total")


# ----------------------------------------------------------------------------- conversion_error (remembered)
def _units_to_try(catalog: Catalog) -> list[str | None]:
    return [None, "", "furlongs", "MG/DL", " mmol/l ", *sorted(catalog.units), *sorted(catalog.unit_aliases)]


@given(data=st.data(), value=values)
def test_conversion_error_says_exactly_when_convert_refuses(catalog: Catalog, data: st.DataObject, value: Decimal) -> None:
    """Extraction checks a unit with ``conversion_error`` and converts only the values a rule reads: the check must
    refuse exactly what ``convert`` refuses, with the same reason, whatever the value."""
    analyte = data.draw(st.sampled_from(sorted(catalog.analytes)))
    unit = data.draw(st.one_of(st.sampled_from(_units_to_try(catalog)), st.text(max_size=12)))
    try:
        catalog.convert(value, unit, analyte)
        expected = None
    except UnitConversionError as exc:
        expected = str(exc)
    assert catalog.conversion_error(unit, analyte) == expected
