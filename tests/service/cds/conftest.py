from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from service.cds.engine import Evaluation, evaluate_patient
from service.cds.thresholds import Thresholds
from service.terminology.catalog import Catalog
from tests.builders import NOW, PATIENT, patient


@pytest.fixture(scope="session")
def run(catalog: Catalog) -> Callable[..., Evaluation]:
    """Stateless, so session-scoped (hypothesis reuses it). Evaluate resources for Patient/p1 (a 65-year-old man unless given another Patient)."""

    def _run(*resources: dict[str, Any], thresholds: Thresholds | None = None, with_patient: bool = True, **patient_kw: Any) -> Evaluation:
        items = list(resources)
        if with_patient and not any(r.get("resourceType") == "Patient" for r in items):
            items.append(patient(**patient_kw))
        return evaluate_patient(items, patient_ref=PATIENT, catalog=catalog, thresholds=thresholds or Thresholds(), now=NOW)

    return _run
