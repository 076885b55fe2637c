"""``calcinosis-cds subscriptions create`` subscribes to every resource type the engine reads (the monitor's
MONITORED_TYPES, MedicationAdministration included: current IV calcium or phosphate), on a FHIR server over real
HTTP."""

from __future__ import annotations

from pathlib import Path

from service.config import Settings
from service.usecases.monitor import MONITORED_TYPES
from tests.fakes.fhir_server import FakeFhirServer
from tests.service.conftest import RunCli

SECRET = "cli-subscription-secret"


def test_r4_subscriptions_cover_every_resource_type_the_engine_reads(tmp_path: Path, run_cli: RunCli, fhir: FakeFhirServer) -> None:
    assert run_cli(["migrate"], CDS_DATA_DIR=str(tmp_path))[0] == 0
    code, lines = run_cli(
        ["subscriptions", "create", "--endpoint", "https://cds.example.org/fhir/notifications"],
        CDS_FHIR_BASE_URL=fhir.base_url,
        CDS_DATA_DIR=str(tmp_path),
        CDS_SUBSCRIPTION_SECRET=SECRET,
    )
    assert code == 0, lines
    created = fhir.resources("Subscription")
    subscribed = {s["criteria"].split("?", 1)[0] for s in created}
    assert subscribed == set(MONITORED_TYPES)
    assert "MedicationAdministration" in subscribed
    assert len(lines) == len(created) == len(MONITORED_TYPES)  # one line per Subscription, as created
    assert all(s["channel"]["header"] == [f"Authorization: Bearer {SECRET}"] for s in created)


def test_the_default_smart_scope_reads_every_resource_type_the_engine_reads() -> None:
    """A type outside the token's scope would fail every catch-up search under SMART Backend Services."""
    scopes = set(Settings.model_fields["smart_scope"].default.split())
    assert {f"system/{t}.rs" for t in MONITORED_TYPES} <= scopes


def test_status_shows_each_types_watermark(tmp_path: Path, run_cli: RunCli) -> None:
    from datetime import UTC, datetime

    from service.db.repositories import Repositories
    from service.db.session import make_engine, make_session_factory, session_scope

    assert run_cli(["migrate"], CDS_DATA_DIR=str(tmp_path))[0] == 0
    engine = make_engine(Settings(data_dir=tmp_path).effective_database_url)
    mark = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    with session_scope(make_session_factory(engine)) as session:
        Repositories(session).subscriptions.set_type_watermarks("Subscription/s1", {"Observation": mark, "Condition": mark.replace(hour=13)})
        Repositories(session).subscriptions.set_history_watermark("Subscription/s1", "Observation", mark.replace(hour=14))
    engine.dispose()

    code, lines = run_cli(["subscriptions", "status"], CDS_DATA_DIR=str(tmp_path))

    assert code == 0, lines
    assert lines == [
        "Subscription/s1\tstatus=None\tlast_event=None\theartbeat=-\twatermark=2026-11-01T12:00:00+00:00"
        "\tCondition=2026-11-01T13:00:00+00:00\tObservation=2026-11-01T12:00:00+00:00\tObservation/_history=2026-11-01T14:00:00+00:00"
    ]


def test_a_created_topic_subscription_is_the_row_its_notifications_reach(tmp_path: Path, run_cli: RunCli, fhir: FakeFhirServer) -> None:
    """``subscriptions create --topic`` records ``Subscription/{id}``; the server's handshake and heartbeat name it by
    its absolute URL and reach that same row (they used to make a second one, and the sweeper reported the created
    one silent and queued a recovery search every window); a new topic subscription starts at event 0."""
    import json
    from datetime import UTC, datetime, timedelta

    from service.fhir.notifications import parse_notification
    from service.queue import MemoryQueue
    from service.usecases.monitor import MonitorContext, receive, sweep
    from tests.fakes.notifications import make_notification_bundle

    env = {"CDS_DATA_DIR": str(tmp_path), "CDS_FHIR_BASE_URL": fhir.base_url, "CDS_SUBSCRIPTION_SECRET": SECRET}
    assert run_cli(["migrate"], **env)[0] == 0
    create = ["subscriptions", "create", "--topic", "http://example.org/topic/calc", "--endpoint", "https://cds.example.org/fhir/notifications"]
    code, lines = run_cli(create, **env)
    assert code == 0, lines
    ref = lines[0].split("\t")[0]
    sub_id = ref.removeprefix("Subscription/")
    assert ref == f"Subscription/{sub_id}"

    ctx = MonitorContext.from_settings(Settings(data_dir=tmp_path, fhir_base_url=fhir.base_url, heartbeat_timeout_s=60), queue=MemoryQueue())
    absolute = f"{fhir.base_url}/Subscription/{sub_id}"
    for kind in ("handshake", "heartbeat"):
        bundle = make_notification_bundle(subscription=absolute, type=kind, status="active", events_since_start=0)
        receive(ctx, parse_notification(json.dumps(bundle).encode(), {}), "backport")

    code, lines = run_cli(["subscriptions", "status"], **env)
    assert code == 0, lines
    assert len(lines) == 1 and lines[0].startswith(f"{ref}\tstatus=active\tlast_event=0\theartbeat=2"), lines
    # Known for longer than the heartbeat timeout, heartbeats arriving: not silent.
    from service.db.models import SubscriptionState
    from service.db.session import session_scope

    with session_scope(ctx.sessions) as session:
        state = session.get(SubscriptionState, ref)
        assert state is not None
        state.created_at = datetime.now(UTC) - timedelta(hours=1)
    assert sweep(ctx)["silent_subscriptions"] == 0
