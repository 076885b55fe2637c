"""The rule set: facts → renal context, calciphylaxis and metastatic-calcification tiers, context flags.

Each function cites the REFERENCE section it implements. Rules speak in feature and analyte names
(``mappings/``), never in codes; every threshold comes from :class:`Thresholds`. Values are rounded
before comparison (§2.1) and inclusivity follows the source wording: "> 70" strict, "≥ 55" inclusive,
"BMI ≥ 30" inclusive.

The tiers are expert-opinion rules, not validated probabilities (§2.6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from service.cds.fhirutil import age_in_years, iso, within
from service.cds.model import (
    CaseFacts,
    ConditionFact,
    Evidence,
    Factor,
    LabValue,
    MedicationFact,
)
from service.cds.thresholds import Thresholds
from service.terminology.catalog import Catalog

RULE_IDS = {
    "renal": "renal.context",
    "calciphylaxis": "calciphylaxis.tier",
    "established": "calciphylaxis.established",
    "metastatic": "metastatic.tier",
    "severe": "hypercalcemia.severe",
    "moderate_hyperca": "hypercalcemia.moderate",
    "calcinosis_cutis": "context.calcinosis-cutis",
    "dystrophic": "context.dystrophic",
    "iatrogenic": "context.iatrogenic",
    "order": "orders.medication-risk",
}

RENAL_R2_CONDITIONS = ("esrd_or_ckd5", "dialysis_dependence", "kidney_transplant")
PRED_CONDITIONS = (
    "hyperparathyroidism",
    "hypervitaminosis_d",
    "sarcoidosis",
    "milk_alkali",
    "paget_bone",
    "tumor_lysis",
    "hypercalcemia_dx",
    "hyperphosphatemia_dx",
)
DYSTROPHIC_CONDITIONS = (
    "systemic_sclerosis",
    "crest",
    "dermatomyositis",
    "juvenile_dermatomyositis",
    "sle",
    "pxe",
    "ehlers_danlos",
    "werner_syndrome",
)
#: Every feature the rules read; the service refuses to start if mappings/features.yaml lacks one.
REQUIRED_FEATURES = frozenset(
    (
        *RENAL_R2_CONDITIONS,
        "ckd4",
        "dialysis",
        "kidney_transplant_procedure",
        "calciphylaxis",
        "calcinosis_cutis",
        *PRED_CONDITIONS,
        *DYSTROPHIC_CONDITIONS,
        "diabetes",
        "obesity",
        "liver_disease",
        "thrombophilia",
        "long_term_steroid_use",
        "vka",
        "calcium_binder",
        "vitamin_d_therapy",
        "systemic_corticosteroid",
        "iv_calcium",
        "iv_phosphate",
    )
)
REQUIRED_ANALYTES = frozenset(
    ("calcium_total", "calcium_corrected_reported", "calcium_ionized", "phosphate", "albumin", "pth_intact", "alp", "egfr", "bmi", "body_weight", "body_height")
)
REQUIRED_ORDER_SETS = frozenset(("renal_panel", "pth", "pthrp", "vitamin_d_25oh", "vitamin_d_1_25"))

STALE_NOTE_ANALYTES = frozenset(("calcium_total", "calcium_ionized", "phosphate", "albumin", "pth_intact", "egfr"))

MAJOR_LABELS = {
    "M1": "Vitamin K antagonist (current or stopped ≤ {days} d)",
    "M2": "Mineral derangement",
    "M3": "Hypoalbuminemia",
    "M4": "Severe hyperparathyroidism",
}
MINOR_LABELS = {
    "female": "Female sex",
    "bmi_ge_30": "BMI ≥ 30 (or obesity on the problem list)",
    "diabetes": "Diabetes mellitus",
    "systemic_corticosteroid": "Current systemic corticosteroid",
    "liver_disease": "Liver disease",
    "calcium_binder": "Current calcium-based binder",
    "vitamin_d_therapy": "Vitamin D therapy",
    "albumin_3_0_to_3_49": "Albumin 3.0–3.49 g/dL",
    "alp_gt_uln": "Alkaline phosphatase above ULN",
    "thrombophilia": "Thrombophilia",
}

_QUANTUM = tuple(Decimal(1).scaleb(-places) for places in range(7))


def rnd(value: Decimal, places: int) -> Decimal:
    """Round half up to ``places`` decimals (§2.1: rounding before comparison avoids float artefacts)."""
    quantum = _QUANTUM[places] if 0 <= places < len(_QUANTUM) else Decimal(1).scaleb(-places)
    return value.quantize(quantum, rounding=ROUND_HALF_UP)


def exceeds(lab: LabValue, limit: Decimal, places: int) -> bool:
    """Whether a result is above ``limit``, both rounded to ``places``; a result reported as above the assay's range
    ("> v") is when v ≥ limit, and one reported as "≥ v" when v > limit, as for a plain value."""
    value, bound = rnd(lab.value, places), rnd(limit, places)
    return value >= bound if lab.comparator == ">" else value > bound


def fmt(value: Decimal) -> str:
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def lab_evidence(lab: LabValue, *, label: str | None = None, threshold: str | None = None, note: str | None = None, places: int = 2) -> Evidence:
    converted = lab.raw_unit != lab.unit
    shown = (lab.comparator or "") + fmt(rnd(lab.value, places))
    extra = f"reported {lab.comparator or ''}{fmt(lab.raw_value)} {lab.raw_unit}" if converted else None
    return Evidence(
        label=label or lab.label,
        value=shown,
        unit=lab.unit,
        date=iso(lab.effective),
        reference=lab.source.reference,
        code=lab.source.token,
        threshold=threshold,
        note="; ".join(n for n in (extra, note) if n) or None,
    )


def condition_evidence(c: ConditionFact, note: str | None = None) -> Evidence:
    qualified = f"recorded as: {c.qualifying_text}" if c.qualifying_text else None
    return Evidence(
        label=c.source.display,
        value=c.clinical_status or "current",
        date=iso(c.onset),
        reference=c.source.reference,
        code=c.source.token,
        note="; ".join(n for n in (qualified, note) if n) or None,
    )


def medication_evidence(m: MedicationFact, note: str | None = None) -> Evidence:
    when = m.stop if (m.stop and not m.current) else (m.start or m.last_activity)
    status = m.status + (" (current)" if m.current else "")
    return Evidence(
        label=m.source.display,
        value=status,
        date=iso(when),
        reference=m.source.reference,
        code=m.source.token if m.source.code else None,
        note="; ".join(n for n in (note, m.recognised_by) if n) or None,
    )


_IONIZED_ROLE_NOTES = {
    "paired": "within {hours} h of the total calcium: decides",
    "newer": "newer than the total calcium: decides",
    "older": "older than the total calcium, which supersedes it: not used",
    "alone": "no total calcium in the window: decides",
}


@dataclass
class CalciumFinding:
    """The calcium values behind the hypercalcemia decision (decision 2 of the reference)."""

    measured: LabValue | None = None
    measured_mg_dl: Decimal | None = None
    albumin: LabValue | None = None
    corrected_mg_dl: Decimal | None = None
    correction_note: str = ""
    ionized: LabValue | None = None
    #: How ``ionized`` relates to the total calcium: "paired" (within the pairing hours), "newer", "older" or "alone"
    #: (no total calcium); the newest result decides (:attr:`ionized_decides`).
    ionized_role: str | None = None
    ionized_mmol_l: Decimal | None = None
    #: The ionized calcium decides and is normal, while the total calcium is in a hypercalcemia severity band.
    discordant: bool = False
    basis: str = "none"  # "ionized" | "corrected" | "measured" | "reported-corrected" | "none"
    corrected: bool = False  # the albumin correction was applied (albumin below the reference, paired in time)
    hypercalcemia: bool = False
    threshold: Decimal | None = None
    evidence: list[Evidence] = field(default_factory=list)  # every calcium fact read, in display order
    fired: list[Evidence] = field(default_factory=list)  # the facts behind ``hypercalcemia`` (M2 lists these)
    total_row: Evidence | None = None  # the row of ``corrected_mg_dl`` (the severity cards show their band on it)

    @property
    def ionized_decides(self) -> bool:
        return self.ionized is not None and self.ionized_role != "older"

    def total_label(self) -> str:
        """What ``corrected_mg_dl`` is, in words: it is the measured value when no correction applied."""
        if self.basis == "reported-corrected":
            return "laboratory-corrected calcium"
        return "corrected calcium" if self.corrected else "measured calcium"


@dataclass
class Product:
    value: Decimal
    value_si: Decimal
    calcium: LabValue
    phosphate: LabValue
    hours_apart: Decimal
    lag: bool


@dataclass
class Outcome:
    age: int | None
    sex: str | None
    renal: str
    renal_evidence: list[Evidence]
    renal_bases: frozenset[str]  # what the renal tier rests on: see renal_context
    calciphylaxis_tier: str
    incomplete: bool
    majors: list[Factor]
    minors: list[Factor]
    missing: list[str]
    established: list[ConditionFact]
    modifiable: list[Evidence]
    metastatic_tier: str
    product: Product | None
    product_note: str
    predisposing: list[Factor]
    calcium: CalciumFinding
    hyperphosphatemia: bool
    phosphate_evidence: list[Evidence]
    severity: str | None  # "severe" | "moderate" | None
    severity_band: str | None  # its range in mg/dL, as the card shows it ("≥ 14", "12 to < 14")
    calcinosis_cutis: list[ConditionFact]
    dystrophic: list[ConditionFact]
    iatrogenic: list[MedicationFact]
    orders: list[str]  # order-set ids, in order
    notes: list[str]
    stale: dict[str, LabValue]
    explanations: dict[str, str]


class _Ctx:
    def __init__(self, facts: CaseFacts, t: Thresholds, now: datetime, catalog: Catalog):
        self.f = facts
        self.t = t
        self.now = now
        self.catalog = catalog
        self.notes: list[str] = []
        self.by_feature: dict[str, list[ConditionFact]] = {}
        for c in facts.conditions:
            self.by_feature.setdefault(c.feature, []).append(c)

    def conditions(self, *features: str) -> list[ConditionFact]:
        return [c for f in features for c in self.by_feature.get(f, ()) if self.f.usable(c)]

    def latest(self, analyte: str, days: int | None) -> LabValue | None:
        for lab in self.f.labs.get(analyte, ()):
            if (days is None or within(lab.effective, self.now, days)) and self.f.usable(lab):
                return lab
        return None

    def closest(self, analyte: str, days: int, moment: datetime, max_hours: int) -> LabValue | None:
        """The usable in-window value nearest to ``moment`` and at most ``max_hours`` from it (ties: the newest).
        Candidates are chosen by their times alone; only those tried, in that order, are built and validated."""
        series = self.f.labs.get(analyte)
        if series is None:
            return None
        limit = timedelta(hours=max_hours)
        candidates = []
        for i in range(len(series)):
            effective = series.effective(i)
            gap = abs(effective - moment)
            if gap <= limit and within(effective, self.now, days):
                candidates.append((gap, i))
        candidates.sort()
        return next((series[i] for _, i in candidates if self.f.usable(series[i])), None)

    def meds(self, feature: str, relevant: Callable[[MedicationFact], bool] | None = None) -> list[MedicationFact]:
        """Medication facts of a feature that pass the rule's own filter first, then structural validation."""
        return [m for m in self.f.medications if feature in m.features and (relevant is None or relevant(m)) and self.f.usable(m)]


