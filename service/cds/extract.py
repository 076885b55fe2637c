"""FHIR R4 resources of one patient → :class:`CaseFacts` (REFERENCE §2.1, data ingestion and validity).

Rules applied here, each exclusion reported with its reason:
- Observations: mapped LOINC on *any* coding; status final/amended/corrected (preliminary only if
  configured); numeric valueQuantity with a known unit accepted for the analyte, converted to the
  canonical unit (mass↔substance by molar mass); no dataAbsentReason; no comparator, except "> v" and
  ">= v" for an analyte that keeps values above the assay's range (PTH); an effective time
  not in the future; referenceRange converted to the same unit; duplicates at one effective time keep
  corrected/amended over final, then the latest ``issued``.
- Conditions: clinicalStatus active/recurrence/relapse (or absent on a problem-list item; status-type
  codes count unless resolved); verificationStatus neither refuted nor entered-in-error; codes that
  require a text (E83.59) count only with it.
- Medications (Request, Statement, Administration): never-taken statuses (cancelled, draft, not-taken,
  not-done, entered-in-error) excluded; current by status or by an effective/validity period overlapping
  now, except when the status says the drug was stopped (or, for a statement, completed); stop dates kept
  for the VKA lookback; intravenous route from the route coding or text, or a parenteral product.
- Procedures: completed or in progress, performed not in the future.
Windows are applied by the rules; here only obviously stale lab values are dropped from validation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

from service.cds.fhirutil import (
    all_matches,
    codings,
    concept_texts,
    first_match,
    is_number,
    parse_date,
    parse_datetime,
    resource_ref,
    to_decimal,
    version_of,
)
from service.cds.grouping import resolve_medication
from service.cds.model import (
    CaseFacts,
    ConditionFact,
    Excluded,
    LabSeries,
    LabValue,
    MedicationFact,
    PatientInfo,
    ProcedureFact,
    Source,
)
from service.cds.thresholds import Thresholds
from service.cds.validate import validation_error
from service.terminology.catalog import Catalog, MedicationMatch, UnitConversionError

UCUM = "http://unitsofmeasure.org"
_OBS_STATUS_RANK = {"corrected": 2, "amended": 2, "final": 1, "preliminary": 0}
_COND_CURRENT = frozenset({"active", "recurrence", "relapse"})
_COND_INVALID_VERIFICATION = frozenset({"refuted", "entered-in-error"})
_PROC_DONE = frozenset({"completed", "in-progress"})


@dataclass(frozen=True, slots=True)
class _MedStatuses:
    current: frozenset[str]  #: current whatever the period
    ended: frozenset[str]  #: no longer taken whatever the period (a MedicationRequest's is its dispensing window)
    never_taken: frozenset[str]  #: not a medication fact at all


#: By resource type; any other status is current when the period overlaps now.
_MED_STATUSES = {
    "MedicationRequest": _MedStatuses(frozenset({"active", "on-hold"}), frozenset({"stopped"}), frozenset({"entered-in-error", "cancelled", "draft"})),
    "MedicationStatement": _MedStatuses(
        frozenset({"active", "on-hold", "intended"}), frozenset({"stopped", "completed"}), frozenset({"entered-in-error", "not-taken"})
    ),
    "MedicationAdministration": _MedStatuses(frozenset({"in-progress"}), frozenset({"stopped"}), frozenset({"entered-in-error", "not-done"})),
}
#: Features that count only when the product is given intravenously.
IV_FEATURES = frozenset({"iv_calcium", "iv_phosphate"})
#: Features that do not count when every route on the record is local (REFERENCE §2.3 "systemic corticosteroid").
SYSTEMIC_FEATURES = frozenset({"systemic_corticosteroid"})


def analyte_windows(t: Thresholds) -> dict[str, int | None]:
    """Widest lookback window per analyte (REFERENCE §2.1 table); None = any time (height). Analytes not listed use
    the renal-function window."""
    mineral = max(t.window_mineral_days, t.window_mineral_ckd4_days)
    return {
        "calcium_total": mineral,
        "calcium_corrected_reported": mineral,
        "calcium_ionized": mineral,
        "phosphate": mineral,
        "albumin": mineral,
        "pth_intact": max(t.window_pth_days, t.window_pth_ckd4_days),
        "alp": t.window_alp_days,
        "vitamin_d_25oh": t.window_vitamin_d_days,
        "vitamin_d_1_25": t.window_vitamin_d_days,
        "egfr": t.window_renal_function_days,
        "creatinine": t.window_renal_function_days,
        "bmi": t.window_body_days,
        "body_weight": t.window_body_days,
        "body_height": None,
    }


class _Extractor:
    def __init__(self, catalog: Catalog, t: Thresholds, now: datetime, medications: dict[str, dict[str, Any]]):
        self.catalog = catalog
        self.t = t
        self.now = now
        self.medications = medications
        self.excluded: list[Excluded] = []
        self.ignored: dict[str, int] = {}
        self.inputs: dict[str, str | None] = {}
        self.labs: dict[str, LabSeries] = {}
        self.stale: dict[str, LabValue] = {}
        self.candidates: list[_LabCandidate] = []
        self.unvalidated: dict[str, dict[str, Any]] = {}
        self.stale_candidates: dict[str, tuple[datetime, dict[str, Any], Any, dict[str, Any], str, str]] = {}
        self.conditions: list[ConditionFact] = []
        self.medication_facts: list[MedicationFact] = []
        self.procedures: list[ProcedureFact] = []
        windows = analyte_windows(t)
        days = {a: windows.get(a, t.window_renal_function_days) for a in catalog.analytes}
        self.cutoffs = {a: (now - timedelta(days=d) if d is not None else None) for a, d in days.items()}

    # ------------------------------------------------------------------ helpers
    def exclude(self, ref: str | None, reason: str) -> None:
        self.excluded.append(Excluded(reference=ref or "(no id)", reason=reason))

    def ignore(self, rtype: str) -> None:
        self.ignored[rtype] = self.ignored.get(rtype, 0) + 1

    def note_input(self, res: dict[str, Any]) -> str:
        ref = resource_ref(res) or f"{res.get('resourceType')}/(no id)"
        self.inputs[ref] = version_of(res)
        return ref

    # ------------------------------------------------------------------ Observation
    def observation(self, res: dict[str, Any]) -> None:
        entry, coding = first_match(res.get("code"), self.catalog.observation)  # most Observations are not ours
        if entry is None or coding is None:
            self.ignore("Observation")
            return
        ref = self.note_input(res)
        if not entry.use:
            self.exclude(ref, entry.note or f"LOINC {entry.code} is recognised but not used")
            return
        status = res.get("status")
        if status not in ("final", "amended", "corrected") and not (status == "preliminary" and self.t.accept_preliminary):
            self.exclude(ref, f"status {status}")
            return
        effective = _effective(res)
        if effective is None:
            self.exclude(ref, "no effective time")
            return
        if effective > self.now:
            self.exclude(ref, "effective time in the future")
            return
        cutoff = self.cutoffs[entry.analyte]
        if cutoff is not None and effective < cutoff:
            # Stale: never used for tiering. Only the newest stale value is shown ("last known"), so only it is
            # worth reading further; keep the candidate and finish it in finish_labs().
            prev = self.stale_candidates.get(entry.analyte)
            if prev is None or prev[0] < effective:
                self.stale_candidates[entry.analyte] = (effective, res, entry, coding, ref, status)
            return
        candidate = self._lab_candidate(res, entry, coding, ref, status, effective)
        if candidate is not None:
            self.candidates.append(candidate)

    def _lab_candidate(self, res: dict[str, Any], entry: Any, coding: dict[str, Any], ref: str, status: str,
                       effective: datetime) -> _LabCandidate | None:
        """Every check that can exclude a value (reported for each value, read or not); the value itself is
        converted only when a rule reads it (:class:`LabSeries`)."""
        if res.get("dataAbsentReason") is not None:
            self.exclude(ref, "dataAbsentReason present")
            return None
        vq = res.get("valueQuantity")
        if not isinstance(vq, dict):
            self.exclude(ref, "no valueQuantity")
            return None
        comparator = vq.get("comparator")
        if comparator and not (comparator in (">", ">=") and self.catalog.analytes[entry.analyte].above_range_values):
            self.exclude(ref, f"value has comparator {comparator}")
            return None
        value = vq.get("value")
        if not is_number(value):
            self.exclude(ref, "valueQuantity.value is missing, not a number or out of range")
            return None
        number = value if type(value) in (int, float) else to_decimal(value)
        if number is None or number <= 0:  # no concentration, activity or body measure the rules read can be zero or negative
            self.exclude(ref, "valueQuantity.value is not positive")
            return None
        unit = _unit_of(vq)
        error = self.catalog.conversion_error(unit, entry.analyte)
        if error is not None:
            self.exclude(ref, f"unit not convertible: {error}")
            return None
        return _LabCandidate(res, entry, coding, ref, status, effective, parse_datetime(res.get("issued")), value, unit, comparator or None)

    def finish_labs(self) -> None:
        """Resolve duplicates at one effective time; building each value and validating its resource are deferred
        to first use."""
        for analyte, (effective, res, entry, coding, ref, status) in self.stale_candidates.items():
            candidate = self._lab_candidate(res, entry, coding, ref, status, effective)
            if candidate is not None:
                self.stale[analyte] = build_lab(self.catalog, candidate)
        by_time: dict[tuple[str, datetime], list[_LabCandidate]] = {}
        for c in self.candidates:
            self.unvalidated[c.ref] = c.res
            by_time.setdefault((c.entry.analyte, c.effective), []).append(c)
        listed: dict[str, list[_LabCandidate]] = {}
        for (analyte, _), same_time in by_time.items():
            if len(same_time) > 1:
                same_time.sort(key=_lab_preference, reverse=True)
                for loser in same_time[1:]:
                    self.exclude(
                        loser.ref, f"duplicate {analyte} result at the same time; {same_time[0].ref} ({same_time[0].status}) preferred"
                    )
            listed.setdefault(analyte, []).append(same_time[0])
        build = partial(build_lab, self.catalog)
        for analyte, values in listed.items():
            values.sort(key=lambda c: (c.effective, c.issued or c.effective), reverse=True)
            self.labs[analyte] = LabSeries(values, build)

    # ------------------------------------------------------------------ Condition
    def condition(self, res: dict[str, Any]) -> None:
        matches = all_matches(res.get("code"), self.catalog.condition)
        if not matches:
            self.ignore("Condition")
            return
        ref = self.note_input(res)
        verification = _status_code(res.get("verificationStatus"))
        if verification in _COND_INVALID_VERIFICATION:
            self.exclude(ref, f"verificationStatus {verification}")
            return
        clinical = _status_code(res.get("clinicalStatus"))
        problem_list_item = _is_problem_list_item(res)
        # Every mapped coding counts, each feature once: [E83.59, 237900002] is calciphylaxis whichever comes first.
        facts: dict[str, ConditionFact] = {}
        reasons: list[str] = []
        for entry, coding in matches:
            if entry.feature in facts:
                continue
            if entry.status_code:
                reason = "clinicalStatus resolved" if clinical == "resolved" else None
            elif clinical is None:
                reason = None if problem_list_item else "no clinicalStatus (and not a problem-list item)"
            else:
                reason = None if clinical in _COND_CURRENT else f"clinicalStatus {clinical}"
            qualifying_text = None
            if reason is None and entry.requires_text:
                needle = entry.requires_text.lower()
                qualifying_text = next((t for t in concept_texts(res.get("code")) if needle in t.lower()), None)
                if qualifying_text is None:
                    reason = f"{entry.code} counts as {entry.feature} only when its text says '{entry.requires_text}'"
            if reason is not None:
                reasons.append(reason)
                continue
            facts[entry.feature] = ConditionFact(
                feature=entry.feature,
                source=Source(ref, version_of(res), coding.get("system", ""), coding["code"], coding.get("display") or entry.display),
                onset=parse_datetime(res.get("onsetDateTime")) or parse_datetime(res.get("recordedDate")),
                clinical_status=clinical,
                qualifying_text=qualifying_text,
            )
        if not facts:
            self.exclude(ref, reasons[0])
            return
        self.unvalidated[ref] = res  # validated when a rule consults the fact
        self.conditions.extend(facts.values())

    # ------------------------------------------------------------------ Medications
    def medication(self, res: dict[str, Any]) -> None:
        rtype = res["resourceType"]
        concept = res.get("medicationCodeableConcept")
        med = None
        if concept is None and "medicationReference" in res:
            med = resolve_medication(res.get("medicationReference"), self.medications, res.get("contained"))
            if med is None:
                ref = self.note_input(res)
                self.exclude(ref, "medicationReference could not be resolved")
                return
            concept = med.get("code")
        recognised = recognise_medication(self.catalog, concept, med)
        if recognised is None:
            self.ignore(rtype)
            return
        match, coding = recognised.match, recognised.coding
        ref = self.note_input(res)
        status = res.get("status")
        statuses = _MED_STATUSES[rtype]
        if status in statuses.never_taken:
            self.exclude(ref, f"status {status}" if status == "entered-in-error" else f"status {status}: not taken")
            return
        features = match.features
        if given_locally(self.catalog, match, res):
            features = features - SYSTEMIC_FEATURES
            if not features:
                self.exclude(ref, "local route (topical, inhaled or similar): not a systemic corticosteroid")
                return
        start, stop = _medication_period(res)
        if start is not None and start > self.now:
            self.exclude(ref, "starts in the future")
            return
        if status in statuses.ended:
            current = False
            if stop is not None and stop > self.now:
                stop = None  # the end of a period it was stopped within: when it stopped is not known
        else:
            current = status in statuses.current or (start is not None and stop is not None and start <= self.now <= stop)
        self.unvalidated[ref] = res  # validated when a rule consults the fact
        last = max(start, stop) if start is not None and stop is not None else start or stop
        self.medication_facts.append(
            MedicationFact(
                features=features,
                source=Source(ref, version_of(res), coding.get("system") or "", coding.get("code") or "", coding.get("display") or match.entry.display),
                resource_type=rtype,
                status=str(status),
                current=current,
                start=start,
                stop=stop,
                last_activity=last,
                intravenous=given_intravenously(self.catalog, match, res),
                recognised_by=recognised.how,
            )
        )

    # ------------------------------------------------------------------ Procedure
    def procedure(self, res: dict[str, Any]) -> None:
        matches = all_matches(res.get("code"), self.catalog.procedure)
        if not matches:
            self.ignore("Procedure")
            return
        ref = self.note_input(res)
        status = res.get("status")
        if status not in _PROC_DONE:
            self.exclude(ref, f"status {status}")
            return
        period = res.get("performedPeriod")
        performed = parse_datetime(res.get("performedDateTime"))
        if performed is None and isinstance(period, dict):
            performed = parse_datetime(period.get("end")) or parse_datetime(period.get("start"))
        if performed is None:
            self.exclude(ref, "no performed time")
            return
        if performed > self.now:
            self.exclude(ref, "performed time in the future")
            return
        self.unvalidated[ref] = res  # validated when a rule consults the fact
        seen: set[str] = set()
        for entry, coding in matches:  # every mapped coding counts: one fact per feature, from its first coding
            if entry.feature in seen:
                continue
            seen.add(entry.feature)
            self.procedures.append(
                ProcedureFact(
                    feature=entry.feature,
                    source=Source(ref, version_of(res), coding.get("system", ""), coding["code"], coding.get("display") or entry.display),
                    performed=performed,
                )
            )


@dataclass(slots=True)
class _LabCandidate:
    """An in-window lab result that passed every check, not yet converted."""

    res: dict[str, Any]
    entry: Any
    coding: dict[str, Any]
    ref: str
    status: str
    effective: datetime
    issued: datetime | None
    value: Any  # valueQuantity.value as in the JSON (a number)
    unit: str | None
    comparator: str | None = None  # ">" or ">=" (an analyte that keeps values above the assay's range)


def build_lab(catalog: Catalog, c: _LabCandidate) -> LabValue:
    """The fact for a checked candidate (its unit is accepted for the analyte, so the conversion cannot fail)."""
    analyte = c.entry.analyte
    raw = to_decimal(c.value)
    assert raw is not None  # checked by _lab_candidate
    definition = catalog.analytes[analyte]
    return LabValue(
        analyte=analyte,
        label=c.entry.label or definition.display,
        value=catalog.convert(raw, c.unit, analyte),
        unit=definition.canonical_unit,
        raw_value=raw,
        raw_unit=c.unit or "",
        effective=c.effective,
        issued=c.issued,
        status=c.status,
        source=Source(c.ref, version_of(c.res), c.coding.get("system", ""), c.coding["code"], c.entry.display),
        ref_high=_reference_high(catalog, c.res, analyte),
        comparator=c.comparator,
    )


def _reference_high(catalog: Catalog, res: dict[str, Any], analyte: str) -> Decimal | None:
    """``referenceRange.high`` in the canonical unit, of the first range with a usable bound (the rules read only
    the upper limit: laboratory ULN for PTH and ALP, paediatric phosphate)."""
    ranges = res.get("referenceRange")
    if not isinstance(ranges, list):
        return None
    for rr in ranges:
        if not isinstance(rr, dict):
            continue
        high = _bound(catalog, rr.get("high"), analyte)
        if high is not None or _bound(catalog, rr.get("low"), analyte) is not None:
            return high
    return None


def _bound(catalog: Catalog, q: Any, analyte: str) -> Decimal | None:
    v = to_decimal(q.get("value")) if isinstance(q, dict) else None
    if v is None:
        return None
    try:
        return catalog.convert(v, _unit_of(q), analyte)
    except UnitConversionError:
        return None


@dataclass(frozen=True, slots=True)
class RecognisedMedication:
    """What a medication record is, for the rules: its ingredients' features, the coding shown as its source, and
    how it was recognised when not by one of its own mapped codes."""

    match: MedicationMatch
    coding: dict[str, Any]
    how: str | None = None


def _combined(matches: list[MedicationMatch]) -> MedicationMatch:
    """Every mapped coding's ingredients together; the entry of a parenteral product first (it decides the route)."""
    if len(matches) == 1:
        return matches[0]
    ingredients = tuple(dict.fromkeys(i for m in matches for i in m.ingredients))
    entry = next((m.entry for m in matches if m.entry.parenteral), matches[0].entry)
    return MedicationMatch(entry, ingredients)


