"""Load and validate ``mappings/*.yaml`` into a :class:`Catalog`.

Every problem is a :class:`MappingError` naming the file and line, and the service refuses to start
on one: unknown keys, non-canonical code systems, duplicate ``(system, code)`` pairs, unknown units,
analytes and feature names. The catalog version is a hash of the files' content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from service.terminology.catalog import Catalog, _dotless, name_key
from service.terminology.schema import (
    CANONICAL_SYSTEMS,
    SYSTEMS,
    AnalyteDef,
    AnalytesFile,
    ConditionEntry,
    ConditionsFile,
    FeatureDef,
    FeaturesFile,
    MedicationEntry,
    MedicationsFile,
    ObservationEntry,
    ObservationsFile,
    OrderAlternative,
    OrderAlternativesFile,
    OrderSet,
    OrderSetsFile,
    ProcedureEntry,
    ProceduresFile,
    RouteEntry,
    RoutesFile,
    UnitDef,
    UnitsFile,
)

DEFAULT_MAPPINGS_DIR = Path(__file__).resolve().parents[2] / "mappings"
#: The model of each ``kind:``. Dispatching on the kind (rather than validating against the union of all
#: file models) makes a validation error name the field of the right model.
_MODELS: dict[str, type[BaseModel]] = {
    "units": UnitsFile,
    "analytes": AnalytesFile,
    "features": FeaturesFile,
    "observations": ObservationsFile,
    "conditions": ConditionsFile,
    "medications": MedicationsFile,
    "procedures": ProceduresFile,
    "routes": RoutesFile,
    "order_sets": OrderSetsFile,
    "order_alternatives": OrderAlternativesFile,
}
#: Which feature kind (features.yaml) an entry of each file kind may name.
_FEATURE_KIND: dict[type[BaseModel], str] = {
    ConditionsFile: "condition",
    MedicationsFile: "medication",
    ProceduresFile: "procedure",
    RoutesFile: "route",
}
#: Code systems whose codes are hierarchical strings, so ``match: prefix`` makes sense.
_PREFIX_SYSTEMS = frozenset({SYSTEMS["icd10cm"], SYSTEMS["icd10pcs"]})


class MappingError(ValueError):
    """A mapping file is invalid. The message names the file and line."""


#: Line numbers (1-based) of the document: ``id(obj)`` -> line where a mapping/list starts, and
#: ``(id(mapping), key)`` -> line of that key. Keyed by ``id()`` of objects of the returned document, so
#: valid while the document is alive.
_Lines = dict[Any, int]


class _DuplicateKey(yaml.MarkedYAMLError):
    """A key appears twice in one YAML mapping (PyYAML would silently keep the last one)."""


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records where every mapping, list and mapping key is, and rejects duplicate keys."""

    lines: _Lines

    def construct_yaml_map(self, node: yaml.MappingNode) -> Generator[dict[Any, Any], None, None]:
        data: dict[Any, Any] = {}
        self.lines[id(data)] = node.start_mark.line + 1
        yield data
        self.flatten_mapping(node)
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool | None):
                continue
            if (id(data), key) in self.lines:
                raise _DuplicateKey(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first on line {self.lines[(id(data), key)]})",
                    key_node.start_mark,
                )
            self.lines[(id(data), key)] = key_node.start_mark.line + 1
        data.update(self.construct_mapping(node, deep=True))

    def construct_yaml_seq(self, node: yaml.SequenceNode) -> Generator[list[Any], None, None]:
        data: list[Any] = []
        self.lines[id(data)] = node.start_mark.line + 1
        yield data
        data.extend(self.construct_sequence(node, deep=True))


_LineLoader.add_constructor("tag:yaml.org,2002:map", _LineLoader.construct_yaml_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _LineLoader.construct_yaml_seq)


