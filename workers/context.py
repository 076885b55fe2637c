"""Per-process MonitorContext for tasks (built lazily; rebuilt after fork)."""

from __future__ import annotations

from service.config import get_settings
from service.logging import configure_logging
from service.usecases.monitor import MonitorContext

_ctx: MonitorContext | None = None


def get() -> MonitorContext:
    global _ctx
    if _ctx is None:
        settings = get_settings()
        configure_logging(settings.log_level, settings.log_json)
        _ctx = MonitorContext.from_settings(settings)
    return _ctx


def reset() -> None:
    global _ctx
    _ctx = None