def recognise_medication(catalog: Catalog, concept: Any, medication: dict[str, Any] | None) -> RecognisedMedication | None:
    """A medication's features from every mapped coding of its concept; failing that, from the referenced
    Medication's ``ingredient`` codings; failing that, by an ingredient's name in its text or displays (the
    features ``recognise_by_name`` allows). None: not a drug the rules weigh."""
    hits = all_matches(concept, catalog.medication_with_features)
    if hits:
        return RecognisedMedication(_combined([m for m, _ in hits]), hits[0][1])
    ingredients = medication.get("ingredient") if medication is not None else None
    if isinstance(ingredients, list):
        hits = [h for i in ingredients if isinstance(i, dict) for h in all_matches(i.get("itemCodeableConcept"), catalog.medication_with_features)]
        if hits:
            listed = ", ".join(c.get("display") or c["code"] for _, c in hits)
            return RecognisedMedication(_combined([m for m, _ in hits]), next(codings(concept), hits[0][1]), f"recognised by its ingredient ({listed})")
    by_name = catalog.medication_by_name(concept_texts(concept))
    if by_name is None:
        return None
    match, names = by_name
    coding = next(codings(concept), {"display": concept_texts(concept)[0]})
    return RecognisedMedication(match, coding, f"recognised by name ({', '.join(names)}): its code is not in the mappings")


