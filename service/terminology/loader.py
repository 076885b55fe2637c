"""Load and validate ``mappings/*.yaml`` into a :class:`Catalog`.

Every problem is a :class:`MappingError` naming the file and line, and the service refuses to start
on one: unknown keys, non-canonical code systems, duplicate ``(system, code)`` pairs, unknown units,
analytes and feature names. The catalog version is a hash of the files' content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from service.terminology.catalog import Catalog, _dotless
from service.terminology.schema import (
    CANONICAL_SYSTEMS,
    SYSTEMS,
    AnalytesFile,
    ConditionEntry,
    ConditionsFile,
    FeaturesFile,
    MappingFile,
    MedicationEntry,
    MedicationsFile,
    ObservationEntry,
    ObservationsFile,
    OrderSetsFile,
    ProcedureEntry,
    ProceduresFile,
    RoutesFile,
    UnitsFile,
)

DEFAULT_MAPPINGS_DIR = Path(__file__).resolve().parents[2] / "mappings"
_ADAPTER: TypeAdapter[Any] = TypeAdapter(MappingFile)


class MappingError(ValueError):
    """A mapping file is invalid. The message names the file and line."""


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping it builds (for error messages)."""

    lines: dict[int, int]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping = super().construct_mapping(node, deep=True)
        self.lines[id(mapping)] = node.start_mark.line + 1
        return mapping


def _read_yaml(path: Path) -> tuple[Any, dict[int, int]]:
    text = path.read_text(encoding="utf-8")
    loader = _LineLoader(text)
    loader.lines = {}
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise MappingError(f"{path.name}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    finally:
        loader.dispose()
    return data, loader.lines


def _line_of(data: Any, loc: Iterable[Any], lines: dict[int, int]) -> int | None:
    line = lines.get(id(data))
    node = data
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
        line = lines.get(id(node), line)
    return line


def _fail(path: Path, line: int | None, message: str) -> MappingError:
    where = f"{path.name}:{line}" if line else path.name
    return MappingError(f"{where}: {message}")


def _parse(path: Path) -> tuple[MappingFile, Any, dict[int, int]]:
    data, lines = _read_yaml(path)
    if not isinstance(data, dict) or "kind" not in data:
        raise _fail(path, 1, "a mapping file is a mapping with a 'kind' key")
    try:
        model = _ADAPTER.validate_python(data)
    except ValidationError as exc:
        err = min(exc.errors(), key=lambda e: len(e["loc"]))
        # The union adds the tag as the first loc element; drop it when present.
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.endswith("File"))]
        if loc and loc[0] == data.get("kind"):
            loc = loc[1:]
        field = ".".join(str(p) for p in loc) or "(file)"
        raise _fail(path, _line_of(data, loc, lines), f"{field}: {err['msg']}") from None
    return model, data, lines


