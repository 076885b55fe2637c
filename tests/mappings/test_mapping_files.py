"""The mapping files hold every code of REFERENCE §3 (and §2) with the right meaning.

The expected tables below are written out from REFERENCE.md by hand: they are the specification the YAML
files are checked against. (A test module may hold codes; production Python may not.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.terminology.catalog import Catalog
from service.terminology.schema import SYSTEMS

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
README = MAPPINGS / "README.md"

LOINC = SYSTEMS["loinc"]
SCT = SYSTEMS["snomed"]
ICD = SYSTEMS["icd10cm"]
PCS = SYSTEMS["icd10pcs"]
RXN = SYSTEMS["rxnorm"]
CPT = SYSTEMS["cpt"]
HCPCS = SYSTEMS["hcpcs"]

#: Source keys of REFERENCE "Appendix: source keys".
SOURCE_KEYS = {"VSAC", "CMS23", "OHDSI", "MONDO", "DOID", "MII", "MIRACUM", "RXN", "VISTA", "FSH", "LISTS", "FHIR"}

# ----------------------------------------------------------------------------- §3.1 LOINC
# code -> (analyte, use, status)
V, U = "verified", "unverified"
OBSERVATIONS: dict[str, tuple[str, bool, str]] = {
    # total calcium
    "17861-6": ("calcium_total", True, V),
    "49765-1": ("calcium_total", True, V),
    "2000-8": ("calcium_total", True, V),
    "1996-8": ("calcium_total", True, V),
    # lab-reported corrected calcium; total-protein correction not used
    "29265-6": ("calcium_corrected_reported", True, V),
    "46099-8": ("calcium_corrected_reported", True, V),
    "18281-6": ("calcium_other", False, V),
    # ionized calcium
    "1994-3": ("calcium_ionized", True, V),
    "1995-0": ("calcium_ionized", True, V),
    "17863-2": ("calcium_ionized", True, V),
    "38230-9": ("calcium_ionized", True, V),
    "17864-0": ("calcium_ionized", True, V),
    "12180-6": ("calcium_ionized", True, V),
    "47596-2": ("calcium_ionized", True, V),
    "34581-9": ("calcium_ionized", True, V),
    "59470-5": ("calcium_ionized", True, V),
    # phosphate
    "2777-1": ("phosphate", True, V),
    "14879-1": ("phosphate", True, V),
    "2774-8": ("phosphate", True, V),
    "24519-1": ("phosphate", True, V),
    # PTH
    "2731-8": ("pth_intact", True, V),
    "14866-8": ("pth_intact", True, V),
    # vitamin D
    "62292-8": ("vitamin_d_25oh", True, V),
    "1989-3": ("vitamin_d_25oh", True, V),
    "14635-7": ("vitamin_d_25oh", True, V),
    "1649-3": ("vitamin_d_1_25", True, U),
    "14566-4": ("vitamin_d_1_25", True, U),
    "62290-2": ("vitamin_d_1_25", False, U),
    "35365-6": ("vitamin_d_25oh", False, U),
    # albumin
    "1751-7": ("albumin", True, V),
    "61151-7": ("albumin", True, V),
    "61152-5": ("albumin", True, V),
    "2862-1": ("albumin", True, V),
    # creatinine
    "2160-0": ("creatinine", True, V),
    "38483-4": ("creatinine", True, V),
    "14682-9": ("creatinine", True, V),
    "59826-8": ("creatinine", True, V),
    # eGFR
    "33914-3": ("egfr", True, V),
    "48642-3": ("egfr", True, V),
    "48643-1": ("egfr", True, V),
    "62238-1": ("egfr", True, V),
    "98979-8": ("egfr", True, V),
    "69405-9": ("egfr", True, V),
    "50044-7": ("egfr", True, V),
    "77147-7": ("egfr", True, V),
    "88293-6": ("egfr", True, V),
    "88294-4": ("egfr", True, V),
    # ALP, magnesium, body measurements
    "6768-6": ("alp", True, V),
    "19123-9": ("magnesium", True, V),
    "2601-3": ("magnesium", True, V),
    "39156-5": ("bmi", True, V),
    "29463-7": ("body_weight", True, V),
    "3141-9": ("body_weight", True, V),
    "8302-2": ("body_height", True, V),
}
#: §2.1: pre-/post-dialysis variants, recognised but never used (analyte is a placeholder).
DIALYSIS_VARIANTS = ("11041-1", "11042-9")

# ----------------------------------------------------------------------------- §3.2 / §2.2–2.5 conditions
# (system, code) -> feature, for codes matched exactly
CONDITIONS_EXACT: dict[tuple[str, str], str] = {
    # renal context
    (SCT, "46177005"): "esrd_or_ckd5",
    (SCT, "236435004"): "esrd_or_ckd5",
    (SCT, "433146000"): "esrd_or_ckd5",
    (SCT, "714152005"): "esrd_or_ckd5",
    (ICD, "N18.5"): "esrd_or_ckd5",
    (ICD, "N18.6"): "esrd_or_ckd5",
    (ICD, "I12.0"): "esrd_or_ckd5",
    (ICD, "I13.11"): "esrd_or_ckd5",
    (ICD, "I13.2"): "esrd_or_ckd5",
    (SCT, "105502003"): "dialysis_dependence",
    (ICD, "Z99.2"): "dialysis_dependence",
    (SCT, "125141000119102"): "dialysis_dependence",
    (SCT, "737295003"): "kidney_transplant",
    (SCT, "236436003"): "kidney_transplant",  # "End stage renal failure with renal transplant": R2, but a transplant basis
    (ICD, "Z94.0"): "kidney_transplant",
    (SCT, "431857002"): "ckd4",
    (ICD, "N18.4"): "ckd4",
    # established disease
    (SCT, "237900002"): "calciphylaxis",
    (ICD, "E83.59"): "calciphylaxis",
    (ICD, "L94.2"): "calcinosis_cutis",
    # predisposing
    (SCT, "66999008"): "hyperparathyroidism",
    (SCT, "36348003"): "hyperparathyroidism",
    (SCT, "91478007"): "hyperparathyroidism",
    (SCT, "19034001"): "hyperparathyroidism",
    (SCT, "78200003"): "hyperparathyroidism",
    (ICD, "E21.0"): "hyperparathyroidism",
    (ICD, "E21.1"): "hyperparathyroidism",
    (ICD, "E21.2"): "hyperparathyroidism",
    (ICD, "E21.3"): "hyperparathyroidism",
    (ICD, "N25.81"): "hyperparathyroidism",
    (SCT, "27712000"): "hypervitaminosis_d",
    (ICD, "E67.3"): "hypervitaminosis_d",
    (SCT, "31541009"): "sarcoidosis",
    (SCT, "7085002"): "sarcoidosis",
    (SCT, "88380005"): "milk_alkali",
    (SCT, "2089002"): "paget_bone",
    (SCT, "277605001"): "tumor_lysis",
    (ICD, "E88.3"): "tumor_lysis",
    (SCT, "66931009"): "hypercalcemia_dx",
    (ICD, "E83.52"): "hypercalcemia_dx",
    (SCT, "20165001"): "hyperphosphatemia_dx",
    (ICD, "E83.39"): "hyperphosphatemia_dx",
    # dystrophic calcinosis context
    (SCT, "89155008"): "systemic_sclerosis",
    (SCT, "31848007"): "crest",
    (ICD, "M34.1"): "crest",
    (SCT, "396230008"): "dermatomyositis",
    (SCT, "402425006"): "dermatomyositis",
    (SCT, "1212005"): "juvenile_dermatomyositis",
    (SCT, "55464009"): "sle",
    (SCT, "7109007"): "pxe",
    (ICD, "Q82.8"): "pxe",
    (SCT, "398114001"): "ehlers_danlos",
    (SCT, "51626007"): "werner_syndrome",
    # minor factors
    (SCT, "73211009"): "diabetes",
    (SCT, "44054006"): "diabetes",
    (SCT, "46635009"): "diabetes",
    (SCT, "414916001"): "obesity",
    (SCT, "238136002"): "obesity",
    (SCT, "83911000119104"): "obesity",
    (SCT, "162864005"): "obesity",
    (SCT, "408512008"): "obesity",
    (ICD, "E66.01"): "obesity",
    (ICD, "E66.09"): "obesity",
    (ICD, "E66.2"): "obesity",
    (ICD, "E66.811"): "obesity",
    (ICD, "E66.812"): "obesity",
    (ICD, "E66.813"): "obesity",
    (ICD, "E66.9"): "obesity",
    (SCT, "235856003"): "liver_disease",
    (SCT, "19943007"): "liver_disease",
    (SCT, "328383001"): "liver_disease",
    (ICD, "D68.51"): "thrombophilia",
    (ICD, "D68.52"): "thrombophilia",
    (ICD, "D68.59"): "thrombophilia",
    (ICD, "D68.61"): "thrombophilia",
    (ICD, "D68.62"): "thrombophilia",
    (ICD, "D68.69"): "thrombophilia",
    (ICD, "Z79.52"): "long_term_steroid_use",
    (ICD, "Z79.01"): "long_term_anticoagulant_use",
}
# ICD-10-CM prefix entry -> feature
CONDITIONS_PREFIX: dict[str, str] = {
    "Z91.15": "dialysis_dependence",
    "D86": "sarcoidosis",
    "M88": "paget_bone",
    "M34": "systemic_sclerosis",
    "M33.1": "dermatomyositis",
    "M33.9": "dermatomyositis",
    "M33.0": "juvenile_dermatomyositis",
    "M32": "sle",
    "Q79.6": "ehlers_danlos",
    "E08": "diabetes",
    "E09": "diabetes",
    "E10": "diabetes",
    "E11": "diabetes",
    "E13": "diabetes",
    "E66.8": "obesity",
    "Z68.3": "obesity",
    "Z68.4": "obesity",
    "K70": "liver_disease",
    "K71": "liver_disease",
    "K72": "liver_disease",
    "K73": "liver_disease",
    "K74": "liver_disease",
    "K75": "liver_disease",
    "K76": "liver_disease",
    "K77": "liver_disease",
}
# Real ICD-10-CM codes below a prefix (or an exact code) -> the feature they must resolve to (None: unmapped).
ICD_LOOKUPS: dict[str, str | None] = {
    "M34.0": "systemic_sclerosis",
    "M34.81": "systemic_sclerosis",
    "M34.9": "systemic_sclerosis",
    "M34.1": "crest",  # the exact CREST entry beats the M34 prefix
    "M33.02": "juvenile_dermatomyositis",
    "M33.12": "dermatomyositis",
    "M33.90": "dermatomyositis",
    "M33.20": None,  # polymyositis is not dermatomyositis
    "M32.9": "sle",
    "D86.0": "sarcoidosis",
    "M88.9": "paget_bone",
    "Q79.60": "ehlers_danlos",
    "E10.9": "diabetes",
    "E11.9": "diabetes",
    "E1165": "diabetes",  # dotless
    "K70.30": "liver_disease",
    "K74.60": "liver_disease",
    "K76.9": "liver_disease",
    "K78": None,
    "Z68.30": "obesity",
    "Z68.39": "obesity",
    "Z68.41": "obesity",
    "Z68.45": "obesity",
    "Z68.29": None,  # BMI 29: not obese
    "E66.3": None,  # overweight
    "E66.89": "obesity",
    "E66.811": "obesity",
    "e83.52": "hypercalcemia_dx",  # case and dots do not matter
    "E8352": "hypercalcemia_dx",
    "E83.51": None,  # hypocalcemia
    "E34.8": None,  # Werner: deliberately not mapped
    "N18.3": None,  # CKD 3 is no renal-context code
    "Z91.15": "dialysis_dependence",
    "Z91.158": "dialysis_dependence",
}
UNVERIFIED_CONDITIONS = {(ICD, "E21.2"), (ICD, "E83.39"), (SCT, "7109007"), (ICD, "Q82.8")} | {
    (ICD, c) for c in ("E66.811", "E66.812", "E66.813")
}
STATUS_CODES = {(ICD, "Z99.2"), (ICD, "Z94.0"), (SCT, "737295003"), (ICD, "Z79.01"), (ICD, "Z79.52")}
REQUIRES_TEXT = {(ICD, "E83.59"): "calciphylaxis", (ICD, "Q82.8"): "pseudoxanthoma", (ICD, "E83.39"): "hyperphosphat"}
#: Deliberately not mapped (README "Not mapped").
NOT_MAPPED = [(SCT, "6595006"), (SCT, "237881004"), (ICD, "E34.8"), (SCT, "190969000"), (RXN, "11253"), (LOINC, "14866-2")]

# ----------------------------------------------------------------------------- §3.4 RxNorm
# ingredient -> (tty, feature)
INGREDIENTS: dict[str, tuple[str, str]] = {
    "11289": ("IN", "vka"),
    "214342": ("IN", "calcium_binder"),
    "1897": ("IN", "calcium_binder"),
    "1894": ("IN", "vitamin_d_therapy"),
    "73710": ("IN", "vitamin_d_therapy"),
    "11516": ("IN", "vitamin_d_therapy"),
    "2418": ("IN", "vitamin_d_therapy"),
    "4018": ("IN", "vitamin_d_therapy"),
    "8640": ("IN", "systemic_corticosteroid"),
    "8638": ("IN", "systemic_corticosteroid"),
    "6902": ("IN", "systemic_corticosteroid"),
    "3264": ("IN", "systemic_corticosteroid"),
    "5492": ("IN", "systemic_corticosteroid"),
    "2878": ("IN", "systemic_corticosteroid"),
    "1908": ("IN", "iv_calcium"),
    "1901": ("IN", "iv_calcium"),
    "36709": ("IN", "iv_phosphate"),
    "34322": ("IN", "iv_phosphate"),
    "236719": ("IN", "iv_phosphate"),
    "235496": ("IN", "iv_phosphate"),
    "214824": ("IN", "noncalcium_binder"),
    "660890": ("PIN", "noncalcium_binder"),
    "237125": ("PIN", "noncalcium_binder"),
    "234416": ("IN", "noncalcium_binder"),
    "1484283": ("IN", "noncalcium_binder"),
    "1594675": ("IN", "noncalcium_binder"),
    "407990": ("IN", "calcimimetic"),
    "1876119": ("IN", "calcimimetic"),
    "1546411": ("IN", "sodium_thiosulfate"),
    "36726": ("PIN", "sodium_thiosulfate"),
    "24909": ("IN", "iron_sucrose"),
    "8308": ("IN", "vitamin_k1"),
    "1114195": ("IN", "doac"),
    "1599538": ("IN", "doac"),
    "1364430": ("IN", "doac"),
}
# example SCD -> (ingredient, parenteral)
PRODUCTS: dict[str, tuple[str, bool]] = {
    "855332": ("11289", False),
    "855288": ("11289", False),
    "855344": ("11289", False),
    "308867": ("1894", False),
    "308869": ("1894", True),
    "577315": ("73710", False),
    "200321": ("73710", True),
    "406503": ("11516", False),
    "309263": ("2418", False),
    "1367410": ("4018", False),
    "282465": ("1897", False),
    "359296": ("214342", False),
    "197433": ("214342", False),
    "749206": ("214824", False),
    "477347": ("234416", False),
    "1484289": ("1484283", False),
    "1594680": ("1594675", False),
    "432402": ("407990", False),
    "1876137": ("1876119", True),
    "312617": ("8640", False),
    "2618749": ("1546411", True),
    "237832": ("1546411", True),
    "1741267": ("24909", True),
    "1668250": ("1908", True),
    "828525": ("1901", True),
    "2716829": ("34322", True),
}

# ----------------------------------------------------------------------------- §3.3 procedures
PROCEDURES: dict[tuple[str, str], str] = {
    **{
        (SCT, c): "dialysis"
        for c in ("302497006", "71192002", "265764009", "108241001", "238318009", "238319001", "428648006", "233575001")
    },
    (SCT, "70536003"): "kidney_transplant_procedure",
    **{(CPT, c): "dialysis" for c in ("90935", "90937", "90945", "90947", "90999")},
    **{(CPT, str(c)): "dialysis" for c in range(90951, 90971)},
    (HCPCS, "G0257"): "dialysis",
    **{(PCS, c): "dialysis" for c in ("5A1D70Z", "5A1D80Z", "5A1D90Z", "3E1M39Z")},
    (PCS, "0TY00Z0"): "kidney_transplant_procedure",
    (PCS, "0TY10Z0"): "kidney_transplant_procedure",
}

MINOR_FACTOR_IDS = (
    "female",
    "bmi_ge_30",
    "diabetes",
    "systemic_corticosteroid",
    "liver_disease",
    "calcium_binder",
    "vitamin_d_therapy",
    "albumin_3_0_to_3_49",
    "alp_gt_uln",
    "thrombophilia",
)


def _yaml(name: str) -> dict:
    return yaml.safe_load((MAPPINGS / name).read_text(encoding="utf-8"))


# ============================================================================= files
@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("units.yaml", "units"),
        ("analytes.yaml", "analytes"),
        ("features.yaml", "features"),
        ("observations.yaml", "observations"),
        ("conditions.yaml", "conditions"),
        ("medications.yaml", "medications"),
        ("procedures.yaml", "procedures"),
        ("routes.yaml", "routes"),
        ("order_sets.yaml", "order_sets"),
    ],
)
def test_every_file_exists_with_its_kind(name: str, kind: str) -> None:
    assert _yaml(name)["kind"] == kind


def test_catalog_loads_with_a_version(catalog: Catalog) -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", catalog.version)


def test_all_entries_use_known_source_keys(catalog: Catalog) -> None:
    entries = [*catalog.observations.values(), *catalog.conditions.values(), *catalog.condition_prefixes]
    entries += [*catalog.medications.values(), *catalog.procedures.values(), *catalog.procedure_prefixes]
    for e in entries:
        assert set(e.sources) <= SOURCE_KEYS, (e.code, e.sources)


def test_unverified_entries_explain_themselves(catalog: Catalog) -> None:
    entries = [*catalog.observations.values(), *catalog.conditions.values(), *catalog.condition_prefixes]
    entries += [*catalog.medications.values(), *catalog.procedures.values()]
    for e in entries:
        if e.status == "unverified":
            assert e.note, f"{e.code} is unverified but has no note"
        if getattr(e, "use", True) is False:
            assert e.note, f"{e.code} has use: false but no note (the exclusion reason)"


# ============================================================================= observations
@pytest.mark.parametrize(("code", "expected"), sorted(OBSERVATIONS.items()))
def test_observation_code(catalog: Catalog, code: str, expected: tuple[str, bool, str]) -> None:
    entry = catalog.observation(LOINC, code)
    assert entry is not None, f"LOINC {code} is missing"
    assert (entry.analyte, entry.use, entry.status) == expected
    assert entry.display


def test_no_unexpected_observation_codes(catalog: Catalog) -> None:
    assert {c for (_, c) in catalog.observations} == set(OBSERVATIONS) | set(DIALYSIS_VARIANTS)


@pytest.mark.parametrize("code", DIALYSIS_VARIANTS)
def test_dialysis_variants_are_recognised_but_unused(catalog: Catalog, code: str) -> None:
    entry = catalog.observation(LOINC, code)
    assert entry is not None
    assert entry.use is False
    assert entry.status == "unverified"
    assert "pre/post-dialysis" in entry.note


def test_invalid_pth_code_is_absent(catalog: Catalog) -> None:
    """14866-2 fails the LOINC check digit (REFERENCE §3.1); no file may use it as a code."""
    assert catalog.observation(LOINC, "14866-2") is None
    for path in MAPPINGS.glob("*.yaml"):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        codes = [e.get("code") for e in doc.get("entries", [])]
        codes += [c for os_ in doc.get("order_sets", {}).values() for c in os_.get("codes", [])]
        assert "14866-2" not in codes, path.name


def test_total_protein_corrected_calcium_is_excluded(catalog: Catalog) -> None:
    entry = catalog.observation(LOINC, "18281-6")
    assert entry is not None and entry.use is False
    assert "total protein" in entry.note


def test_d3_only_label(catalog: Catalog) -> None:
    entry = catalog.observation(LOINC, "1989-3")
    assert entry is not None and "D3 only" in entry.label


def test_codes_for_analyte_excludes_unused(catalog: Catalog) -> None:
    used = {c for (_, c) in catalog.codes_for_analyte("vitamin_d_25oh")}
    every = {c for (_, c) in catalog.codes_for_analyte("vitamin_d_25oh", used_only=False)}
    assert used == {"62292-8", "1989-3", "14635-7"}
    assert every == used | {"35365-6"}


# ============================================================================= conditions
@pytest.mark.parametrize(("key", "feature"), sorted(CONDITIONS_EXACT.items()))
def test_condition_code(catalog: Catalog, key: tuple[str, str], feature: str) -> None:
    entry = catalog.condition(*key)
    assert entry is not None, f"{key} is missing"
    assert entry.feature == feature
    assert entry.match == "exact"
    assert entry.status == ("unverified" if key in UNVERIFIED_CONDITIONS else "verified")
    assert entry.status_code is (key in STATUS_CODES)
    assert entry.requires_text == REQUIRES_TEXT.get(key)


@pytest.mark.parametrize(("prefix", "feature"), sorted(CONDITIONS_PREFIX.items()))
def test_condition_prefix(catalog: Catalog, prefix: str, feature: str) -> None:
    [entry] = [e for e in catalog.condition_prefixes if e.code == prefix]
    assert entry.system == ICD
    assert entry.feature == feature
    assert entry.match == "prefix"


def test_no_unexpected_condition_codes(catalog: Catalog) -> None:
    assert set(catalog.conditions) == set(CONDITIONS_EXACT)
    assert {e.code for e in catalog.condition_prefixes} == set(CONDITIONS_PREFIX)


@pytest.mark.parametrize(("code", "feature"), sorted(ICD_LOOKUPS.items()))
def test_icd10cm_lookup(catalog: Catalog, code: str, feature: str | None) -> None:
    entry = catalog.condition(ICD, code)
    assert (entry.feature if entry else None) == feature


def test_prefix_does_not_leak_to_another_system(catalog: Catalog) -> None:
    assert catalog.condition(SCT, "M34.0") is None
    assert catalog.condition(None, "M34.0") is None


def test_milk_alkali_hypercalcemia_code_is_mapped_once(catalog: Catalog) -> None:
    assert catalog.condition(ICD, "E83.52").feature == "hypercalcemia_dx"  # type: ignore[union-attr]
    text = (MAPPINGS / "conditions.yaml").read_text(encoding="utf-8")
    assert len(re.findall(r"code: E83\.52\b", text)) == 1


@pytest.mark.parametrize("key", NOT_MAPPED)
def test_deliberately_not_mapped(catalog: Catalog, key: tuple[str, str]) -> None:
    system, code = key
    assert catalog.condition(system, code) is None
    assert catalog.medication(system, code) is None
    assert catalog.observation(system, code) is None
    assert code in README.read_text(encoding="utf-8"), f"README does not explain why {code} is not mapped"


def test_kidney_transplant_procedure_only_in_procedures(catalog: Catalog) -> None:
    assert catalog.condition(SCT, "70536003") is None
    assert catalog.procedure(SCT, "70536003").feature == "kidney_transplant_procedure"  # type: ignore[union-attr]


# ============================================================================= medications
@pytest.mark.parametrize(("code", "expected"), sorted(INGREDIENTS.items()))
def test_ingredient(catalog: Catalog, code: str, expected: tuple[str, str]) -> None:
    match = catalog.medication(RXN, code)
    assert match is not None, f"RxNorm {code} is missing"
    assert (match.entry.tty, match.entry.feature) == expected
    assert match.features == {expected[1]}


@pytest.mark.parametrize(("code", "expected"), sorted(PRODUCTS.items()))
def test_product_maps_to_its_ingredient(catalog: Catalog, code: str, expected: tuple[str, bool]) -> None:
    ingredient, parenteral = expected
    match = catalog.medication(RXN, code)
    assert match is not None, f"RxNorm SCD {code} is missing"
    assert match.entry.tty == "SCD"
    assert match.entry.ingredients == (ingredient,)
    assert [i.code for i in match.ingredients] == [ingredient]
    assert match.features == {INGREDIENTS[ingredient][1]}
    assert match.entry.parenteral is parenteral


def test_warfarin_scd_is_a_vka(catalog: Catalog) -> None:
    """REFERENCE §4: a MedicationRequest for warfarin as SCD 855332 only must map to IN 11289."""
    match = catalog.medication(RXN, "855332")
    assert match is not None
    assert [i.code for i in match.ingredients] == ["11289"]
    assert match.features == {"vka"}


def test_apixaban_is_not_a_binder_and_vitamin_d_11253_is_absent(catalog: Catalog) -> None:
    assert catalog.medication(RXN, "1364430").features == {"doac"}  # type: ignore[union-attr]
    assert catalog.medication(RXN, "11253") is None


def test_no_unexpected_medication_codes(catalog: Catalog) -> None:
    assert {c for (_, c) in catalog.medications} == set(INGREDIENTS) | set(PRODUCTS)


def test_codes_for_feature_includes_products(catalog: Catalog) -> None:
    codes = {c for (_, c) in catalog.codes_for_feature("vka")}
    assert codes == {"11289", "855332", "855288", "855344"}


# ============================================================================= procedures, routes, order sets
@pytest.mark.parametrize(("key", "feature"), sorted(PROCEDURES.items()))
def test_procedure(catalog: Catalog, key: tuple[str, str], feature: str) -> None:
    entry = catalog.procedure(*key)
    assert entry is not None, f"{key} is missing"
    assert entry.feature == feature
    assert entry.status == ("unverified" if key == (PCS, "3E1M39Z") else "verified")


def test_no_unexpected_procedure_codes(catalog: Catalog) -> None:
    assert set(catalog.procedures) == set(PROCEDURES)
    assert catalog.procedure_prefixes == ()


def test_local_routes(catalog: Catalog) -> None:
    """REFERENCE §2.3 counts a *systemic* corticosteroid: these routes (FHIR R4 route-codes, unverified) are not."""
    local = {code for (system, code), feature in catalog.routes.items() if system == SCT and feature == "local"}
    assert local == {"6064005", "54485002", "10547007", "46713006", "447694001", "16857009"}
    assert catalog.route_feature(SCT, "26643006") is None  # oral: systemic
    assert {"topical", "inhaled", "ophthalmic"} <= set(catalog.route_text_patterns["local"])
    assert all(e["status"] == "unverified" for e in _yaml("routes.yaml")["entries"])


def test_intravenous_route(catalog: Catalog) -> None:
    assert catalog.route_feature(SCT, "47625008") == "intravenous"
    assert catalog.route_feature(SCT, "26643006") is None  # oral route
    assert set(catalog.route_text_patterns["intravenous"]) == {"intravenous", "i.v.", "iv", "ivpb"}  # IV piggyback
    entry = _yaml("routes.yaml")["entries"][0]
    assert entry["status"] == "unverified"
    assert "route-codes" in entry["note"]


def test_order_sets(catalog: Catalog) -> None:
    sets = catalog.order_sets
    assert sets["renal_panel"].codes == ("17861-6", "2777-1", "1751-7")
    assert sets["pth"].codes == ("2731-8",)
    assert sets["vitamin_d_25oh"].codes == ("62292-8",)
    assert sets["vitamin_d_1_25"].codes == ("1649-3",)
    assert sets["pthrp"].codes == ()
    assert sets["pthrp"].note
    for os_ in sets.values():
        for code in os_.codes:
            entry = catalog.observation(LOINC, code)
            assert entry is not None and entry.use


def test_order_alternatives(catalog: Catalog) -> None:
    """The only automatic alternative: sevelamer (REFERENCE §3.4 SCD 749206) for a calcium-based binder, proposed only
    where KDIGO's advice applies (kidney failure, CKD G5D), only with a phosphate above the M2 threshold (§2.3), and
    not to a patient already on a non-calcium binder."""
    assert set(catalog.order_alternatives) == {"calcium_binder"}
    alt = catalog.order_alternatives["calcium_binder"]
    assert (alt.system, alt.code) == (RXN, "749206")
    assert catalog.medication(RXN, "749206").features == {"noncalcium_binder"}  # type: ignore[union-attr]
    assert alt.offer_when == ["kidney_failure"]
    assert alt.requires == ("hyperphosphatemia",)
    assert alt.unless_current == ("noncalcium_binder",)


# ============================================================================= features and README
def test_every_feature_is_used_or_reserved(catalog: Catalog) -> None:
    used = {e.feature for e in [*catalog.conditions.values(), *catalog.condition_prefixes]}
    used |= {e.feature for e in [*catalog.procedures.values(), *catalog.procedure_prefixes]}
    used |= {m.feature for m in catalog.medications.values() if m.feature}
    used |= set(catalog.routes.values())
    readme = README.read_text(encoding="utf-8")
    reserved = readme.split("## Reserved features", 1)[1].split("\n## ", 1)[0] if "## Reserved features" in readme else ""
    for name in catalog.features:
        assert name in used or f"`{name}`" in reserved, f"feature {name} is neither used nor documented as reserved"
    assert used <= set(catalog.features)


def test_readme_documents_the_minor_factor_ids() -> None:
    readme = README.read_text(encoding="utf-8")
    section = readme.split("## Minor-factor ids", 1)[1].split("\n## ", 1)[0]
    for factor in MINOR_FACTOR_IDS:
        assert f"`{factor}`" in section
    assert "count_thrombophilia_minor" in section


def test_readme_documents_every_file_kind() -> None:
    readme = README.read_text(encoding="utf-8")
    for kind in ("units", "analytes", "features", "observations", "conditions", "medications", "procedures", "routes"):
        assert f"kind: {kind}" in readme
    assert "kind: order_sets" in readme
    for uri in SYSTEMS.values():
        assert uri in readme
