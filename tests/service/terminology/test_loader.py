"""load_catalog refuses broken mappings with a MappingError naming the file and the line.

Each test copies the real mappings into tmp_path, breaks one thing, and checks the message.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from service.terminology.loader import MappingError, load_catalog

MAPPINGS = Path(__file__).resolve().parents[3] / "mappings"


@pytest.fixture
def mappings(tmp_path: Path) -> Path:
    target = tmp_path / "mappings"
    target.mkdir()
    for path in MAPPINGS.glob("*.yaml"):
        shutil.copy(path, target / path.name)
    return target


def _line_no(path: Path, needle: str) -> int:
    """1-based number of the first line of ``path`` containing ``needle``."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path.name}")


def _replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _insert_after(path: Path, needle: str, new_line: str) -> int:
    """Insert ``new_line`` after the first line containing ``needle``; return its 1-based line number."""
    lines = path.read_text(encoding="utf-8").splitlines()
    index = _line_no(path, needle)
    lines.insert(index, new_line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return index + 1


def _append(path: Path, text: str) -> int:
    """Append ``text`` (one or more lines); return the 1-based number of its first line."""
    old = path.read_text(encoding="utf-8")
    if not old.endswith("\n"):
        old += "\n"
    path.write_text(old + text, encoding="utf-8")
    return old.count("\n") + 1


def _error(directory: Path) -> str:
    with pytest.raises(MappingError) as info:
        load_catalog(directory)
    return str(info.value)


def _where(message: str) -> tuple[str, int]:
    match = re.match(r"^([\w.]+\.yaml):(\d+): ", message)
    assert match, f"message does not start with file:line: {message!r}"
    return match.group(1), int(match.group(2))


def test_pristine_copy_loads(mappings: Path) -> None:
    assert load_catalog(mappings).version == load_catalog(MAPPINGS).version


def test_unknown_key(mappings: Path) -> None:
    path = mappings / "observations.yaml"
    line = _insert_after(path, 'code: "17861-6"', "    colour: red")
    message = _error(mappings)
    assert _where(message) == ("observations.yaml", line)
    assert "colour" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_key_in_a_flow_mapping(mappings: Path) -> None:
    path = mappings / "conditions.yaml"
    line = _line_no(path, 'code: "46177005"')
    _replace_once(path, 'code: "46177005",', 'code: "46177005", colour: red,')
    message = _error(mappings)
    assert _where(message) == ("conditions.yaml", line)
    assert "colour" in message


def test_unknown_key_at_file_level(mappings: Path) -> None:
    path = mappings / "routes.yaml"
    line = _insert_after(path, "kind: routes", "colour: red")
    message = _error(mappings)
    assert _where(message) == ("routes.yaml", line)
    assert "colour" in message


def test_missing_required_key(mappings: Path) -> None:
    path = mappings / "procedures.yaml"
    line = _line_no(path, 'code: "302497006"')
    _replace_once(path, "display: Hemodialysis, feature: dialysis", "feature: dialysis")
    message = _error(mappings)
    assert _where(message) == ("procedures.yaml", line)
    assert "display" in message and "Field required" in message


def test_duplicate_code_across_two_files(mappings: Path) -> None:
    path = mappings / "procedures.yaml"
    first = _line_no(mappings / "conditions.yaml", 'code: "46177005"')
    line = _append(path, '  - {system: "http://snomed.info/sct", code: "46177005", display: ESRD again, feature: dialysis}\n')
    message = _error(mappings)
    assert _where(message) == ("procedures.yaml", line)
    assert "duplicate (system, code) http://snomed.info/sct|46177005" in message
    assert f"also in conditions.yaml:{first}" in message


def test_duplicate_icd10cm_code_without_its_dot(mappings: Path) -> None:
    path = mappings / "conditions.yaml"
    line = _append(path, '  - {system: "http://hl7.org/fhir/sid/icd-10-cm", code: E8352, display: x, feature: diabetes}\n')
    message = _error(mappings)
    assert _where(message) == ("conditions.yaml", line)
    assert "duplicate" in message and "E8352" in message


def test_duplicate_yaml_key(mappings: Path) -> None:
    path = mappings / "features.yaml"
    line = _append(path, '  ckd4: {kind: condition, display: "CKD 4 again"}\n')
    message = _error(mappings)
    assert _where(message) == ("features.yaml", line)
    assert "duplicate key 'ckd4'" in message
    assert f"first on line {_line_no(path, '  ckd4:')}" in message


def test_analyte_with_unknown_unit(mappings: Path) -> None:
    path = mappings / "analytes.yaml"
    line = _line_no(path, "  bmi:")
    _replace_once(path, "units: [kg/m2]", "units: [kg/m2, furlong]")
    message = _error(mappings)
    assert _where(message) == ("analytes.yaml", line)
    assert "bmi" in message and "'furlong'" in message


def test_analyte_canonical_unit_not_accepted(mappings: Path) -> None:
    path = mappings / "analytes.yaml"
    line = _line_no(path, "  albumin:")
    _replace_once(path, "units: [g/dL, g/L]", "units: [g/L]")
    message = _error(mappings)
    assert _where(message) == ("analytes.yaml", line)
    assert "canonical unit g/dL" in message


def test_analyte_mixing_dimensions_needs_a_molar_mass(mappings: Path) -> None:
    path = mappings / "analytes.yaml"
    line = _line_no(path, "  phosphate:")
    _replace_once(path, '    molar_mass: "30.974"\n', "")
    message = _error(mappings)
    assert _where(message) == ("analytes.yaml", line)
    assert "molar_mass" in message


def test_entry_with_unknown_feature(mappings: Path) -> None:
    path = mappings / "conditions.yaml"
    line = _line_no(path, "feature: esrd_or_ckd5")
    _replace_once(path, "feature: esrd_or_ckd5", "feature: esrd_or_ckd6")
    message = _error(mappings)
    assert _where(message) == ("conditions.yaml", line)
    assert "unknown feature 'esrd_or_ckd6'" in message


def test_entry_with_a_feature_of_another_kind(mappings: Path) -> None:
    path = mappings / "conditions.yaml"
    line = _line_no(path, "feature: ckd4")
    _replace_once(path, "feature: ckd4", "feature: dialysis")
    message = _error(mappings)
    assert _where(message) == ("conditions.yaml", line)
    assert "procedure feature" in message


def test_entry_with_unknown_analyte(mappings: Path) -> None:
    path = mappings / "observations.yaml"
    line = _line_no(path, "analyte: calcium_total")
    _replace_once(path, "analyte: calcium_total", "analyte: calcium_totl")
    message = _error(mappings)
    assert _where(message) == ("observations.yaml", line)
    assert "unknown analyte 'calcium_totl'" in message


def test_entry_with_non_canonical_system(mappings: Path) -> None:
    path = mappings / "conditions.yaml"
    line = _line_no(path, 'code: "46177005"')
    _replace_once(
        path, '{system: "http://snomed.info/sct", code: "46177005"', '{system: "https://snomed.info/sct", code: "46177005"'
    )
    message = _error(mappings)
    assert _where(message) == ("conditions.yaml", line)
    assert "non-canonical system 'https://snomed.info/sct'" in message


def test_non_canonical_default_system(mappings: Path) -> None:
    path = mappings / "observations.yaml"
    line = _line_no(path, "default_system:")
    _replace_once(path, "default_system: http://loinc.org", "default_system: http://loinc.org/")
    message = _error(mappings)
    assert _where(message) == ("observations.yaml", line)
    assert "non-canonical system 'http://loinc.org/'" in message


def test_prefix_match_on_snomed_is_refused(mappings: Path) -> None:
    path = mappings / "conditions.yaml"
    line = _line_no(path, 'code: "46177005"')
    _replace_once(path, 'code: "46177005",', 'code: "46177005", match: prefix,')
    message = _error(mappings)
    assert _where(message) == ("conditions.yaml", line)
    assert "prefix" in message


def test_invalid_yaml(mappings: Path) -> None:
    path = mappings / "routes.yaml"
    line = _append(path, "broken: a: b\n")
    message = _error(mappings)
    assert _where(message) == ("routes.yaml", line)
    assert "not valid YAML" in message


def test_unknown_kind(mappings: Path) -> None:
    path = mappings / "routes.yaml"
    line = _line_no(path, "kind: routes")
    _replace_once(path, "kind: routes", "kind: route")
    message = _error(mappings)
    assert _where(message) == ("routes.yaml", line)
    assert "unknown kind 'route'" in message


def test_file_without_kind(mappings: Path) -> None:
    (mappings / "zz_extra.yaml").write_text("entries: []\n", encoding="utf-8")
    message = _error(mappings)
    assert _where(message) == ("zz_extra.yaml", 1)


def test_product_with_unmapped_ingredient(mappings: Path) -> None:
    path = mappings / "medications.yaml"
    line = _line_no(path, 'code: "855332"')
    _replace_once(
        path,
        'code: "855332", tty: SCD, display: warfarin sodium 5 MG Oral Tablet, ingredients: ["11289"]',
        'code: "855332", tty: SCD, display: warfarin sodium 5 MG Oral Tablet, ingredients: ["99999"]',
    )
    message = _error(mappings)
    assert _where(message) == ("medications.yaml", line)
    assert "99999" in message


def test_product_with_a_feature_is_refused(mappings: Path) -> None:
    path = mappings / "medications.yaml"
    line = _line_no(path, 'code: "855332"')
    _replace_once(path, 'ingredients: ["11289"], sources: [RXN]}', 'ingredients: ["11289"], feature: vka, sources: [RXN]}')
    message = _error(mappings)
    assert _where(message) == ("medications.yaml", line)
    assert "product" in message


def test_order_set_with_unknown_code(mappings: Path) -> None:
    path = mappings / "order_sets.yaml"
    line = _line_no(path, "  pth:")
    _replace_once(path, 'codes: ["2731-8"]', 'codes: ["14866-2"]')
    message = _error(mappings)
    assert _where(message) == ("order_sets.yaml", line)
    assert "14866-2" in message


def test_numeric_code_must_be_quoted(mappings: Path) -> None:
    path = mappings / "conditions.yaml"
    line = _line_no(path, 'code: "46177005"')
    _replace_once(path, 'code: "46177005"', "code: 46177005")
    message = _error(mappings)
    assert _where(message) == ("conditions.yaml", line)
    assert "code" in message and "string" in message


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="no mapping files"):
        load_catalog(tmp_path)


