"""Log lines go to the standard error of the moment, even when it was swapped after logging was configured."""

from __future__ import annotations

import io
import sys

import pytest

from service.logging import configure_logging, get_logger


def test_a_stream_swapped_and_closed_after_configuration_is_never_written_to(monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging("INFO", json=True)  # once per process; a no-op when the app already did it
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    get_logger("test").info("first_line", n=1)
    first.close()  # as a CLI test runner closes the stream it captured
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("test").info("second_line", n=2)  # used to raise "I/O operation on closed file"
    assert "second_line" in second.getvalue()