# --------------------------------------------------------------------------- §2.2 renal context
def renal_context(ctx: _Ctx) -> tuple[str, list[Evidence], frozenset[str]]:
    """The renal tier, its evidence, and what it rests on: condition features (``esrd_or_ckd5``,
    ``dialysis_dependence``, ``kidney_transplant``, ``ckd4``), procedure features (``dialysis`` within the window,
    ``kidney_transplant_procedure``) or ``egfr``."""
    t = ctx.t
    r2_conditions = ctx.conditions(*RENAL_R2_CONDITIONS)
    r2: list[Evidence] = [condition_evidence(c) for c in r2_conditions]
    bases = {c.feature for c in r2_conditions}
    for p in ctx.f.procedures:
        recent_dialysis = p.feature == "dialysis" and within(p.performed, ctx.now, t.window_dialysis_procedure_days)
        if not (recent_dialysis or p.feature == "kidney_transplant_procedure") or not ctx.f.usable(p):
            continue
        bases.add(p.feature)
        if recent_dialysis:
            r2.append(
                Evidence(
                    label=p.source.display,
                    value="performed",
                    date=iso(p.performed),
                    reference=p.source.reference,
                    code=p.source.token,
                    threshold=f"dialysis within {t.window_dialysis_procedure_days} d",
                )
            )
        elif p.feature == "kidney_transplant_procedure":
            r2.append(
                Evidence(
                    label=p.source.display, value="performed", date=iso(p.performed), reference=p.source.reference, code=p.source.token
                )
            )
    egfr = ctx.latest("egfr", t.window_renal_function_days)
    # Compared as reported: REFERENCE §2.1 rounds calcium, phosphate and Ca×P only (14.96 is "< 15")
    if egfr is not None and egfr.value < t.egfr_r2_below:
        r2.append(lab_evidence(egfr, threshold=f"< {fmt(t.egfr_r2_below)}"))
        bases.add("egfr")
    if r2:
        return "R2", r2, frozenset(bases)
    r1_conditions = ctx.conditions("ckd4")
    r1: list[Evidence] = [condition_evidence(c) for c in r1_conditions]
    bases = {c.feature for c in r1_conditions}
    if egfr is not None and egfr.value < t.egfr_r1_below:
        r1.append(lab_evidence(egfr, threshold=f"≥ {fmt(t.egfr_r2_below)} and < {fmt(t.egfr_r1_below)}"))
        bases.add("egfr")
    if r1:
        return "R1", r1, frozenset(bases)
    if egfr is not None:
        return "R0", [lab_evidence(egfr, threshold=f"≥ {fmt(t.egfr_r1_below)}")], frozenset()
    return "R0", [], frozenset()


