"""Helpers for the HTTP tests of the CDS Hooks API: requests an EHR would send "today", a uvicorn server
in a thread (real HTTP), JWT issuers, and a walker that finds empty JSON elements.

The shared builders date everything relative to ``tests.builders.NOW`` (2025-07-01) while the service
evaluates at the real current time; :func:`shifted` moves a resource's clinical dates by the difference,
so that "3 days ago" in a builder stays "3 days ago" for the service.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn

from tests import builders as b
from tests.service.security.support import SigningKey, new_ec_key, new_rsa_key, sign

RISK = "calcinosis-risk"
ENCOUNTER = "calcinosis-encounter"
ORDER_SELECT = "calcinosis-order-select"
ORDER_SIGN = "calcinosis-order-sign"
HOOK_OF = {RISK: "patient-view", ENCOUNTER: "encounter-start", ORDER_SELECT: "order-select", ORDER_SIGN: "order-sign"}

WARFARIN = "855332"  # warfarin sodium 5 MG Oral Tablet
CALCIUM_ACETATE = "214342"  # calcium acetate (ingredient)
SEVELAMER = "749206"  # sevelamer carbonate 800 MG Oral Tablet

ISSUER = "https://ehr.example.org"
ALLOWED_JKU = "https://ehr.example.org/.well-known/jwks.json"

_DATE_KEYS = frozenset(
    {"effectiveDateTime", "authoredOn", "onsetDateTime", "performedDateTime", "issued", "recordedDate", "start", "end"}
)


def today() -> datetime:
    return datetime.now(UTC)


def shifted(resource: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """A copy of ``resource`` with every clinical date moved by ``now - builders.NOW``."""
    delta = (now or today()) - b.NOW

    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (_shift_date(v, delta) if k in _DATE_KEYS and isinstance(v, str) else move(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return move(copy.deepcopy(resource))


def _shift_date(value: str, delta: timedelta) -> str:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed + delta).isoformat().replace("+00:00", "Z")


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


# --- patients --------------------------------------------------------------------------------
@dataclass
class PatientData:
    """One patient's records by prefetch key (lists of resources, already shifted to today)."""

    pid: str
    patient: dict[str, Any]
    observations: list[dict[str, Any]]
    conditions: list[dict[str, Any]]
    medication_requests: list[dict[str, Any]]

    def prefetch(self) -> dict[str, Any]:
        """Every discovery key filled, as an EHR that prefetches everything sends it."""
        return {
            "patient": self.patient,
            "observations": searchset(self.observations),
            "conditions": searchset(self.conditions),
            "medicationRequests": searchset(self.medication_requests),
            "medicationStatements": searchset([]),
            "medicationAdministrations": searchset([]),
            "procedures": searchset([]),
        }

    def resources(self) -> list[dict[str, Any]]:
        return [self.patient, *self.observations, *self.conditions, *self.medication_requests]


def _subject(resources: list[dict[str, Any]], pid: str) -> list[dict[str, Any]]:
    for r in resources:
        r["subject"] = {"reference": f"Patient/{pid}"}
    return resources


def high_risk_dialysis_patient(pid: str = "p1") -> PatientData:
    """ESRD on dialysis, on warfarin, albumin 2.8 g/dL, phosphate 7.5 mg/dL: calciphylaxis risk high."""
    return PatientData(
        pid=pid,
        patient=b.patient(pid, gender="female", birth="1958-03-14"),
        observations=_subject([shifted(r) for r in b.renal_panel(ca=9.4, p=7.5, alb=2.8, pth=320, days=3)], pid),
        conditions=_subject([shifted(b.esrd())], pid),
        medication_requests=_subject([shifted(b.med_request(WARFARIN, authored_days=20))], pid),
    )


