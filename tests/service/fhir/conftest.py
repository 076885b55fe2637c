"""Fixtures for the FHIR layer: a fake server over real HTTP, client factory, signing keys."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.fhir.client import FhirClient
from tests.fakes.fhir_server import FakeFhirServer, KeyPair, make_keypair

NOTIFICATIONS = Path(__file__).resolve().parents[2] / "data" / "notifications"


class SleepRecorder:
    """Injectable ``sleep`` that records delays; really sleeps only when ``real`` is set."""

    def __init__(self, real: bool = False) -> None:
        self.real = real
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.real:
            time.sleep(seconds)

    def clock(self) -> float:
        """A monotonic clock that also advances by every recorded (possibly virtual) sleep."""
        return time.monotonic() + (0.0 if self.real else sum(self.calls))


@pytest.fixture
def fhir_server() -> Iterator[FakeFhirServer]:
    with FakeFhirServer() as srv:
        yield srv
        assert not srv.errors, "\n".join(srv.errors)


@pytest.fixture
def sleeper() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture
def make_client(sleeper: SleepRecorder) -> Iterator[Callable[..., FhirClient]]:
    """``make_client(srv_or_url, **kwargs)``: fast backoff, recorded sleeps, closed at teardown."""
    clients: list[FhirClient] = []

    def factory(target: FakeFhirServer | str, **kwargs: Any) -> FhirClient:
        base = target.base_url if isinstance(target, FakeFhirServer) else target
        kwargs.setdefault("sleep", sleeper)
        kwargs.setdefault("backoff_s", 0.01)
        kwargs.setdefault("timeout_s", 5.0)
        client = FhirClient(base, **kwargs)
        clients.append(client)
        return client

    yield factory
    for c in clients:
        c.close()


@pytest.fixture(scope="session")
def rsa_keys() -> KeyPair:
    return make_keypair("RS384", kid="cds-rsa-1")


@pytest.fixture(scope="session")
def ec_keys() -> KeyPair:
    return make_keypair("ES384", kid="cds-ec-1")


def observation(oid: str, patient: str = "pat-1", code: str = "2777-1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        **extra,
    }
