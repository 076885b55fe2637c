"""POST /fhir/notifications: the FHIR subscription receiver (forms documented in the README).

Accepted: R4 rest-hook with an empty body; R4 rest-hook with a resource payload (also HAPI's
``PUT {endpoint}/{Type}/{id}``, and DELETE there); R5 Backport notification Bundles (handshake, heartbeat,
event-notification, query-status, query-event; empty, id-only and full-resource payloads); a bare resource
with ``X-Medplum-*`` headers signed with ``X-Signature``. Authenticated by the channel header's shared
secret or the HMAC; anything else 401. Every accepted event is in the ledger before the 2xx.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.exc import DataError, DBAPIError, DisconnectionError, InterfaceError, OperationalError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.cds_hooks import ctx_of, json_response, read_body
from service.api.models import OperationOutcome
from service.errors import BadRequest, InternalError, PayloadTooLarge, ServiceError, Unauthorized, Unavailable
from service.fhir.notifications import (
    BackportNotification,
    EmptyPing,
    InvalidNotification,
    parse_notification,
    verify_medplum_signature,
    verify_shared_secret,
)
from service.logging import get_logger
from service.metrics import NOTIFICATION_LATENCY, NOTIFICATIONS
from service.queue import NotSent
from service.usecases import monitor

router = APIRouter(tags=["FHIR subscriptions"])
log = get_logger("calcinosis-cds.notifications")
RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": OperationOutcome} for code in (400, 401, 413, 500, 503)}

#: The database cannot be reached or dropped the connection: the same notification can succeed later (503, retry).
_LEDGER_DOWN = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
#: A value the database (or the ledger's own checks) can never store as sent: retrying cannot help (400).
_UNSTORABLE = (DataError, ValueError, OverflowError)
_LOG_EVENTS = {"broker-unavailable": "broker_unavailable", "ledger-unavailable": "ledger_unavailable", "error": "notification_failed"}


def _failure(exc: Exception) -> tuple[str, ServiceError]:
    """The counted result and the typed error of a notification that could not be recorded.

    503 only when a dependency is really unavailable (the FHIR server retries it, and it can succeed later); a
    value that can never be stored is the sender's 400; anything else is a bug of ours: 500, never "retry"."""
    if isinstance(exc, NotSent):
        return "broker-unavailable", Unavailable("the task queue is unavailable; retry")
    if isinstance(exc, _LEDGER_DOWN) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return "ledger-unavailable", Unavailable("the event ledger is unavailable; retry")
    cause = exc.orig if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError) else exc  # a bind parameter's own error
    if isinstance(exc, _UNSTORABLE) or isinstance(cause, _UNSTORABLE):
        return "invalid", BadRequest("invalid notification: a value cannot be stored (out of range or not allowed)")
    return "error", InternalError()



def _authenticate(request: Request, body: bytes) -> str:
    settings = ctx_of(request).settings
    headers = request.headers
    if "x-signature" in headers and settings.medplum_hmac_secret is not None:
        if verify_medplum_signature(body, headers, settings.medplum_hmac_secret):
            return "medplum"
        raise _rejected("signature-mismatch")
    if settings.subscription_secret is not None:
        if verify_shared_secret(headers, settings):
            return "shared-secret"
        raise _rejected("secret-mismatch" if settings.subscription_header in headers else "secret-missing")
    if settings.medplum_hmac_secret is None and settings.dev_mode:
        return "development-mode"
    raise _rejected("signature-missing" if settings.medplum_hmac_secret is not None else "no-secret-configured")


def _rejected(reason: str) -> Unauthorized:
    """The 401, and a line that says why in a word (a rotated secret, a header the FHIR server no longer sends):
    never the header's value nor the body."""
    log.warning("notification_rejected", reason=reason)
    return Unauthorized()


async def _receive(request: Request, path: str | None) -> Response:
    ctx = ctx_of(request)
    started = time.perf_counter()

    def answered(result: str, form: str = "unknown", *, count: bool = True) -> None:
        """Count a request that was not accepted (``form`` "unknown" until the body is parsed), and time every answer."""
        if count:
            NOTIFICATIONS.labels(form, result).inc()
        NOTIFICATION_LATENCY.labels(result).observe(time.perf_counter() - started)

    try:
        body = await read_body(request, ctx.settings.max_notification_bytes, "notification")
    except PayloadTooLarge:
        answered("too-large")
        raise
    try:
        auth = _authenticate(request, body)
    except Unauthorized:
        answered("unauthorized")
        raise
    try:
        notifications = parse_notification(body, request.headers, method=request.method, path=path)
    except InvalidNotification as exc:
        answered("invalid")
        raise BadRequest(f"invalid notification: {exc.reason}") from None
    form = _form(notifications, request)
    try:
        summary = await run_in_threadpool(monitor.receive, ctx.monitor, notifications, form)
    except Exception as exc:
        result, error = _failure(exc)
        answered(result, form)
        # The error's type only: a database error's text may quote the values sent.
        name = type(exc.__cause__ if isinstance(exc, NotSent) else exc).__name__
        if result == "invalid":
            log.warning("notification_refused", form=form, error=name)
        else:
            log.error(_LOG_EVENTS[result], form=form, error=name)
        raise error from None
    answered("accepted", form, count=False)  # monitor.receive counts the events: accepted and duplicate
    log.info("notification", form=form, auth=auth, accepted=summary.accepted, duplicates=summary.duplicates)
    return json_response({"accepted": summary.accepted, "duplicates": summary.duplicates})


def _form(notifications: Sequence[object], request: Request) -> str:
    if any(isinstance(n, BackportNotification) for n in notifications):
        return "backport"
    if any(isinstance(n, EmptyPing) for n in notifications):
        return "r4-empty"
    if "x-medplum-subscription" in request.headers or "x-signature" in request.headers:
        return "medplum"
    return "r4-resource"


@router.post("/fhir/notifications", summary="Receive a FHIR subscription notification", responses=RESPONSES)
async def notifications(request: Request) -> Response:
    return await _receive(request, None)


_HAPI_PATH = "/fhir/notifications/{resource_type}/{resource_id}"


@router.put(_HAPI_PATH, summary="R4 rest-hook payload as HAPI sends it (PUT {endpoint}/{Type}/{id})", responses=RESPONSES)
async def notifications_put(resource_type: str, resource_id: str, request: Request) -> Response:
    return await _receive(request, f"{resource_type}/{resource_id}")


@router.post(_HAPI_PATH, summary="R4 rest-hook payload posted to {endpoint}/{Type}/{id}", responses=RESPONSES)
async def notifications_post(resource_type: str, resource_id: str, request: Request) -> Response:
    return await _receive(request, f"{resource_type}/{resource_id}")


@router.delete(_HAPI_PATH, summary="A deletion delivered as DELETE {endpoint}/{Type}/{id}", responses=RESPONSES)
async def notifications_delete(resource_type: str, resource_id: str, request: Request) -> Response:
    return await _receive(request, f"{resource_type}/{resource_id}")