def load_catalog(directory: Path | str | None = None) -> Catalog:
    """Read every ``*.yaml`` in ``directory`` and build the catalog, or raise :class:`MappingError`."""
    root = Path(directory) if directory is not None else DEFAULT_MAPPINGS_DIR
    paths = sorted(root.glob("*.yaml"))
    if not paths:
        raise MappingError(f"{root}: no mapping files (*.yaml)")
    digest = hashlib.sha256()
    parsed: list[tuple[Path, MappingFile, Any, dict[int, int]]] = []
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
        model, data, lines = _parse(path)
        parsed.append((path, model, data, lines))

    units: dict[str, Any] = {}
    unit_aliases: dict[str, str] = {}
    analytes: dict[str, Any] = {}
    features: dict[str, Any] = {}
    for path, model, data, lines in parsed:
        if isinstance(model, UnitsFile):
            for i, u in enumerate(model.units):
                if u.code in units:
                    raise _fail(path, _line_of(data, ["units", i], lines), f"duplicate unit {u.code}")
                units[u.code] = u
                for alias in (u.code, *u.aliases):
                    unit_aliases[alias.strip().lower()] = u.code
        elif isinstance(model, AnalytesFile):
            for name, a in model.analytes.items():
                if name in analytes:
                    raise _fail(path, _line_of(data, ["analytes", name], lines), f"duplicate analyte {name}")
                analytes[name] = a
        elif isinstance(model, FeaturesFile):
            for name, f in model.features.items():
                if name in features:
                    raise _fail(path, _line_of(data, ["features", name], lines), f"duplicate feature {name}")
                features[name] = f

    for name, a in analytes.items():
        for unit in (a.canonical_unit, *a.units):
            if unit not in units:
                raise MappingError(f"analytes: {name}: unknown unit {unit!r} (not in units.yaml)")
        if a.canonical_unit not in a.units:
            raise MappingError(f"analytes: {name}: canonical unit {a.canonical_unit} must be among its units")
        dims = {units[u].dimension for u in a.units}
        if len(dims) > 1 and a.molar_mass is None:
            raise MappingError(f"analytes: {name}: mixes {sorted(dims)} units without a molar_mass")

    seen: dict[tuple[str, str], str] = {}
    observations: dict[tuple[str, str], ObservationEntry] = {}
    conditions: dict[tuple[str, str], ConditionEntry] = {}
    condition_prefixes: list[ConditionEntry] = []
    medications: dict[tuple[str, str], MedicationEntry] = {}
    procedures: dict[tuple[str, str], ProcedureEntry] = {}
    procedure_prefixes: list[ProcedureEntry] = []
    routes: dict[tuple[str, str], str] = {}
    route_patterns: list[str] = []
    order_sets: dict[str, Any] = {}

    for path, model, data, lines in parsed:
        if isinstance(model, OrderSetsFile):
            order_sets.update(model.order_sets)
            continue
        if not isinstance(model, ObservationsFile | ConditionsFile | MedicationsFile | ProceduresFile | RoutesFile):
            continue
        if isinstance(model, RoutesFile):
            route_patterns.extend(p.lower() for p in model.text_patterns)
        for i, raw in enumerate(model.entries):
            line = _line_of(data, ["entries", i], lines)
            system = raw.system or model.default_system
            if system is None:
                raise _fail(path, line, f"entry {raw.code}: no system and no default_system")
            if system not in CANONICAL_SYSTEMS:
                raise _fail(path, line, f"entry {raw.code}: non-canonical system {system!r}")
            entry = raw.model_copy(update={"system": system})
            key = (system, entry.code)
            if key in seen:
                raise _fail(path, line, f"duplicate (system, code) {system}|{entry.code} (also in {seen[key]})")
            seen[key] = f"{path.name}:{line}"
            if isinstance(entry, ObservationEntry):
                if entry.analyte not in analytes:
                    raise _fail(path, line, f"entry {entry.code}: unknown analyte {entry.analyte!r}")
                observations[key] = entry
                continue
            feature = getattr(entry, "feature", None)
            if feature is not None and feature != "intravenous" and feature not in features:
                raise _fail(path, line, f"entry {entry.code}: unknown feature {feature!r} (not in features.yaml)")
            if isinstance(entry, ConditionEntry):
                (condition_prefixes.append(entry) if entry.match == "prefix" else conditions.__setitem__(key, entry))
            elif isinstance(entry, ProcedureEntry):
                (procedure_prefixes.append(entry) if entry.match == "prefix" else procedures.__setitem__(key, entry))
            elif isinstance(entry, MedicationEntry):
                medications[key] = entry
            else:
                routes[key] = entry.feature

    for key, m in medications.items():
        for ing in m.ingredients:
            target = medications.get((key[0], ing))
            if target is None or not target.feature:
                raise MappingError(f"medications: product {key[1]} names ingredient {ing}, which is not mapped as an ingredient")
    for name, os_ in order_sets.items():
        for code in os_.codes:
            if (SYSTEMS["loinc"], code) not in observations:
                raise MappingError(f"order_sets: {name}: LOINC {code} is not in an observations file")

    dotless = {(s, _dotless(c)): e for (s, c), e in conditions.items() if s == SYSTEMS["icd10cm"]}
    return Catalog(
        version=digest.hexdigest()[:16],
        units=units,
        unit_aliases=unit_aliases,
        analytes=analytes,
        features=features,
        observations=observations,
        conditions=conditions,
        condition_prefixes=tuple(condition_prefixes),
        medications=medications,
        procedures=procedures,
        procedure_prefixes=tuple(procedure_prefixes),
        routes=routes,
        route_text_patterns=tuple(route_patterns),
        order_sets=order_sets,
        conditions_dotless=dotless,
    )