# --------------------------------------------------------------------------- §2.1 pairing, decision 1 and 2
def calcium_finding(ctx: _Ctx, renal: str, mineral_days: int) -> CalciumFinding:
    t = ctx.t
    out = CalciumFinding()
    out.threshold = t.corrected_ca_renal_above if renal in ("R1", "R2") else t.corrected_ca_nonrenal_above
    ca = ctx.latest("calcium_total", mineral_days)
    if ca is not None:
        out.measured = ca
        out.measured_mg_dl = rnd(ca.value, 2)
        # The nearest usable albumin within the wider limit is the one within the narrower when there is one.
        alb = ctx.closest("albumin", mineral_days, ca.effective, max(t.albumin_pair_hours, t.albumin_pair_max_hours))
        out.albumin = alb
        if alb is None:
            out.corrected_mg_dl = out.measured_mg_dl
            out.correction_note = f"no albumin within {t.albumin_pair_max_hours} h of the calcium: measured calcium used"
        elif rnd(alb.value, 2) < t.correction_reference_albumin_g_dl:
            corrected = ca.value + t.correction_slope * (t.correction_reference_albumin_g_dl - alb.value)
            out.corrected_mg_dl = rnd(corrected, 2)
            out.corrected = True
            out.correction_note = f"corrected = Ca + {fmt(t.correction_slope)} × ({fmt(t.correction_reference_albumin_g_dl)} − albumin)"
        else:
            out.corrected_mg_dl = out.measured_mg_dl
            out.correction_note = f"albumin ≥ {fmt(t.correction_reference_albumin_g_dl)} g/dL: no correction"
        out.basis = "corrected"
    else:
        reported = ctx.latest("calcium_corrected_reported", mineral_days)
        if reported is not None:
            out.measured = reported
            out.corrected_mg_dl = rnd(reported.value, 2)
            out.basis = "reported-corrected"
            out.correction_note = "laboratory-reported corrected calcium"
    # Which ionized calcium, and whether it decides: the newest calcium result decides. One within 24 h of the total
    # calcium is of the same draw and decides (decision 2); one newer than that supersedes the total calcium; one
    # older than the total calcium by more is superseded by it, and only shown.
    latest_ionized = ctx.latest("calcium_ionized", mineral_days)
    if out.measured is None:
        out.ionized, out.ionized_role = latest_ionized, "alone"
    elif latest_ionized is not None:
        if latest_ionized.effective > out.measured.effective + timedelta(hours=t.ionized_pair_hours):
            out.ionized, out.ionized_role = latest_ionized, "newer"
        else:
            paired = ctx.closest("calcium_ionized", mineral_days, out.measured.effective, t.ionized_pair_hours)
            out.ionized, out.ionized_role = (paired, "paired") if paired is not None else (latest_ionized, "older")
    if out.ionized is not None:
        out.ionized_mmol_l = rnd(out.ionized.value, 2)

    iono_high = out.ionized_mmol_l is not None and out.ionized_mmol_l > t.ionized_ca_above_mmol_l
    corrected_high = False
    if out.ionized_decides:
        out.basis = "ionized"
        out.hypercalcemia = iono_high
        if out.corrected_mg_dl is not None and not iono_high and out.corrected_mg_dl >= t.moderate_hypercalcemia_at_least:
            out.discordant = True
    else:
        corrected_high = out.corrected_mg_dl is not None and out.corrected_mg_dl > out.threshold
        out.hypercalcemia = corrected_high

    measured_row = albumin_row = ionized_row = None
    if out.corrected and out.measured is not None:
        measured_row = lab_evidence(out.measured, label="Calcium, total (measured)")
        out.evidence.append(measured_row)
    if out.corrected_mg_dl is not None and out.measured is not None:
        # The threshold applies to this value only when it decides (an ionized calcium of the same draw decides instead).
        threshold = None if out.ionized_decides else f"> {fmt(out.threshold)} mg/dL ({'R1/R2' if renal != 'R0' else 'R0'})"
        notes = [out.correction_note]
        if out.ionized_role == "paired":
            notes.append("hypercalcemia is decided by the ionized calcium of the same draw")
        elif out.ionized_role == "newer":
            notes.append("hypercalcemia is decided by a newer ionized calcium")
        elif out.corrected:
            notes.append("in CKD the albumin correction may classify worse than the uncorrected value (Lian 2018); ionized calcium is preferred")
        if out.corrected:
            out.total_row = Evidence(
                label="Calcium, albumin-corrected",
                value=fmt(out.corrected_mg_dl),
                unit="mg/dL",
                date=iso(out.measured.effective),
                reference=out.measured.source.reference,
                code=out.measured.source.token,
                threshold=threshold,
                note="; ".join(notes),
            )
        else:  # the measured value itself (or the laboratory's corrected calcium), shown once
            label = "Calcium, total (measured)" if out.basis != "reported-corrected" else None
            out.total_row = lab_evidence(out.measured, label=label, threshold=threshold, note="; ".join(notes))
        out.evidence.append(out.total_row)
    if out.albumin is not None:
        albumin_row = lab_evidence(out.albumin, label="Albumin (for correction)")
        out.evidence.append(albumin_row)
    if out.ionized is not None:
        ionized_row = lab_evidence(
            out.ionized,
            threshold=f"> {fmt(t.ionized_ca_above_mmol_l)} mmol/L" if out.ionized_decides else None,
            note=_IONIZED_ROLE_NOTES[out.ionized_role or "alone"].format(hours=t.ionized_pair_hours),
        )
        out.evidence.append(ionized_row)
    # The facts behind the decision: a total calcium that crossed, with what it was computed from (decision 2:
    # measured and corrected shown), and an ionized calcium that crossed.
    fired = [out.total_row, *((measured_row, albumin_row) if out.corrected else ())] if corrected_high else []
    if iono_high:
        fired.append(ionized_row)
    out.fired = [row for row in fired if row is not None]
    return out


