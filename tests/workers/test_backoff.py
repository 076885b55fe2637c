"""Task retries back off exponentially with jitter, and never sooner than the FHIR server's Retry-After."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from service.config import Settings
from service.fhir.errors import FhirTransientError
from workers import context, tasks


@pytest.fixture(autouse=True)
def settings(monkeypatch, tmp_path) -> None:
    fake = SimpleNamespace(settings=Settings(data_dir=tmp_path, task_retry_backoff_max_s=300))
    monkeypatch.setattr(context, "get", lambda: fake)


def test_exponential_with_jitter_and_capped() -> None:
    for retries, (low, high) in {0: (0.5, 1.5), 3: (4, 12), 20: (150, 450)}.items():
        delays = [tasks._backoff(retries) for _ in range(200)]
        assert all(low <= d <= high for d in delays)


def test_retry_after_is_honoured_within_the_cap() -> None:
    asked = FhirTransientError("HTTP 503", status=503, retry_after_s=120)
    assert all(tasks._backoff(0, asked) == 120 for _ in range(50))  # longer than any step at retry 0
    too_long = FhirTransientError("HTTP 429", status=429, retry_after_s=86_400)
    assert all(tasks._backoff(0, too_long) == 300 for _ in range(50))  # the cap: the broker's visibility timeout allows for it
    without = FhirTransientError("HTTP 503", status=503)
    assert all(tasks._backoff(0, without) <= 1.5 for _ in range(50))
