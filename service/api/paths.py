"""Tolerance of the URL an integrator registered: ``…/cds-services/`` with a trailing slash makes a client call
``…/cds-services//calcinosis-risk`` (the CDS Hooks Sandbox joins the discovery URL and the service id with a slash).

Repeated slashes are collapsed and a trailing slash dropped before routing, so both reach the same route as the clean
URL, with no redirect (a browser's preflighted cross-origin call would not follow one with its token). The path as
called is kept in the scope: a JWT's ``aud`` names the exact URL the client used (:func:`requested_path`).
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

_REQUESTED = "calcinosis.requested_path"
_SLASHES = re.compile(r"/{2,}")
_RAW_SLASHES = re.compile(rb"/{2,}")


class CollapseSlashes:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if "//" in path or (path.endswith("/") and path != "/"):
                clean = _SLASHES.sub("/", path).rstrip("/") or "/"
                raw: bytes = scope.get("raw_path") or path.encode()
                raw = _RAW_SLASHES.sub(b"/", raw).rstrip(b"/") or b"/"  # still percent-encoded, as the client sent it
                scope = {**scope, "path": clean, "raw_path": raw, _REQUESTED: path}
        await self.app(scope, receive, send)


def requested_path(scope: Scope) -> str:
    """The path exactly as the client called it (before :class:`CollapseSlashes`)."""
    path: str = scope.get(_REQUESTED) or scope["path"]
    return path