def given_intravenously(catalog: Catalog, match: MedicationMatch, res: dict[str, Any]) -> bool:
    """Whether an IV calcium/phosphate product is given intravenously: a parenteral product, or an IV route on the
    record. The route is read only for those drugs."""
    return bool(match.features & IV_FEATURES) and (match.entry.parenteral or "intravenous" in _routes(catalog, res))


def given_locally(catalog: Catalog, match: MedicationMatch, res: dict[str, Any]) -> bool:
    """Whether a drug that counts only when systemic (a corticosteroid) is given by a local route (topical, ophthalmic,
    otic, nasal, inhaled, vaginal) on every dosage that names a route. The route is read only for those drugs."""
    return bool(match.features & SYSTEMIC_FEATURES) and _routes(catalog, res) == {"local"}


def _routes(catalog: Catalog, res: dict[str, Any]) -> set[str]:
    """Route features of a record's dosages: from a route coding mapped to one, or from route.text (mapped words)."""
    found: set[str] = set()
    dosages: list[Any] = []
    for key in ("dosageInstruction", "dosage"):
        d = res.get(key)
        if isinstance(d, list):
            dosages.extend(d)
        elif isinstance(d, dict):
            dosages.append(d)
    for d in dosages:
        route = d.get("route") if isinstance(d, dict) else None
        if not isinstance(route, dict):
            continue
        named = {f for c in codings(route) if (f := catalog.route_feature(c.get("system"), c["code"])) is not None}
        # Not coded in a mapped system (an NCI or local code, or text only): the words of its text and displays.
        for text in () if named else concept_texts(route):
            padded = " " + " ".join(text.lower().replace(",", " ").split()) + " "
            named |= {f for f, patterns in catalog.route_text_patterns.items() if any(f" {p} " in padded for p in patterns)}
        # A route that is coded or written but not mapped is "other": a dosage by an unknown route is not local
        found |= named or {"other"}
    return found


