"""Data the clinical core passes around: extracted facts and the Assessment it returns.

Facts are slotted dataclasses, hashable and treated as immutable: nothing assigns to a fact after it is built
(not ``frozen=True``, whose ``__init__`` costs about three times as much on the hot path); the Assessment is a pydantic model
whose JSON form is the contract's (``CONTRACT.md`` "Assessment"), with extra explanatory keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal, Protocol, overload

from pydantic import BaseModel, ConfigDict, Field

from service.cds.validate import validation_error as _validation_error


class Excluded(BaseModel):
    model_config = ConfigDict(frozen=True)
    reference: str
    reason: str


@dataclass(slots=True, unsafe_hash=True)
class Source:
    """Where a fact came from: the resource reference, its version and the matching coding."""

    reference: str
    version: str | None
    system: str
    code: str
    display: str

    @property
    def token(self) -> str:
        """``system|code``, as evidence rows carry it."""
        return f"{self.system}|{self.code}"


@dataclass(slots=True, unsafe_hash=True)
class LabValue:
    analyte: str
    label: str
    value: Decimal  # canonical unit, not yet rounded
    unit: str  # canonical unit
    raw_value: Decimal
    raw_unit: str
    effective: datetime
    issued: datetime | None
    status: str
    source: Source
    ref_high: Decimal | None = None  # referenceRange.high in the canonical unit
    #: ">" or ">=": the result lies above ``value`` (a value above the assay's range), for analytes that accept it
    comparator: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class ConditionFact:
    feature: str
    source: Source
    onset: datetime | None
    clinical_status: str | None
    #: The condition's own text, kept when the code counts only with it (E83.59 "calciphylaxis"): the card shows
    #: what qualified a non-specific code.
    qualifying_text: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class MedicationFact:
    features: frozenset[str]
    source: Source
    resource_type: str
    status: str
    current: bool
    start: datetime | None
    stop: datetime | None
    last_activity: datetime | None
    intravenous: bool
    recognised_by: str | None = None  # None: by a mapped code; else how (a Medication's ingredient, a name)


@dataclass(slots=True, unsafe_hash=True)
class ProcedureFact:
    feature: str
    source: Source
    performed: datetime


class _Dated(Protocol):
    @property
    def effective(self) -> datetime: ...


class LabSeries(Sequence[LabValue]):
    """The in-window values of one analyte, newest first, each built (unit conversion, reference range, fact) the
    first time it is read. Rules read the newest usable value of most analytes and pair only a few, so most of a
    year of dialysis-session weights is never built. Whatever could exclude a value was checked when it was listed,
    so building one cannot fail."""

    __slots__ = ("_build", "_built", "_pending")

    def __init__(self, pending: Sequence[_Dated], build: Callable[[Any], LabValue]) -> None:
        self._pending = pending
        self._build = build
        self._built: list[LabValue | None] = [None] * len(pending)

    def __len__(self) -> int:
        return len(self._pending)

    def effective(self, index: int) -> datetime:
        """The effective time of a value, without building it."""
        return self._pending[index].effective

    @overload
    def __getitem__(self, index: int) -> LabValue: ...

    @overload
    def __getitem__(self, index: slice) -> list[LabValue]: ...

    def __getitem__(self, index: int | slice) -> LabValue | list[LabValue]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        lab = self._built[index]
        if lab is None:
            lab = self._built[index] = self._build(self._pending[index])
        return lab

    def __iter__(self) -> Iterator[LabValue]:
        for i in range(len(self._pending)):
            yield self[i]

    def __repr__(self) -> str:
        return f"LabSeries({len(self)} values)"


@dataclass(slots=True, unsafe_hash=True)
class PatientInfo:
    reference: str
    present: bool  # a Patient resource was supplied
    sex: str | None
    birth_date: date | None


@dataclass
class CaseFacts:
    patient: PatientInfo
    labs: dict[str, LabSeries] = field(default_factory=dict)  # newest first, in-window values passing the checks
    stale: dict[str, LabValue] = field(default_factory=dict)  # newest value older than the widest window
    conditions: list[ConditionFact] = field(default_factory=list)
    medications: list[MedicationFact] = field(default_factory=list)
    procedures: list[ProcedureFact] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, str | None] = field(default_factory=dict)  # reference → version of every resource read
    #: Resources awaiting structural validation, by reference (validated only when a rule consults them).
    unvalidated: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _valid: dict[str, bool] = field(default_factory=dict, repr=False)

    def usable(self, fact: LabValue | ConditionFact | MedicationFact | ProcedureFact) -> bool:
        """Validate a fact's resource the first time a rule consults it; an invalid one is excluded and skipped."""
        ref = fact.source.reference
        known = self._valid.get(ref)
        if known is not None:
            return known
        resource = self.unvalidated.pop(ref, None)
        error = _validation_error(resource) if resource is not None else None
        if error is not None:
            self.excluded.append(Excluded(reference=ref, reason=error))
        self._valid[ref] = error is None
        return error is None


# ---------------------------------------------------------------------------- Assessment (JSON)

RenalContext = Literal["R0", "R1", "R2"]
CalciphylaxisTier = Literal["none", "low", "moderate", "high", "established"]
MetastaticTier = Literal["none", "low", "moderate", "high", "insufficient-data"]


class Evidence(BaseModel):
    """One fact shown on a card: what it is, its value and unit, its date and source reference."""

    model_config = ConfigDict(frozen=True)
    label: str
    value: str | None = None
    unit: str | None = None
    date: str | None = None
    reference: str | None = None
    code: str | None = None
    threshold: str | None = None
    note: str | None = None


class Factor(BaseModel):
    id: str
    label: str
    evidence: list[Evidence] = Field(default_factory=list)


class Calciphylaxis(BaseModel):
    tier: CalciphylaxisTier
    incomplete_data: bool = False
    major_factors: list[str] = Field(default_factory=list)
    minor_factors: list[str] = Field(default_factory=list)
    factors: list[Factor] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)
    explanation: str = ""


class CaXP(BaseModel):
    value: float
    unit: str = "mg2/dL2"
    value_si: float = 0.0
    unit_si: str = "mmol2/L2"
    paired_with_lag: bool = False
    hours_apart: float = 0.0
    calcium: Evidence | None = None
    phosphate: Evidence | None = None


class MetastaticCalcification(BaseModel):
    tier: MetastaticTier
    ca_x_p: CaXP | None = None
    predisposing: list[Factor] = Field(default_factory=list)
    hypercalcemia: bool = False
    hyperphosphatemia: bool = False
    explanation: str = ""


class Assessment(BaseModel):
    patient: str
    evaluated_at: str
    rules_version: str
    mappings_version: str
    renal_context: RenalContext
    calciphylaxis: Calciphylaxis
    metastatic_calcification: MetastaticCalcification
    cards: list[dict[str, Any]] = Field(default_factory=list)
    excluded: list[Excluded] = Field(default_factory=list)
    # --- explanatory extras (the contract allows more keys) ---
    patient_resource_present: bool = True
    sex: str | None = None
    age: int | None = None
    renal_evidence: list[Evidence] = Field(default_factory=list)
    calcium: dict[str, Any] | None = None
    suggested_orders: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    ignored: dict[str, int] = Field(default_factory=dict)
    inputs: list[dict[str, str | None]] = Field(default_factory=list)
    inputs_hash: str = ""
