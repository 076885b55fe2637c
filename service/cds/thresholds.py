"""Every clinical threshold and window the rules use, in one operator-overridable object.

Each default traces to a row of the clinical specification (REFERENCE.md); the section is named next
to the field. Operators override values through settings (``CDS_THRESHOLDS__<FIELD>`` environment
variables or a JSON file named by ``CDS_THRESHOLDS_FILE``); an overridden set gets a distinct rules
version so stored evaluations show which thresholds produced them.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal

import orjson
from pydantic import BaseModel, ConfigDict, Field

#: Bumped whenever rule logic (not thresholds) changes.
RULES_LOGIC_VERSION = "2026.11.0"


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- §2.1 data validity -------------------------------------------------------------------
    accept_preliminary: bool = Field(False, description="Use preliminary Observations (§2.1: excluded by default).")
    # Lookback windows in days (§2.1 table).
    window_mineral_days: int = 90  # Ca, P, albumin, ionized Ca
    window_mineral_ckd4_days: int = 90  # optionally 180 in CKD G4 (§2.1)
    window_pth_days: int = 180
    window_pth_ckd4_days: int = 180  # optionally 365 in G4
    window_alp_days: int = 180
    window_vitamin_d_days: int = 365
    window_renal_function_days: int = 365  # eGFR / creatinine
    window_body_days: int = 365  # BMI / weight (height: any time)
    window_dialysis_procedure_days: int = 90  # §2.1 Procedure
    window_vka_stop_days: int = 90  # §2.1: VKA stopped within 90 days still counts
    window_iv_mineral_days: int = 7  # §2.5.4: IV calcium/phosphate within 7 days
    # Pairing (§2.1, decision 1).
    pair_same_draw_hours: int = 24
    pair_max_lag_hours: int = 72
    albumin_pair_hours: int = 24
    albumin_pair_max_hours: int = 72
    ionized_pair_hours: int = 24

    # --- §1.5 corrected calcium -------------------------------------------------------------
    correction_slope: Decimal = Decimal("0.8")  # configurable to 1.0 (Payne original)
    correction_reference_albumin_g_dl: Decimal = Decimal("4.0")

    # --- §2.2 renal context -----------------------------------------------------------------
    egfr_r2_below: Decimal = Decimal("15")
    egfr_r1_below: Decimal = Decimal("30")

    # --- §2.3 calciphylaxis -----------------------------------------------------------------
    caxp_high_above: Decimal = Decimal("70")  # M2 and metastatic "high": strict
    phosphate_renal_above: Decimal = Decimal("5.5")  # R1/R2
    phosphate_nonrenal_above: Decimal = Decimal("4.5")  # R0
    corrected_ca_renal_above: Decimal = Decimal("10.2")  # R1/R2 (K/DOQI)
    corrected_ca_nonrenal_above: Decimal = Decimal("10.4")  # R0 (MSD)
    ionized_ca_above_mmol_l: Decimal = Decimal("1.30")
    albumin_major_below: Decimal = Decimal("3.0")  # M3
    albumin_minor_below: Decimal = Decimal("3.5")  # minor: 3.0–3.49
    pth_uln_multiple: Decimal = Decimal("9")  # M4: PTH > 9 × ULN
    pth_default_uln_pg_ml: Decimal = Decimal("65")
    alp_default_uln_u_l: Decimal = Decimal("120")
    bmi_obese_at_least: Decimal = Decimal("30")
    count_thrombophilia_minor: bool = Field(False, description="§2.3 lists thrombophilia as an optional minor factor.")
    high_min_majors: int = 2
    high_one_major_min_minors: int = 3
    moderate_min_minors: int = 3
    r0_vka_min_minors: int = 2
    pth_missing_marks_incomplete: bool = True  # §2.3: PTH feeds M4

    # --- §2.4 metastatic calcification --------------------------------------------------------
    caxp_moderate_at_least: Decimal = Decimal("55")
    caxp_moderate_child_at_least: Decimal = Decimal("65")  # age ≤ 12
    child_max_age: int = 12
    paediatric_max_age: int = 17  # age < 18 uses referenceRange for phosphate
    severe_hypercalcemia_at_least: Decimal = Decimal("14")
    moderate_hypercalcemia_at_least: Decimal = Decimal("12")

    # --- card policy (CONTRACT "Cards") -------------------------------------------------------
    card_for_low_complete: bool = Field(False, description="Emit a calciphylaxis card for tier low with complete data.")

    def fingerprint(self) -> str:
        """Short hash of the values, so an overridden set is told apart in stored evaluations."""
        payload = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(payload).hexdigest()[:10]

    def rules_version(self) -> str:
        if self == DEFAULT_THRESHOLDS:
            return RULES_LOGIC_VERSION
        return f"{RULES_LOGIC_VERSION}+t{self.fingerprint()}"


DEFAULT_THRESHOLDS = Thresholds()