def _unit_of(q: dict[str, Any]) -> str | None:
    code, system, unit = q.get("code"), q.get("system"), q.get("unit")
    if isinstance(code, str) and code and (system is None or system == UCUM):
        return code
    return unit if isinstance(unit, str) and unit else None


def _effective(res: dict[str, Any]) -> datetime | None:
    eff = parse_datetime(res.get("effectiveDateTime")) or parse_datetime(res.get("effectiveInstant"))
    if eff is None:
        period = res.get("effectivePeriod")
        if isinstance(period, dict):
            eff = parse_datetime(period.get("start")) or parse_datetime(period.get("end"))
    return eff


def _lab_preference(c: _LabCandidate) -> tuple[int, datetime]:
    return (_OBS_STATUS_RANK.get(c.status, 0), c.issued or c.effective)


def _status_code(concept: Any) -> str | None:
    for c in codings(concept):
        return str(c["code"])
    return None


def _is_problem_list_item(res: dict[str, Any]) -> bool:
    cats = res.get("category")
    return isinstance(cats, list) and any(c.get("code") == "problem-list-item" for cat in cats for c in codings(cat))


def _medication_period(res: dict[str, Any]) -> tuple[datetime | None, datetime | None]:
    rtype = res.get("resourceType")
    if rtype == "MedicationRequest":
        dr = res.get("dispenseRequest")
        vp = dr.get("validityPeriod") if isinstance(dr, dict) else None
        start = parse_datetime(res.get("authoredOn"))
        stop = None
        if isinstance(vp, dict):
            start = parse_datetime(vp.get("start")) or start
            stop = parse_datetime(vp.get("end"))
        return start, stop
    eff = parse_datetime(res.get("effectiveDateTime"))
    if eff is not None:
        return eff, eff if rtype == "MedicationAdministration" else None
    period = res.get("effectivePeriod")
    if isinstance(period, dict):
        return parse_datetime(period.get("start")), parse_datetime(period.get("end"))
    return parse_datetime(res.get("dateAsserted")), None