def calcium_phosphate_product(ctx: _Ctx, mineral_days: int) -> tuple[Product | None, str]:
    """Decision 1: the most recent phosphate × a measured total calcium of the same draw (≤ 24 h; ≤ 72 h with lag)."""
    t = ctx.t
    p = ctx.latest("phosphate", mineral_days)
    if p is None or ctx.latest("calcium_total", mineral_days) is None:
        return None, ""
    # The nearest usable calcium within the wider limit; "with lag" when it is not of the same draw.
    ca = ctx.closest("calcium_total", mineral_days, p.effective, max(t.pair_same_draw_hours, t.pair_max_lag_hours))
    if ca is None:
        return None, f"no total calcium within {t.pair_max_lag_hours} h of the latest phosphate: no Ca×P product"
    value = rnd(rnd(ca.value, 2) * rnd(p.value, 2), 1)
    ca_mm = ctx.catalog.convert(ca.value, ca.unit, "calcium_ionized")  # mg/dL → mmol/L via the Ca molar mass
    p_mm = p.value / _mg_dl_per_mmol_l(ctx.catalog, "phosphate")
    value_si = rnd(ca_mm * p_mm, 2)
    hours = Decimal(abs((p.effective - ca.effective).total_seconds())) / Decimal(3600)
    lag = abs(p.effective - ca.effective) > timedelta(hours=t.pair_same_draw_hours)
    note = f"paired with lag: calcium and phosphate {fmt(rnd(hours, 1))} h apart" if lag else ""
    return Product(value, value_si, ca, p, rnd(hours, 1), lag), note