def _read_yaml(path: Path) -> tuple[Any, _Lines]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingError(f"{path.name}: cannot read ({exc})") from None
    loader = _LineLoader(text)
    loader.lines = {}
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise MappingError(f"{path.name}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    finally:
        loader.dispose()
    return data, loader.lines


V = TypeVar("V")


def _collect(
    path: Path,
    data: Any,
    lines: _Lines,
    section: str,
    items: Mapping[str, V],
    into: dict[str, V],
    what: str,
    where: dict[str, tuple[Path, int | None]] | None = None,
) -> None:
    """Add a file's named entries of ``section`` to ``into``; a name already there is an error at its line."""
    for name, value in items.items():
        line = _line_of(data, [section, name], lines)
        if name in into:
            raise _fail(path, line, f"duplicate {what} {name}")
        into[name] = value
        if where is not None:
            where[name] = (path, line)


def _line_of(data: Any, loc: Iterable[Any], lines: _Lines) -> int | None:
    """The line of the innermost node on the path ``loc`` into ``data``.

    A step into a mapping gives the line of the key (so an unknown key is reported on its own line); a
    step into a list gives the line where the item starts.
    """
    line = lines.get(id(data))
    node = data
    for part in loc:
        if isinstance(node, dict):
            line = lines.get((id(node), part), line)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
        if isinstance(node, dict | list) and not isinstance(part, str):
            line = lines.get(id(node), line)
    return line


def _fail(path: Path, line: int | None, message: str) -> MappingError:
    where = f"{path.name}:{line}" if line else path.name
    return MappingError(f"{where}: {message}")


def _parse(path: Path) -> tuple[BaseModel, Any, _Lines]:
    data, lines = _read_yaml(path)
    if not isinstance(data, dict) or "kind" not in data:
        raise _fail(path, 1, "a mapping file is a mapping with a 'kind' key")
    model_cls = _MODELS.get(data["kind"]) if isinstance(data["kind"], str) else None
    if model_cls is None:
        raise _fail(path, _line_of(data, ["kind"], lines), f"kind: unknown kind {data['kind']!r} (one of {', '.join(_MODELS)})")
    try:
        model = model_cls.model_validate(data)
    except ValidationError as exc:
        # Report the first error; its location is the path of keys/indexes into the document.
        err = exc.errors()[0]
        loc = list(err["loc"])
        field = ".".join(str(p) for p in loc) or "(file)"
        raise _fail(path, _line_of(data, loc, lines), f"{field}: {err['msg']}") from None
    return model, data, lines


def load_catalog(directory: Path | str | None = None) -> Catalog:
    """Read every ``*.yaml`` in ``directory`` and build the catalog, or raise :class:`MappingError`.

    Every error names the file and, where it has one, the line.
    """
    root = Path(directory) if directory is not None else DEFAULT_MAPPINGS_DIR
    paths = sorted(root.glob("*.yaml"))
    if not paths:
        raise MappingError(f"{root}: no mapping files (*.yaml)")
    digest = hashlib.sha256()
    parsed: list[tuple[Path, BaseModel, Any, _Lines]] = []
    for path in paths:
        content = path.read_bytes()
        # Length-prefix the name and the content so that no two different file sets hash alike.
        digest.update(f"{path.name}\0{len(content)}\0".encode())
        digest.update(content)
        model, data, lines = _parse(path)
        parsed.append((path, model, data, lines))

    units: dict[str, UnitDef] = {}
    unit_aliases: dict[str, str] = {}
    analytes: dict[str, AnalyteDef] = {}
    analyte_where: dict[str, tuple[Path, int | None]] = {}
    features: dict[str, FeatureDef] = {}
    for path, model, data, lines in parsed:
        if isinstance(model, UnitsFile):
            for i, u in enumerate(model.units):
                line = _line_of(data, ["units", i], lines)
                if u.code in units:
                    raise _fail(path, line, f"duplicate unit {u.code}")
                units[u.code] = u
                for alias in (u.code, *u.aliases):
                    spelling = alias.strip().lower()
                    if unit_aliases.get(spelling, u.code) != u.code:
                        raise _fail(path, line, f"unit alias {alias!r} of {u.code} already names {unit_aliases[spelling]}")
                    unit_aliases[spelling] = u.code
        elif isinstance(model, AnalytesFile):
            _collect(path, data, lines, "analytes", model.analytes, analytes, "analyte", analyte_where)
        elif isinstance(model, FeaturesFile):
            _collect(path, data, lines, "features", model.features, features, "feature")

    for name, a in analytes.items():
        path, line = analyte_where[name]
        for unit in (a.canonical_unit, *a.units):
            if unit not in units:
                raise _fail(path, line, f"analyte {name}: unknown unit {unit!r} (not in units.yaml)")
        if a.canonical_unit not in a.units:
            raise _fail(path, line, f"analyte {name}: canonical unit {a.canonical_unit} must be among its units")
        dims = {units[u].dimension for u in a.units}
        if len(dims) > 1 and a.molar_mass is None:
            raise _fail(path, line, f"analyte {name}: mixes {sorted(dims)} units without a molar_mass")

    seen: dict[tuple[str, str], str] = {}
    observations: dict[tuple[str, str], ObservationEntry] = {}
    conditions: dict[tuple[str, str], ConditionEntry] = {}
    condition_prefixes: list[ConditionEntry] = []
    medications: dict[tuple[str, str], MedicationEntry] = {}
    medication_where: dict[tuple[str, str], tuple[Path, int | None]] = {}
    procedures: dict[tuple[str, str], ProcedureEntry] = {}
    procedure_prefixes: list[ProcedureEntry] = []
    routes: dict[tuple[str, str], str] = {}
    route_patterns: dict[str, list[str]] = {}
    by_name: dict[str, tuple[Path, int | None]] = {}  # feature -> where recognise_by_name names it
    order_sets: dict[str, OrderSet] = {}
    alternatives: dict[str, OrderAlternative] = {}
    alternative_where: dict[str, tuple[Path, int | None]] = {}
    order_set_where: dict[str, tuple[Path, int | None]] = {}

    for path, model, data, lines in parsed:
        if isinstance(model, OrderAlternativesFile):
            _collect(path, data, lines, "alternatives", model.alternatives, alternatives, "order alternative for", alternative_where)
            continue
        if isinstance(model, OrderSetsFile):
            _collect(path, data, lines, "order_sets", model.order_sets, order_sets, "order set", order_set_where)
            continue
        if not isinstance(model, ObservationsFile | ConditionsFile | MedicationsFile | ProceduresFile | RoutesFile):
            continue
        if isinstance(model, MedicationsFile):
            for j, named in enumerate(model.recognise_by_name):
                by_name[named] = (path, _line_of(data, ["recognise_by_name", j], lines))
        if isinstance(model, RoutesFile):
            for route_feature, patterns in model.text_patterns.items():
                route_patterns.setdefault(route_feature, []).extend(p.lower() for p in patterns)
        if model.default_system is not None and model.default_system not in CANONICAL_SYSTEMS:
            raise _fail(
                path, _line_of(data, ["default_system"], lines), f"default_system: non-canonical system {model.default_system!r}"
            )
        feature_kind = _FEATURE_KIND.get(type(model))
        for i, raw in enumerate(model.entries):
            line = _line_of(data, ["entries", i], lines)
            system = raw.system or model.default_system
            if system is None:
                raise _fail(path, line, f"entry {raw.code}: no system and no default_system")
            if system not in CANONICAL_SYSTEMS:
                raise _fail(
                    path,
                    _line_of(data, ["entries", i, "system" if raw.system else "code"], lines),
                    f"entry {raw.code}: non-canonical system {system!r}",
                )
            entry = raw.model_copy(update={"system": system})
            # ICD-10-CM codes are compared without their dot (E83.52 == E8352), as the lookup does.
            key = (system, entry.code)
            seen_key = (system, _dotless(entry.code)) if system == SYSTEMS["icd10cm"] else key
            if seen_key in seen:
                raise _fail(path, line, f"duplicate (system, code) {system}|{entry.code} (also in {seen[seen_key]})")
            seen[seen_key] = f"{path.name}:{line}"
            if isinstance(entry, ObservationEntry):
                if entry.analyte not in analytes:
                    raise _fail(
                        path,
                        _line_of(data, ["entries", i, "analyte"], lines),
                        f"entry {entry.code}: unknown analyte {entry.analyte!r} (not in analytes.yaml)",
                    )
                observations[key] = entry
                continue
            feature = getattr(entry, "feature", None)
            if feature is not None:
                if feature in features:
                    if features[feature].kind != feature_kind:
                        raise _fail(
                            path,
                            _line_of(data, ["entries", i, "feature"], lines),
                            f"entry {entry.code}: feature {feature!r} is a {features[feature].kind} feature, "
                            f"not a {feature_kind} feature",
                        )
                elif feature != "intravenous":
                    raise _fail(
                        path,
                        _line_of(data, ["entries", i, "feature"], lines),
                        f"entry {entry.code}: unknown feature {feature!r} (not in features.yaml)",
                    )
            if getattr(entry, "match", "exact") == "prefix" and system not in _PREFIX_SYSTEMS:
                raise _fail(
                    path,
                    _line_of(data, ["entries", i, "match"], lines),
                    f"entry {entry.code}: match: prefix is only allowed for ICD-10-CM/ICD-10-PCS codes",
                )
            if isinstance(entry, ConditionEntry):
                if entry.match == "prefix":
                    condition_prefixes.append(entry)
                else:
                    conditions[key] = entry
            elif isinstance(entry, ProcedureEntry):
                if entry.match == "prefix":
                    procedure_prefixes.append(entry)
                else:
                    procedures[key] = entry
            elif isinstance(entry, MedicationEntry):
                medications[key] = entry
                medication_where[key] = (path, line)
            elif isinstance(entry, RouteEntry):
                routes[key] = entry.feature

    for key, m in medications.items():
        for ing in m.ingredients:
            target = medications.get((key[0], ing))
            if target is None or not target.feature:
                path, line = medication_where[key]
                raise _fail(path, line, f"product {key[1]} names ingredient {ing}, which is not mapped as an ingredient")
    for named, (path, line) in by_name.items():
        if features.get(named) is None or features[named].kind != _FEATURE_KIND[MedicationsFile]:
            raise _fail(path, line, f"recognise_by_name: {named!r} is not a medication feature of features.yaml")
    medication_names = tuple(
        sorted(
            ((name_key(e.display), e) for e in medications.values() if e.feature in by_name and e.display and name_key(e.display)),
            key=lambda pair: (-len(pair[0]), pair[0]),
        )
    )
    for name, os_ in order_sets.items():
        for code in os_.codes:
            if (SYSTEMS["loinc"], code) not in observations:
                path, line = order_set_where[name]
                raise _fail(path, line, f"order set {name}: LOINC {code} is not in an observations file")

    for feature, alt in alternatives.items():
        path, line = alternative_where[feature]
        if feature not in features:
            raise _fail(path, line, f"order alternative for unknown feature {feature!r} (not in features.yaml)")
        target = medications.get((alt.system, alt.code))
        if target is None:
            raise _fail(path, line, f"order alternative for {feature}: {alt.system}|{alt.code} is not in a medications file")
        for current in alt.unless_current:
            if current not in features or features[current].kind != "medication":
                raise _fail(path, line, f"order alternative for {feature}: unless_current {current!r} is not a medication feature of features.yaml")
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
        route_text_patterns={f: tuple(p) for f, p in route_patterns.items()},
        order_sets=order_sets,
        conditions_dotless=dotless,
        order_alternatives=alternatives,
        medication_names=medication_names,
    )