def non_renal_patient(pid: str = "p2") -> PatientData:
    """Normal minerals, no kidney disease, no risky medication."""
    return PatientData(
        pid=pid,
        patient=b.patient(pid, gender="male", birth="1970-05-01"),
        observations=_subject(
            [shifted(r) for r in [*b.renal_panel(ca=9.2, p=3.6, alb=4.3, pth=None, days=5), b.obs(b.EGFR, 92, "mL/min/{1.73_m2}", days=5)]],
            pid,
        ),
        conditions=[],
        medication_requests=[],
    )


def hook_request(
    service: str,
    pid: str,
    *,
    prefetch: dict[str, Any] | None = None,
    fhir_server: str | None = None,
    token: str | None = None,
    **context: Any,
) -> dict[str, Any]:
    """A CDS Hooks request for ``service`` about patient ``pid``; omit ``prefetch`` to send none."""
    body: dict[str, Any] = {
        "hook": HOOK_OF[service],
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/pr1", "patientId": pid, **context},
    }
    if fhir_server is not None:
        body["fhirServer"] = fhir_server
    if token is not None:
        body["fhirAuthorization"] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/Patient.read user/Observation.read user/Condition.read user/MedicationRequest.read",
            "subject": "cds-service",
        }
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


def draft_order(rid: str, rxnorm: str, pid: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": b.RXNORM, "code": rxnorm}
    if display:
        coding["display"] = display
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": "draft",
        "intent": "proposal",
        "medicationCodeableConcept": {"coding": [coding]},
        "subject": {"reference": f"Patient/{pid}"},
        "dosageInstruction": [{"text": "as directed"}],
    }


def sandbox_draft_orders(*orders: dict[str, Any]) -> dict[str, Any]:
    """``context.draftOrders`` as the CDS Hooks Sandbox sends it: a Bundle without ``type``."""
    return {"resourceType": "Bundle", "entry": [{"resource": o} for o in orders]}


# --- response inspection ----------------------------------------------------------------------
def empty_elements(document: Any, path: str = "$") -> list[str]:
    """JSON paths of nulls, empty arrays, empty objects and empty strings in ``document``.

    The top-level ``cards`` array is exempt: CDS Hooks requires it even when there is no advice."""
    found: list[str] = []
    if path == "$.cards" and document == []:
        return found
    if document is None or document == "" or document == [] or document == {}:
        found.append(path)
    elif isinstance(document, dict):
        for k, v in document.items():
            found += empty_elements(v, f"{path}.{k}")
    elif isinstance(document, list):
        for i, v in enumerate(document):
            found += empty_elements(v, f"{path}[{i}]")
    return found


def topics(response: dict[str, Any]) -> list[str]:
    return [c["source"]["topic"]["code"] for c in response["cards"]]


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/fhir"


# --- real HTTP ----------------------------------------------------------------------------------
@contextlib.contextmanager
def serve_in_thread(app: Any, *, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (an OS-chosen port) in a thread; yields the origin URL.
    ``tls``: (certificate file, key file) to serve HTTPS."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    certfile, keyfile = tls if tls is not None else (None, None)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False, ssl_certfile=certfile, ssl_keyfile=keyfile)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# --- JWT -------------------------------------------------------------------------------------
@dataclass
class Issuer:
    """A trusted EHR: an ES384 and an RS384 key, both published in ``jwks_file``."""

    iss: str
    ec: SigningKey
    rsa: SigningKey
    jwks_file: Path

    @classmethod
    def create(cls, directory: Path, iss: str = ISSUER) -> Issuer:
        ec, rsa = new_ec_key(), new_rsa_key()
        path = directory / f"jwks-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps({"keys": [ec.public_jwk, rsa.public_jwk]}))
        return cls(iss, ec, rsa, path)

    def token(self, aud: str | list[str], *, key: SigningKey | None = None, lifetime_s: int = 300, **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {"iss": self.iss, "aud": aud, "iat": now, "exp": now + lifetime_s, "jti": str(uuid.uuid4())}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        headers = {"typ": "JWT"}
        return sign(key or self.ec, payload, **headers)

    def bearer(self, aud: str | list[str], **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(aud, **kwargs)}"}