def _mg_dl_per_mmol_l(catalog: Catalog, analyte: str) -> Decimal:
    return catalog.convert(Decimal(1), "mmol/L", analyte)


def phosphate_high(ctx: _Ctx, renal: str, age: int | None, mineral_days: int) -> tuple[bool, list[Evidence], bool]:
    t = ctx.t
    p = ctx.latest("phosphate", mineral_days)
    if p is None:
        return False, [], False
    value = rnd(p.value, 2)
    threshold = t.phosphate_renal_above if renal in ("R1", "R2") else t.phosphate_nonrenal_above
    note = None
    if age is not None and age <= t.paediatric_max_age:
        if p.ref_high is not None:
            threshold = rnd(p.ref_high, 2)
            note = "age < 18: the laboratory reference range's upper limit is used"
        else:
            note = "age < 18 but no reference range on the result: adult threshold used"
    high = value > threshold
    return high, [lab_evidence(p, threshold=f"> {fmt(threshold)} mg/dL", note=note)], True


# --------------------------------------------------------------------------- §2.3 calciphylaxis
def _current(m: MedicationFact) -> bool:
    return m.current


def _vka_counts(m: MedicationFact, now: datetime, days: int) -> bool:
    if m.current:
        return True
    if m.stop is not None:
        return within(m.stop, now, days)
    # Stopped/completed without a known stop date: it stopped between its start and now, so within the lookback for
    # certain only if it started in it.
    return m.start is not None and within(m.start, now, days)


