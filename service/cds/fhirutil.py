"""Small, allocation-light helpers over FHIR R4 JSON dictionaries (dates, references, codings).

The hot path reads plain dicts from orjson: building fhir.resources models for thousands of
irrelevant Observations would cost far more than parsing (see docs/benchmarks.md), so resources are
filtered by code first and only the ones that can inform a decision are validated as models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, TypeVar

T = TypeVar("T")

_YEAR = re.compile(r"^\d{4}$")
_YEAR_MONTH = re.compile(r"^\d{4}-\d{2}$")

#: Resource types whose `subject` (or `patient`) reference ties them to a patient.
PATIENT_SCOPED = frozenset({"Observation", "Condition", "MedicationRequest", "MedicationStatement", "MedicationAdministration", "Procedure"})


def parse_datetime(value: Any) -> datetime | None:
    """FHIR date/dateTime/instant → aware UTC datetime (partial dates start at their first instant)."""
    if not isinstance(value, str) or not value:
        return None
    if len(value) > _LONGEST_DATETIME:
        return _parse_datetime_uncached(value)  # not a FHIR instant: never kept in the memo
    return _parse_datetime_text(value)


#: "2024-01-01T00:00:00.123456789+14:00" and a little spare: longer strings are not FHIR dates.
_LONGEST_DATETIME = 40


@lru_cache(maxsize=65_536)
def _parse_datetime_text(value: str) -> datetime | None:
    # Memoised: a chart repeats the same instants (a panel's results share one), and a chart is read again and
    # again; datetimes are immutable, so sharing them is safe. Only short strings get here, so the memo is small.
    return _parse_datetime_uncached(value)


def _parse_datetime_uncached(value: str) -> datetime | None:
    try:
        if len(value) <= 7:
            if _YEAR.match(value):
                return datetime(int(value), 1, 1, tzinfo=UTC)
            if _YEAR_MONTH.match(value):
                return datetime(int(value[:4]), int(value[5:7]), 1, tzinfo=UTC)
        if value[17:19] == "60" and value[16:17] == ":":
            value = value[:17] + "59" + value[19:]  # a leap second (FHIR allows :60): the second before it
        dt = datetime.fromisoformat(value)
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 moved across midnight by its offset
        return None


def parse_date(value: Any) -> date | None:
    dt = parse_datetime(value)
    return dt.date() if dt is not None else None


#: No laboratory value or reference limit comes near this; beyond it a number is not one we can compute with (the
#: rounding of a Ca×P product of two such values would overflow the decimal context).
MAX_MAGNITUDE = 10**12


def to_decimal(value: Any) -> Decimal | None:
    """JSON number → Decimal via its shortest repr, so 9.4 stays 9.4 (bools are not numbers; nor is anything whose
    magnitude reaches :data:`MAX_MAGNITUDE`)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        return None
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() and abs(d) < MAX_MAGNITUDE else None


def is_number(value: Any) -> bool:
    """Whether :func:`to_decimal` gives a number, without building the Decimal for a plain JSON number."""
    kind = type(value)
    if kind is int:
        return abs(value) < MAX_MAGNITUDE
    if kind is float:
        return math.isfinite(value) and abs(value) < MAX_MAGNITUDE
    return to_decimal(value) is not None


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return _iso(dt)


@lru_cache(maxsize=65_536)
def _iso(dt: datetime) -> str:
    # Memoised like _parse_datetime_text: the instants of a chart come back on every card of every evaluation.
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def codings(concept: Any) -> Iterator[dict[str, Any]]:
    """Every Coding of a CodeableConcept (match on any coding, not only the first)."""
    if isinstance(concept, dict):
        items = concept.get("coding")
        if isinstance(items, list):
            for c in items:
                if isinstance(c, dict) and isinstance(c.get("code"), str):
                    yield c


