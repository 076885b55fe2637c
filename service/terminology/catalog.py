"""The loaded terminology: ``(system, code)`` → what it means for the rules. Pure data, no I/O.

The clinical core receives a :class:`Catalog` and never sees a code literal: it asks which analyte an
Observation code measures, which feature a Condition code stands for, and how to convert a unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from typing import TypeVar

from service.terminology.schema import (
    AnalyteDef,
    ConditionEntry,
    FeatureDef,
    MedicationEntry,
    ObservationEntry,
    OrderAlternative,
    OrderSet,
    ProcedureEntry,
    UnitDef,
)


class UnitConversionError(ValueError):
    """A value's unit is unknown or not accepted for its analyte."""


@dataclass(frozen=True, slots=True)
class MedicationMatch:
    """A medication code resolved to its ingredient(s) and their features."""

    entry: MedicationEntry
    ingredients: tuple[MedicationEntry, ...]
    features: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", frozenset(i.feature for i in self.ingredients if i.feature))


@dataclass(frozen=True)
class Catalog:
    version: str
    units: dict[str, UnitDef]
    unit_aliases: dict[str, str]
    analytes: dict[str, AnalyteDef]
    features: dict[str, FeatureDef]
    observations: dict[tuple[str, str], ObservationEntry]
    conditions: dict[tuple[str, str], ConditionEntry]
    condition_prefixes: tuple[ConditionEntry, ...]
    medications: dict[tuple[str, str], MedicationEntry]
    procedures: dict[tuple[str, str], ProcedureEntry]
    procedure_prefixes: tuple[ProcedureEntry, ...]
    routes: dict[tuple[str, str], str]
    #: Route feature → words of route.text that mean it.
    route_text_patterns: dict[str, tuple[str, ...]]
    order_sets: dict[str, OrderSet]
    conditions_dotless: dict[tuple[str, str], ConditionEntry] = field(default_factory=dict, repr=False)
    order_alternatives: dict[str, OrderAlternative] = field(default_factory=dict)
    #: (name key, ingredient) of the features medications.yaml lets be recognised by name, longest name first.
    medication_names: tuple[tuple[str, MedicationEntry], ...] = ()
    #: Every medication code resolved to its ingredients once (the catalog never changes after loading).
    _medication_matches: dict[tuple[str, str], MedicationMatch] = field(init=False, repr=False, compare=False)
    _conversion_errors: dict[tuple[str | None, str], str | None] = field(init=False, default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ lookups
    def observation(self, system: str | None, code: str | None) -> ObservationEntry | None:
        if not isinstance(system, str) or not isinstance(code, str):
            return None
        return self.observations.get((system, code))

    def condition(self, system: str | None, code: str | None) -> ConditionEntry | None:
        if not isinstance(system, str) or not isinstance(code, str):
            return None
        hit = self.conditions.get((system, code)) or self.conditions_dotless.get((system, _dotless(code)))
        if hit is not None:
            return hit
        # Prefix rules (e.g. ICD-10-CM "M34.x"): the longest matching prefix wins.
        return _longest_prefix(self.condition_prefixes, system, code)

    def procedure(self, system: str | None, code: str | None) -> ProcedureEntry | None:
        if not isinstance(system, str) or not isinstance(code, str):
            return None
        hit = self.procedures.get((system, code))
        if hit is not None:
            return hit
        return _longest_prefix(self.procedure_prefixes, system, code)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_medication_matches", {key: self._resolve_medication(entry) for key, entry in self.medications.items()})

    def medication(self, system: str | None, code: str | None) -> MedicationMatch | None:
        if not isinstance(system, str) or not isinstance(code, str):
            return None
        return self._medication_matches.get((system, code))

    def medication_with_features(self, system: str | None, code: str | None) -> MedicationMatch | None:
        """:meth:`medication`, when the code maps to at least one feature (a drug the rules weigh)."""
        match = self.medication(system, code)
        return match if match is not None and match.features else None

    def medication_by_name(self, texts: list[str]) -> tuple[MedicationMatch, list[str]] | None:
        """The ingredients (of the features ``recognise_by_name`` lists) whose names appear as whole words in
        ``texts`` (a record's text and coding displays), with the names found; None when there is none."""
        if not self.medication_names or not texts:
            return None
        haystack = " ".join(name_key(t) for t in texts)
        padded = f" {haystack} "
        found: list[MedicationEntry] = []
        names: list[str] = []
        for key, entry in self.medication_names:
            if f" {key} " in padded and entry not in found:
                found.append(entry)
                names.append(entry.display or key)
        if not found:
            return None
        return MedicationMatch(found[0], tuple(found)), names

    def _resolve_medication(self, entry: MedicationEntry) -> MedicationMatch:
        if entry.feature:
            return MedicationMatch(entry, (entry,))
        ingredients = tuple(
            self.medications[(entry.system or "", c)] for c in entry.ingredients if (entry.system or "", c) in self.medications
        )
        return MedicationMatch(entry, ingredients)

    def route_feature(self, system: str | None, code: str | None) -> str | None:
        if not isinstance(system, str) or not isinstance(code, str):
            return None
        return self.routes.get((system, code))

    def codes_for_feature(self, feature: str) -> list[tuple[str, str]]:
        """(system, code) pairs of every condition/procedure/medication ingredient or product for a feature."""
        out: list[tuple[str, str]] = []
        for key, c in self.conditions.items():
            if c.feature == feature:
                out.append(key)
        for key, p in self.procedures.items():
            if p.feature == feature:
                out.append(key)
        for key in self.medications:
            match = self.medication(*key)
            if match is not None and feature in match.features:
                out.append(key)
        return sorted(out)

    def codes_for_analyte(self, analyte: str, *, used_only: bool = True) -> list[tuple[str, str]]:
        return sorted(k for k, e in self.observations.items() if e.analyte == analyte and (e.use or not used_only))

    # ------------------------------------------------------------------ units
    def conversion_error(self, unit: str | None, analyte: str) -> str | None:
        """Why a value in ``unit`` cannot be converted for ``analyte`` (None: it can). Depends on the unit and
        the analyte only, never on the value, so it is remembered."""
        key = (unit, analyte)
        if key in self._conversion_errors:
            return self._conversion_errors[key]
        try:
            self.convert(Decimal(1), unit, analyte)
            error = None
        except UnitConversionError as exc:
            error = str(exc)
        if len(self._conversion_errors) < 10_000:  # units come from requests: bounded
            self._conversion_errors[key] = error
        return error

    def canonical_unit_code(self, unit: str | None) -> str | None:
        if unit is None:
            return None
        if unit in self.units:
            return unit
        return self.unit_aliases.get(unit.strip().lower())

    def convert(self, value: Decimal, unit: str | None, analyte: str) -> Decimal:
        """Convert ``value`` in ``unit`` to the analyte's canonical unit.

        Raises :class:`UnitConversionError` when the unit is unknown, not in the analyte's accepted
        list (REFERENCE §4: "mg/L" for calcium is excluded, not rescaled), or needs a molar mass the
        analyte does not have.
        """
        a = self.analytes[analyte]
        code = self.canonical_unit_code(unit)
        if code is None:
            raise UnitConversionError(f"unit {unit!r} is not a known UCUM unit")
        if code not in a.units:
            raise UnitConversionError(f"unit {code} is not accepted for {analyte}")
        if code == a.canonical_unit:
            return value
        src, dst = self.units[code], self.units[a.canonical_unit]
        base = value * src.factor
        if src.dimension != dst.dimension:
            if a.molar_mass is None:
                raise UnitConversionError(f"cannot convert {code} to {a.canonical_unit} without a molar mass")
            if src.dimension == "substance_concentration" and dst.dimension == "mass_concentration":
                base = base * a.molar_mass
            elif src.dimension == "mass_concentration" and dst.dimension == "substance_concentration":
                base = base / a.molar_mass
            else:
                raise UnitConversionError(f"cannot convert {src.dimension} to {dst.dimension}")
        return base / dst.factor


def name_key(text: str) -> str:
    """A drug name compared by its words: lower case, every run of other characters one space."""
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


@lru_cache(maxsize=65_536)
def _dotless(code: str) -> str:
    # Memoised: every unmapped ICD code of a record is compared with every prefix entry.
    return code.replace(".", "").strip().upper()


_E = TypeVar("_E", ConditionEntry, ProcedureEntry)


def _longest_prefix(entries: tuple[_E, ...], system: str, code: str) -> _E | None:
    """The prefix entry of ``system`` that matches ``code`` with the longest prefix (most specific), if any."""
    best: _E | None = None
    key = _dotless(code)
    for entry in entries:
        if entry.system == system and key.startswith(_dotless(entry.code)) and (best is None or len(entry.code) > len(best.code)):
            best = entry
    return best
