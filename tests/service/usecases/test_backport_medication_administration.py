"""The Backport topic path reads MedicationAdministration as the R4 subscriptions do: an id-only event whose focus is
one is fetched from the FHIR server (over real HTTP) and stored for its patient."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.repositories import Repositories
from service.db.session import session_scope
from service.fhir.notifications import parse_notification
from service.queue import MemoryQueue
from service.terminology.catalog import Catalog
from service.usecases.monitor import MonitorContext, process_event, receive
from tests.fakes.fhir_server import FakeFhirServer
from tests.fakes.notifications import EventSpec, make_notification_bundle


def test_an_id_only_medication_administration_event_is_fetched_and_stored(
    db_session_factory: sessionmaker[Session], catalog: Catalog, tmp_path: Path, fhir: FakeFhirServer
) -> None:
    fhir.put(
        {
            "resourceType": "MedicationAdministration",
            "id": "ma-1",
            "status": "in-progress",
            "medicationCodeableConcept": {"text": "calcium gluconate IV"},
            "subject": {"reference": "Patient/p-ma"},
            "effectivePeriod": {"start": "2025-06-30T08:00:00Z"},
        }
    )
    ctx = MonitorContext.from_settings(
        Settings(data_dir=tmp_path, fhir_base_url=fhir.base_url), catalog=catalog, sessions=db_session_factory, queue=MemoryQueue()
    )
    bundle = make_notification_bundle(subscription="topic-sub", events=[EventSpec(1, focus="MedicationAdministration/ma-1")], base_url=fhir.base_url)
    summary = receive(ctx, parse_notification(json.dumps(bundle).encode(), {}), "backport")
    assert summary.accepted == 1
    assert process_event(ctx, summary.events[0]) == "handled"
    with session_scope(ctx.sessions) as session:
        stored = Repositories(session).resources.get("MedicationAdministration", "ma-1")
        assert stored is not None and stored.patient_ref == "Patient/p-ma"