def first_match(concept: Any, lookup: Callable[[Any, str], T | None]) -> tuple[T, dict[str, Any]] | tuple[None, None]:
    """The first coding of a CodeableConcept that ``lookup(system, code)`` knows, with what it returned."""
    # The loop of codings() written out: this runs for every medication, condition and procedure of a record.
    items = concept.get("coding") if isinstance(concept, dict) else None
    if isinstance(items, list):
        for c in items:
            if isinstance(c, dict):
                code = c.get("code")
                if isinstance(code, str):
                    hit = lookup(c.get("system"), code)
                    if hit is not None:
                        return hit, c
    return None, None


def all_matches(concept: Any, lookup: Callable[[Any, str], T | None]) -> list[tuple[T, dict[str, Any]]]:
    """Every coding of a CodeableConcept that ``lookup(system, code)`` knows, in order, with what it returned:
    a record's meaning must not depend on which of its codings comes first."""
    return [(hit, c) for c in codings(concept) if (hit := lookup(c.get("system"), c["code"])) is not None]


def concept_texts(concept: Any) -> list[str]:
    """CodeableConcept.text, then every coding display, for text checks (e.g. E83.59 'calciphylaxis')."""
    if not isinstance(concept, dict):
        return []
    parts = [concept.get("text"), *(c.get("display") for c in codings(concept))]
    return [p for p in parts if isinstance(p, str) and p]


def resource_ref(resource: dict[str, Any]) -> str | None:
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if isinstance(rtype, str) and isinstance(rid, str) and rid:
        return f"{rtype}/{rid}"
    return None


def version_of(resource: dict[str, Any]) -> str | None:
    meta = resource.get("meta")
    if isinstance(meta, dict):
        v = meta.get("versionId")
        if isinstance(v, str | int):
            return str(v)
    return None


def last_updated_of(resource: dict[str, Any]) -> datetime | None:
    meta = resource.get("meta")
    return parse_datetime(meta.get("lastUpdated")) if isinstance(meta, dict) else None


def normalize_reference(ref: Any, aliases: dict[str, str] | None = None) -> str | None:
    """Reference string → ``Type/id``.

    Resolves ``urn:uuid:`` fullUrls through ``aliases`` (built from the Bundle), strips absolute
    server bases and ``/_history/n`` suffixes. Returns None when it cannot be resolved.
    """
    if not isinstance(ref, str) or not ref:
        return None
    if aliases and ref in aliases:
        return aliases[ref]
    head, sep, tail = ref.partition("/")
    if sep and tail and "/" not in tail and "?" not in tail and head.isalpha() and head[:1].isupper():
        return ref  # already Type/id: the common case, kept cheap
    if ref.startswith(("urn:uuid:", "urn:oid:", "#")):
        return None
    parts = [p for p in ref.split("?")[0].split("/") if p]
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-2].isalpha():
        return f"{parts[-2]}/{parts[-1]}"
    return None


def subject_reference(
    resource: dict[str, Any], aliases: dict[str, str] | None = None, memo: dict[str, str | None] | None = None
) -> str | None:
    """The Patient a clinical resource is about, as ``Patient/id`` (None if absent or not a Patient).

    ``memo``: answers by reference string, kept by a caller that reads many resources with the same ``aliases``
    (a patient's record names the same subject in every resource)."""
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict):
            target = ref.get("reference")
            if memo is not None and isinstance(target, str):
                if target in memo:
                    norm = memo[target]
                else:
                    norm = memo[target] = _patient_reference(target, aliases)
            else:
                norm = _patient_reference(target, aliases)
            if norm is not None:
                return norm
    return None


def _patient_reference(target: Any, aliases: dict[str, str] | None) -> str | None:
    norm = normalize_reference(target, aliases)
    return norm if norm is not None and norm.startswith("Patient/") else None


def age_in_years(birth: date | None, now: datetime) -> int | None:
    if birth is None:
        return None
    today = now.date()
    return today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))


def within(moment: datetime | None, now: datetime, days: int) -> bool:
    return moment is not None and now - timedelta(days=days) <= moment <= now