def assess(facts: CaseFacts, t: Thresholds, now: datetime, catalog: Catalog) -> Outcome:
    ctx = _Ctx(facts, t, now, catalog)
    age = age_in_years(facts.patient.birth_date, now)
    sex = facts.patient.sex
    renal, renal_ev, renal_bases = renal_context(ctx)
    ckd4_only = renal == "R1"
    mineral_days = t.window_mineral_ckd4_days if ckd4_only else t.window_mineral_days
    pth_days = t.window_pth_ckd4_days if ckd4_only else t.window_pth_days

    calcium = calcium_finding(ctx, renal, mineral_days)
    product, product_note = calcium_phosphate_product(ctx, mineral_days)
    hyper_p, p_evidence, has_p = phosphate_high(ctx, renal, age, mineral_days)
    albumin = ctx.latest("albumin", mineral_days)
    pth = ctx.latest("pth_intact", pth_days)
    alp = ctx.latest("alp", t.window_alp_days)

    # ---- major factors
    majors: list[Factor] = []
    vkas = ctx.meds("vka", lambda m: _vka_counts(m, now, t.window_vka_stop_days))
    if vkas:
        majors.append(Factor(id="M1", label=MAJOR_LABELS["M1"].format(days=t.window_vka_stop_days), evidence=[medication_evidence(m) for m in vkas]))
    m2: list[Evidence] = []
    if product is not None and product.value > t.caxp_high_above:
        m2.append(product_evidence(product, f"> {fmt(t.caxp_high_above)} mg²/dL²"))
    if hyper_p:
        m2.extend(p_evidence)
    if calcium.hypercalcemia:
        m2.extend(calcium.fired)
    if m2:
        majors.append(Factor(id="M2", label=MAJOR_LABELS["M2"], evidence=m2))
    if albumin is not None and rnd(albumin.value, 2) < t.albumin_major_below:
        majors.append(Factor(id="M3", label=MAJOR_LABELS["M3"], evidence=[lab_evidence(albumin, threshold=f"< {fmt(t.albumin_major_below)} g/dL")]))
    if pth is not None:
        uln = pth.ref_high if pth.ref_high is not None else t.pth_default_uln_pg_ml
        limit = uln * t.pth_uln_multiple
        if exceeds(pth, limit, 1):
            source = "laboratory ULN" if pth.ref_high is not None else "default ULN"
            majors.append(
                Factor(
                    id="M4",
                    label=MAJOR_LABELS["M4"],
                    evidence=[
                        lab_evidence(pth, threshold=f"> {fmt(t.pth_uln_multiple)} × {fmt(rnd(uln, 1))} pg/mL ({source}) = {fmt(rnd(limit, 1))}", places=1)
                    ],
                )
            )

    # ---- minor factors
    minors: list[Factor] = []

    def minor(fid: str, evidence: list[Evidence]) -> None:
        if evidence:
            minors.append(Factor(id=fid, label=MINOR_LABELS[fid], evidence=evidence))

    if sex == "female":
        minor("female", [Evidence(label="Sex", value="female", reference=facts.patient.reference)])
    bmi_ev = _bmi_evidence(ctx)
    if bmi_ev is not None:
        bmi_value, ev = bmi_ev
        if bmi_value >= t.bmi_obese_at_least:
            minor("bmi_ge_30", [ev])
    else:
        minor("bmi_ge_30", [condition_evidence(c, note="no BMI available: obesity code used") for c in ctx.conditions("obesity")])
    minor("diabetes", [condition_evidence(c) for c in ctx.conditions("diabetes")])
    minor(
        "systemic_corticosteroid",
        [medication_evidence(m) for m in ctx.meds("systemic_corticosteroid", _current)]
        + [condition_evidence(c) for c in ctx.conditions("long_term_steroid_use")],
    )
    minor("liver_disease", [condition_evidence(c) for c in ctx.conditions("liver_disease")])
    minor("calcium_binder", [medication_evidence(m) for m in ctx.meds("calcium_binder", _current)])
    minor("vitamin_d_therapy", [medication_evidence(m) for m in ctx.meds("vitamin_d_therapy", _current)])
    if albumin is not None and t.albumin_major_below <= rnd(albumin.value, 2) < t.albumin_minor_below:
        minor("albumin_3_0_to_3_49", [lab_evidence(albumin, threshold=f"{fmt(t.albumin_major_below)}–<{fmt(t.albumin_minor_below)} g/dL")])
    if alp is not None:
        uln = alp.ref_high if alp.ref_high is not None else t.alp_default_uln_u_l
        if exceeds(alp, uln, 0):
            minor(
                "alp_gt_uln",
                [lab_evidence(alp, threshold=f"> {fmt(rnd(uln, 0))} U/L ({'laboratory ULN' if alp.ref_high is not None else 'default ULN'})", places=0)],
            )
    if t.count_thrombophilia_minor:
        minor("thrombophilia", [condition_evidence(c) for c in ctx.conditions("thrombophilia")])

    # ---- missing data (R1/R2)
    missing: list[str] = []
    orders: list[str] = []
    notes: list[str] = []
    if renal in ("R1", "R2"):
        for analyte, label in (("calcium_total", "calcium"), ("phosphate", "phosphate"), ("albumin", "albumin")):
            if ctx.latest(analyte, mineral_days) is None and not (analyte == "calcium_total" and calcium.measured is not None):
                missing.append(f"{label} (none within {mineral_days} d)")
        if missing:
            orders.append("renal_panel")
        if pth is None and t.pth_missing_marks_incomplete:
            missing.append(f"intact PTH (none within {pth_days} d)")
            orders.append("pth")
    incomplete = bool(missing)

    # ---- tier
    n_major, n_minor = len(majors), len(minors)
    if renal in ("R1", "R2"):
        if n_major >= t.high_min_majors or (n_major == 1 and n_minor >= t.high_one_major_min_minors):
            tier = "high"
        elif n_major == 1 or n_minor >= t.moderate_min_minors:
            tier = "moderate"
        else:
            tier = "low"
        explanation = f"{renal}: {n_major} major and {n_minor} minor factor(s)"
        if renal == "R1":
            stepped = {"high": "moderate", "moderate": "low", "low": "low"}[tier]
            explanation += f" → {tier} in a dialysis setting, one level lower in CKD G4 (R1): {stepped}"
            tier = stepped
        else:
            explanation += f" → {tier}"
    else:
        tier = "low" if (vkas and n_minor >= t.r0_vka_min_minors) else "none"
        explanation = (
            f"R0: vitamin K antagonist with {n_minor} minor factor(s) (non-uremic pathway) → low"
            if tier == "low"
            else f"R0: no renal context; the non-uremic pathway needs a vitamin K antagonist and ≥ {t.r0_vka_min_minors} minor factors"
        )
    established = ctx.conditions("calciphylaxis")
    modifiable: list[Evidence] = []
    if established:
        tier = "established"
        explanation = "calciphylaxis is on the problem list: risk tiering does not apply"
        modifiable.extend(medication_evidence(m, note="vitamin K antagonist") for m in vkas)
        modifiable.extend(medication_evidence(m, note="calcium-based binder") for m in ctx.meds("calcium_binder", _current))
        modifiable.extend(medication_evidence(m, note="vitamin D therapy") for m in ctx.meds("vitamin_d_therapy", _current))
        if product is not None and product.value > t.caxp_high_above:
            modifiable.append(product_evidence(product, f"> {fmt(t.caxp_high_above)} mg²/dL²"))
        incomplete = False

    # ---- §2.4 metastatic calcification
    predisposing: list[Factor] = []
    if renal in ("R1", "R2"):
        predisposing.append(Factor(id="renal", label=f"Renal context {renal}", evidence=renal_ev))
    for feature in PRED_CONDITIONS:
        found = ctx.conditions(feature)
        if found:
            predisposing.append(Factor(id=feature, label=catalog.features[feature].display, evidence=[condition_evidence(c) for c in found]))

    def iv_recent(m: MedicationFact) -> bool:
        return m.intravenous and (m.current or within(m.last_activity, now, t.window_iv_mineral_days))

    iv = [*ctx.meds("iv_calcium", iv_recent), *ctx.meds("iv_phosphate", iv_recent)]
    if iv:
        predisposing.append(Factor(id="iv_mineral", label="Current IV calcium or phosphate", evidence=[medication_evidence(m) for m in iv]))
    pred = bool(predisposing)
    has_ca = calcium.corrected_mg_dl is not None or calcium.ionized is not None
    hyper = calcium.hypercalcemia or hyper_p
    child = age is not None and age <= t.child_max_age
    moderate_product = t.caxp_moderate_child_at_least if child else t.caxp_moderate_at_least
    if product is not None and product.value > t.caxp_high_above:
        met, met_expl = "high", f"Ca×P {fmt(product.value)} > {fmt(t.caxp_high_above)} mg²/dL²"
    elif product is not None and product.value >= moderate_product:
        met, met_expl = "moderate", f"Ca×P {fmt(product.value)} ≥ {fmt(moderate_product)} mg²/dL²" + (" (age ≤ 12)" if child else "")
    elif hyper and pred:
        met, met_expl = "moderate", "hypercalcemia or hyperphosphatemia with a predisposing condition"
    elif pred and not (has_ca and has_p):
        met, met_expl = "insufficient-data", "predisposing condition without a valid calcium and phosphate in the window"
        if "renal_panel" not in orders:
            orders.append("renal_panel")
    elif hyper:
        met, met_expl = "low", "hypercalcemia or hyperphosphatemia without a predisposing condition: evaluate the cause"
    elif pred:
        met, met_expl = "low", "predisposing condition with calcium and phosphate inside the thresholds"
    else:
        met, met_expl = "none", "no predisposing condition and no abnormal calcium or phosphate"
    if product_note:
        notes.append(product_note)

    # ---- hypercalcemia severity (§2.4 "Also")
    severity = severity_band = None
    if calcium.corrected_mg_dl is not None and not (calcium.ionized_decides and not calcium.hypercalcemia):
        if calcium.corrected_mg_dl >= t.severe_hypercalcemia_at_least:
            severity, severity_band = "severe", f"≥ {fmt(t.severe_hypercalcemia_at_least)}"
        elif calcium.corrected_mg_dl >= t.moderate_hypercalcemia_at_least:
            severity = "moderate"
            severity_band = f"{fmt(t.moderate_hypercalcemia_at_least)} to < {fmt(t.severe_hypercalcemia_at_least)}"
            for o in ("pth", "pthrp", "vitamin_d_25oh", "vitamin_d_1_25"):
                if o not in orders:
                    orders.append(o)

    if calcium.discordant and calcium.corrected_mg_dl is not None and calcium.ionized_mmol_l is not None:
        notes.append(
            f"{calcium.total_label()} {fmt(calcium.corrected_mg_dl)} mg/dL is in a hypercalcemia severity band while the ionized "
            f"calcium that decides ({fmt(calcium.ionized_mmol_l)} mmol/L) is normal: discordant results, consider repeating both"
        )

    # ---- §2.5 context
    calcinosis = ctx.conditions("calcinosis_cutis")
    dystrophic = ctx.conditions(*DYSTROPHIC_CONDITIONS)
    if not facts.patient.present:
        notes.append("no Patient resource: sex and age unknown (the female-sex factor and paediatric thresholds could not be assessed)")
    elif age is None:
        notes.append("no birth date on the Patient: age unknown (adult thresholds used; paediatric thresholds could not be assessed)")
    for analyte, lab in facts.stale.items():
        if analyte not in STALE_NOTE_ANALYTES:
            continue
        notes.append(f"last known {lab.label} is stale ({iso(lab.effective)}): not used for tiering")
    return Outcome(
        age=age,
        sex=sex,
        renal=renal,
        renal_evidence=renal_ev,
        renal_bases=renal_bases,
        calciphylaxis_tier=tier,
        incomplete=incomplete,
        majors=majors,
        minors=minors,
        missing=missing,
        established=established,
        modifiable=modifiable,
        metastatic_tier=met,
        product=product,
        product_note=product_note,
        predisposing=predisposing,
        calcium=calcium,
        hyperphosphatemia=hyper_p,
        phosphate_evidence=p_evidence,
        severity=severity,
        severity_band=severity_band,
        calcinosis_cutis=calcinosis,
        dystrophic=dystrophic,
        iatrogenic=iv,
        orders=orders,
        notes=notes,
        stale=dict(facts.stale),
        explanations={"calciphylaxis": explanation, "metastatic": met_expl},
    )