def extract_facts(
    resources: Iterable[dict[str, Any]],
    *,
    patient_ref: str,
    catalog: Catalog,
    thresholds: Thresholds,
    now: datetime,
    medications: dict[str, dict[str, Any]] | None = None,
) -> CaseFacts:
    """Build the facts of one patient from their resources (already grouped by patient)."""
    ex = _Extractor(catalog, thresholds, now, medications or {})
    patient: dict[str, Any] | None = None
    handlers = {
        "Observation": ex.observation,
        "Condition": ex.condition,
        "MedicationRequest": ex.medication,
        "MedicationStatement": ex.medication,
        "MedicationAdministration": ex.medication,
        "Procedure": ex.procedure,
    }
    for res in resources:
        rtype = res.get("resourceType")
        if rtype == "Patient":
            patient = res
            continue
        handler = handlers.get(rtype) if isinstance(rtype, str) else None
        if handler is None:
            ex.ignore(rtype if isinstance(rtype, str) else "(no resourceType)")
            continue
        try:
            handler(res)
        except (TypeError, ValueError, AttributeError, KeyError, ArithmeticError) as exc:
            # An element of a type FHIR does not allow (a list for a code, a bool for a string) that a check above
            # did not foresee: that one resource is left out, with the reason, and the rest of the record counts.
            ex.exclude(resource_ref(res) or f"{rtype}/(no id)", f"malformed resource ({type(exc).__name__})")
    ex.finish_labs()
    info = PatientInfo(reference=patient_ref, present=False, sex=None, birth_date=None)
    if patient is not None:
        ref = ex.note_input(patient)
        error = validation_error(patient)
        if error is not None:
            ex.exclude(ref, error)
        else:
            gender = patient.get("gender")
            info = PatientInfo(
                reference=patient_ref,
                present=True,
                sex=gender if isinstance(gender, str) else None,
                birth_date=parse_date(patient.get("birthDate")),
            )
    return CaseFacts(
        patient=info,
        labs=ex.labs,
        stale=ex.stale,
        conditions=ex.conditions,
        medications=ex.medication_facts,
        procedures=ex.procedures,
        excluded=ex.excluded,
        ignored=ex.ignored,
        inputs=ex.inputs,
        unvalidated=ex.unvalidated,
    )
