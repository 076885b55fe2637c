"""Build the Subscriptions the service needs on a FHIR server: R4 criteria (rest-hook) or R5 Backport topic-based."""

from __future__ import annotations

from typing import Any

from service.cds.discovery import observation_code_tokens
from service.terminology.catalog import Catalog

BACKPORT_PROFILE = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription"
EXT_PAYLOAD = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content"
EXT_FILTER = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria"
EXT_HEARTBEAT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period"
REASON = "calcinosis-cds: keep calciphylaxis and metastatic calcification risk current"


def r4_criteria(catalog: Catalog) -> list[str]:
    return [
        "Observation?code=" + ",".join(observation_code_tokens(catalog)),
        "Condition?",
        "MedicationRequest?",
        "MedicationStatement?",
        "MedicationAdministration?",  # current IV calcium or phosphate
        "Procedure?",
        "Patient?",
    ]


def r4_subscriptions(catalog: Catalog, endpoint: str, header: str | None) -> list[dict[str, Any]]:
    out = []
    for criteria in r4_criteria(catalog):
        channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json"}
        if header:
            channel["header"] = [header]
        out.append({"resourceType": "Subscription", "status": "requested", "reason": REASON, "criteria": criteria, "channel": channel})
    return out


def backport_subscription(topic: str, endpoint: str, header: str | None, heartbeat_s: int, filters: list[str] | None = None) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "type": "rest-hook",
        "endpoint": endpoint,
        "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": EXT_PAYLOAD, "valueCode": "full-resource"}]},
        "extension": [{"url": EXT_HEARTBEAT, "valueUnsignedInt": heartbeat_s}],
    }
    if header:
        channel["header"] = [header]
    sub: dict[str, Any] = {
        "resourceType": "Subscription",
        "meta": {"profile": [BACKPORT_PROFILE]},
        "status": "requested",
        "reason": REASON,
        "criteria": topic,
        "channel": channel,
    }
    if filters:
        sub["_criteria"] = {"extension": [{"url": EXT_FILTER, "valueString": f} for f in filters]}
    return sub