def product_evidence(product: Product, threshold: str) -> Evidence:
    note = f"Ca {fmt(rnd(product.calcium.value, 2))} mg/dL ({product.calcium.source.reference}) × P {fmt(rnd(product.phosphate.value, 2))} mg/dL"
    if product.lag:
        note += f"; paired with lag ({fmt(product.hours_apart)} h apart)"
    return Evidence(
        label="Calcium × phosphate product",
        value=fmt(product.value),
        unit="mg²/dL²",
        date=iso(product.phosphate.effective),
        reference=product.phosphate.source.reference,
        threshold=threshold,
        note=note + f" = {fmt(product.value_si)} mmol²/L²",
    )


def _bmi_evidence(ctx: _Ctx) -> tuple[Decimal, Evidence] | None:
    t = ctx.t
    bmi = ctx.latest("bmi", t.window_body_days)
    if bmi is not None:
        value = rnd(bmi.value, 1)
        return value, lab_evidence(bmi, threshold=f"≥ {fmt(t.bmi_obese_at_least)} kg/m2", places=1)
    weight = ctx.latest("body_weight", t.window_body_days)
    height = ctx.latest("body_height", None)
    if weight is None or height is None or height.value <= 0:
        return None
    metres = height.value / 100
    value = rnd(weight.value / (metres * metres), 1)
    return value, Evidence(
        label="BMI (computed from weight and height)",
        value=fmt(value),
        unit="kg/m2",
        date=iso(weight.effective),
        reference=weight.source.reference,
        code=weight.source.token,
        threshold=f"≥ {fmt(t.bmi_obese_at_least)} kg/m2",
        note=f"height from {height.source.reference}",
    )