# ----------------------------------------------------------------------------- version
def test_version_is_stable(mappings: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(mappings, other)
    assert load_catalog(mappings).version == load_catalog(mappings).version == load_catalog(other).version


def test_version_changes_when_content_changes(mappings: Path) -> None:
    before = load_catalog(mappings).version
    path = mappings / "conditions.yaml"
    _replace_once(path, "display: End-stage renal disease,", "display: End stage renal disease,")
    changed = load_catalog(mappings).version
    assert changed != before
    _append(path, "# a comment is content too\n")
    assert load_catalog(mappings).version not in (before, changed)


def test_version_ignores_non_yaml_files(mappings: Path) -> None:
    before = load_catalog(mappings).version
    (mappings / "README.md").write_text("# notes\n", encoding="utf-8")
    assert load_catalog(mappings).version == before


def test_version_depends_on_file_names(mappings: Path) -> None:
    before = load_catalog(mappings).version
    (mappings / "routes.yaml").rename(mappings / "routes2.yaml")
    assert load_catalog(mappings).version != before


def test_order_alternative_with_unmapped_product(mappings: Path) -> None:
    path = mappings / "order_alternatives.yaml"
    if not path.exists():
        pytest.skip("no order_alternatives.yaml")
    line = _line_no(path, "  calcium_binder:")
    _replace_once(path, 'code: "749206"', 'code: "99999"')
    message = _error(mappings)
    assert _where(message) == ("order_alternatives.yaml", line)
    assert "99999" in message


@pytest.mark.parametrize("feature", ["noncalcium_bindr", "esrd_or_ckd5"], ids=["unknown", "condition-feature"])
def test_order_alternative_unless_current_names_a_medication_feature(mappings: Path, feature: str) -> None:
    path = mappings / "order_alternatives.yaml"
    line = _line_no(path, "  calcium_binder:")
    _replace_once(path, "unless_current: [noncalcium_binder]", f"unless_current: [{feature}]")
    message = _error(mappings)
    assert _where(message) == ("order_alternatives.yaml", line)
    assert f"unless_current {feature!r} is not a medication feature" in message


def test_order_alternative_with_an_unknown_requirement(mappings: Path) -> None:
    path = mappings / "order_alternatives.yaml"
    line = _line_no(path, "requires: [hyperphosphatemia]")
    _replace_once(path, "requires: [hyperphosphatemia]", "requires: [hyperphosphataemia]")
    message = _error(mappings)
    assert _where(message) == ("order_alternatives.yaml", line)
    assert "requires.0: Input should be 'hyperphosphatemia'" in message
