"""Pydantic models of the YAML files in ``mappings/`` (data only; see ``mappings/README.md``).

Every model forbids unknown keys, so a typo in a mapping file is an error at start-up rather than a
silently ignored code. Cross-file checks (duplicate ``(system, code)`` pairs, unknown analytes,
features and units) are done by :mod:`service.terminology.loader`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Canonical code-system URIs. Anything else in a mapping file is rejected.
SYSTEMS: dict[str, str] = {
    "loinc": "http://loinc.org",
    "snomed": "http://snomed.info/sct",
    "icd10cm": "http://hl7.org/fhir/sid/icd-10-cm",
    "icd10pcs": "http://www.cms.gov/Medicare/Coding/ICD10",
    "rxnorm": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "cpt": "http://www.ama-assn.org/go/cpt",
    "hcpcs": "urn:oid:2.16.840.1.113883.6.285",
    "ucum": "http://unitsofmeasure.org",
}
CANONICAL_SYSTEMS = frozenset(SYSTEMS.values())
#: How a card names each system next to a code ("LOINC 17861-6").
SYSTEM_NAMES: dict[str, str] = {
    SYSTEMS["loinc"]: "LOINC",
    SYSTEMS["snomed"]: "SNOMED CT",
    SYSTEMS["icd10cm"]: "ICD-10-CM",
    SYSTEMS["icd10pcs"]: "ICD-10-PCS",
    SYSTEMS["rxnorm"]: "RxNorm",
    SYSTEMS["cpt"]: "CPT",
    SYSTEMS["hcpcs"]: "HCPCS",
    SYSTEMS["ucum"]: "UCUM",
}

Dimension = Literal[
    "mass_concentration",  # base g/L
    "substance_concentration",  # base mol/L
    "catalytic_concentration",  # base U/L
    "flow_per_area",  # base mL/min/{1.73_m2}
    "mass_per_area",  # base kg/m2
    "mass",  # base kg
    "length",  # base m
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UnitDef(_Strict):
    code: str = Field(description="UCUM code as sent in valueQuantity.code")
    dimension: Dimension
    factor: Decimal = Field(gt=0, description="Multiply a value in this unit by factor to get the base unit")
    aliases: tuple[str, ...] = Field((), description="Human spellings seen in valueQuantity.unit (e.g. 'mg/dl')")


class UnitsFile(_Strict):
    kind: Literal["units"]
    units: list[UnitDef]


class AnalyteDef(_Strict):
    display: str
    canonical_unit: str
    units: tuple[str, ...] = Field(min_length=1, description="Accepted UCUM units; anything else is excluded")
    molar_mass: Decimal | None = Field(None, gt=0, description="g/mol, for mass <-> substance conversion")
    decimals: int = Field(2, ge=0, le=4, description="Rounding before comparison (§2.1)")
    above_range_values: bool = Field(
        False,
        description="Keep a value reported as above the assay's range ('> 2500'): every rule reading this analyte asks only "
        "whether it exceeds a limit, which such a value can answer",
    )
    source: str = ""


class AnalytesFile(_Strict):
    kind: Literal["analytes"]
    analytes: dict[str, AnalyteDef]


Status = Literal["verified", "unverified"]


class _Entry(_Strict):
    system: str | None = None  # may come from the file's default_system
    code: str = Field(min_length=1)
    display: str = Field(min_length=1)
    status: Status = "verified"
    sources: tuple[str, ...] = ()
    note: str = ""


class ObservationEntry(_Entry):
    analyte: str
    use: bool = Field(True, description="False: recognised but never used; the note is the exclusion reason")
    label: str = Field("", description="Display label overriding the analyte's (e.g. 'D3 only')")


class ConditionEntry(_Entry):
    feature: str
    match: Literal["exact", "prefix"] = "exact"
    status_code: bool = Field(False, description="A status-type code: current unless resolved (§2.1)")
    requires_text: str | None = Field(None, description="Counts only if code text/display contains this (E83.59)")


class MedicationEntry(_Entry):
    tty: Literal["IN", "PIN", "MIN", "SCD", "SBD", "GPCK", "BPCK"]
    feature: str | None = Field(None, description="For ingredients: the feature they map to")
    ingredients: tuple[str, ...] = Field((), description="For products: RxNorm ingredient codes")
    parenteral: bool = Field(False, description="Product is an injection (route IV unless stated otherwise)")

    @model_validator(mode="after")
    def _shape(self) -> MedicationEntry:
        if self.tty in ("IN", "PIN", "MIN"):
            if not self.feature or self.ingredients:
                raise ValueError("an ingredient (IN/PIN/MIN) needs 'feature' and no 'ingredients'")
        elif self.feature or not self.ingredients:
            raise ValueError("a product (SCD/SBD/...) needs 'ingredients' and no 'feature'")
        return self


class ProcedureEntry(_Entry):
    feature: str
    match: Literal["exact", "prefix"] = "exact"


class RouteEntry(_Entry):
    feature: Literal["intravenous", "local"]


class ObservationsFile(_Strict):
    kind: Literal["observations"]
    default_system: str | None = None
    entries: list[ObservationEntry]


class ConditionsFile(_Strict):
    kind: Literal["conditions"]
    default_system: str | None = None
    entries: list[ConditionEntry]


class MedicationsFile(_Strict):
    kind: Literal["medications"]
    default_system: str | None = None
    recognise_by_name: tuple[str, ...] = Field(
        (), description="Features whose ingredients are also recognised by name when no coding of a record is mapped"
    )
    entries: list[MedicationEntry]


class ProceduresFile(_Strict):
    kind: Literal["procedures"]
    default_system: str | None = None
    entries: list[ProcedureEntry]


class RoutesFile(_Strict):
    kind: Literal["routes"]
    default_system: str | None = None
    text_patterns: dict[Literal["intravenous", "local"], tuple[str, ...]] = Field(
        default_factory=dict, description="Per route feature, lower-case words (or the whole text) of route.text that mean it"
    )
    entries: list[RouteEntry]


class OrderSet(_Strict):
    display: str
    codes: tuple[str, ...] = Field((), description="LOINC codes that must appear in an observations file")
    note: str = ""


class OrderSetsFile(_Strict):
    kind: Literal["order_sets"]
    order_sets: dict[str, OrderSet]


#: Settings in which an order alternative may be proposed (service/cds/orders.py says how each is recognised).
OfferSetting = Literal["kidney_failure", "kidney_transplant", "ckd4", "established_calciphylaxis"]


#: Findings an alternative may require besides its setting (service/cds/orders.py says how each is read).
OfferRequirement = Literal["hyperphosphatemia"]


class OrderAlternative(_Strict):
    system: str
    code: str
    label: str
    rationale: str
    offer_when: list[OfferSetting] = Field(min_length=1, description="the patient settings in which the alternative is proposed")
    requires: tuple[OfferRequirement, ...] = Field((), description="findings that must also be present for the alternative to be proposed")
    unless_current: tuple[str, ...] = Field(
        (), description="medication features: the alternative is not proposed when the patient already has a current medication with one"
    )


class OrderAlternativesFile(_Strict):
    kind: Literal["order_alternatives"]
    alternatives: dict[str, OrderAlternative] = Field(
        description="feature of the ordered drug → a safer product to propose instead"
    )


class FeatureDef(_Strict):
    display: str
    kind: Literal["condition", "medication", "procedure", "route"]
    description: str = ""


class FeaturesFile(_Strict):
    kind: Literal["features"]
    features: dict[str, FeatureDef]


MappingFile = (
    UnitsFile
    | AnalytesFile
    | ObservationsFile
    | ConditionsFile
    | MedicationsFile
    | ProceduresFile
    | RoutesFile
    | OrderSetsFile
    | OrderAlternativesFile
    | FeaturesFile
)
