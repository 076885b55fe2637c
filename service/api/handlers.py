"""The one place where errors become HTTP responses: FHIR OperationOutcome bodies, never the request echoed."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.errors import ServiceError
from service.logging import get_logger

log = get_logger("calcinosis-cds.api")

_STATUS_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    412: "incomplete",
    413: "too-costly",
    415: "not-supported",
}


def operation_outcome(status: int, diagnostics: str | None, code: str | None = None) -> Response:
    issue: dict[str, Any] = {"severity": "error" if status < 500 else "fatal", "code": code or _STATUS_CODES.get(status, "exception")}
    if diagnostics:
        issue["diagnostics"] = diagnostics
    headers = {"WWW-Authenticate": 'Bearer realm="cds-services"'} if status == 401 else None
    return Response(
        orjson.dumps({"resourceType": "OperationOutcome", "issue": [issue]}),
        status_code=status,
        media_type="application/fhir+json",
        headers=headers,
    )


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        # 401: no detail at all (CDS Hooks trust model); others: the typed, value-free message.
        detail = None if exc.status_code == 401 else exc.message
        return operation_outcome(exc.status_code, detail, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        fields = sorted({".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in exc.errors()})[:5]
        return operation_outcome(400, f"invalid request: {', '.join(f for f in fields if f) or 'body'}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return operation_outcome(exc.status_code, "not found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # The route's template ("/cds-services/{service_id}/feedback"), never the path as sent: its segments are
        # the caller's text.
        route = getattr(request.scope.get("route"), "path", None)
        log.error("unhandled_error", route=route if isinstance(route, str) else "(no route)", error=type(exc).__name__)
        return operation_outcome(500, "internal error")
