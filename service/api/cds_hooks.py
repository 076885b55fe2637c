"""CDS Hooks 2.0 routes: discovery, service calls, feedback (and its audit read). Thin: parse, one use case, shape."""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import jwt
import orjson
from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.responses import Response

from service.api.models import (
    AcceptedSuggestion,
    CdsRequest,
    CdsResponse,
    Coding,
    Discovery,
    FeedbackItem,
    FeedbackRequest,
    OperationOutcome,
    OverrideReason,
)
from service.api.paths import requested_path
from service.api.state import AppContext
from service.cds.discovery import SERVICES_BY_ID
from service.db.repositories import CardFeedbackRepository
from service.db.session import session_scope
from service.errors import BadRequest, NotFound, PayloadTooLarge, ServiceError, Unauthorized
from service.logging import get_logger
from service.metrics import AUTH_FAILURES, CARDS, FEEDBACK, HOOK_412, HOOK_ERRORS, HOOK_LATENCY
from service.security import AuthenticationError, VerifiedCaller

router = APIRouter()
_FEEDBACK_FIELDS = frozenset(
    name for model in (FeedbackRequest, FeedbackItem, OverrideReason, AcceptedSuggestion, Coding) for name in model.model_fields
)
log = get_logger("calcinosis-cds.hooks")
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": OperationOutcome} for code in (400, 401, 404, 412, 413)}


#: The log field and metric label of a service id that is not one of ours: the path segment is the caller's text
#: (it may be anything, a patient's name included) and an unbounded metric label.
UNKNOWN_SERVICE = "unknown"


def service_label(service_id: str) -> str:
    """``service_id`` when it is one of the services, else :data:`UNKNOWN_SERVICE` (never the caller's text)."""
    return service_id if service_id in SERVICES_BY_ID else UNKNOWN_SERVICE


def _loc_part(part: Any) -> str:
    return str(part) if isinstance(part, int) or part in _FEEDBACK_FIELDS else "(unknown member)"


def ctx_of(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _audiences(request: Request, settings_bases: list[str]) -> list[str]:
    """The URLs a token's ``aud`` may name: each configured public base + the path called. Without one (refused in
    production) the URL as received, whose host and scheme the client chose: what the CDS Hooks Sandbox signs."""
    path = requested_path(request.scope)  # as called: "…/cds-services//calcinosis-risk" stays what the token names
    if settings_bases:
        return [b.rstrip("/") + path for b in settings_bases]
    return [str(request.url.replace(path=path, query=None, fragment=None))]


def authenticate(request: Request, route: str) -> VerifiedCaller:
    """Verify the EHR's JWT; the audience must be the exact URL called (or a configured public base + path)."""
    ctx = ctx_of(request)
    header = request.headers.get("authorization")
    audiences = _audiences(request, ctx.settings.public_base_urls)
    audience = audiences[0]
    if header and len(audiences) > 1:
        try:
            claimed = jwt.decode(header.split(" ", 1)[-1], options={"verify_signature": False}).get("aud")
            claimed_list = claimed if isinstance(claimed, list) else [claimed]
            audience = next((a for a in audiences if a in claimed_list), audience)
        except jwt.PyJWTError:
            pass
    try:
        return ctx.verifier.verify(header, audience)
    except AuthenticationError as exc:
        AUTH_FAILURES.labels(route).inc()
        log.warning("auth_rejected", route=route, reason=str(exc))
        raise Unauthorized() from None


def require_admin(request: Request) -> None:
    ctx = ctx_of(request)
    token = ctx.settings.admin_token
    if ctx.settings.dev_mode and token is None:
        return  # development mode without a configured token: open; a configured token is always required
    header = request.headers.get("authorization") or ""
    import hmac

    if token is None or not hmac.compare_digest(header.encode(), f"Bearer {token.get_secret_value()}".encode()):
        raise Unauthorized()


@router.get("/cds-services", response_model=Discovery, tags=["CDS Hooks"], summary="CDS Hooks discovery")
def discovery(request: Request) -> Response:
    """The four services with prefetch templates generated from the mappings. Public: it holds no patient data."""
    return json_response(ctx_of(request).discovery)


async def read_body(request: Request, limit: int, what: str = "request body") -> bytes:
    """The whole body, refused with 413 past ``limit`` bytes (by its Content-Length before reading, when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"{what} over {limit} bytes")
    body = await request.body()
    if len(body) > limit:
        raise PayloadTooLarge(f"{what} over {limit} bytes")
    return body


def _parse_json(body: bytes) -> Any:
    if not body:
        raise BadRequest("empty request body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None


@router.post(
    "/cds-services/{service_id}",
    tags=["CDS Hooks"],
    summary="Call a CDS service",
    responses={200: {"model": CdsResponse}, **ERRORS},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CdsRequest"}}}}},
)
async def call_service(service_id: str, request: Request) -> Response:
    started = time.perf_counter()
    ctx = ctx_of(request)
    service = service_label(service_id)
    request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
    caller = VerifiedCaller.unauthenticated()
    accepted_unsigned = False  # development mode let an unsigned call through (said on its log line)
    data_path = "none"
    status = 200
    n_cards = 0
    data_gaps: list[str] = []  # value-free reasons: a key not provided, not fetched, or cut after its first page
    try:
        if service == UNKNOWN_SERVICE:
            raise NotFound("unknown CDS service")
        caller = authenticate(request, "service")
        accepted_unsigned = not caller.authenticated
        raw = await read_body(request, ctx.settings.max_hook_request_bytes)
        # Parsing, evaluation and the freeing of the parsed body happen within one turn (see service.usecases.turns).
        async with ctx.turns.turn() as turn:
            body = _parse_json(raw)
            answer = await ctx.hooks.answer(service_id, body, datetime.now(UTC), turn)
            data_path = answer.data_path
            data_gaps = answer.notes
            n_cards = len(answer.cards)
            for card in answer.cards:
                CARDS.labels(service, card["source"]["topic"]["code"]).inc()
            if answer.cards:
                ctx.issued_cards.add(service_id, answer.patient_ref, answer.cards)
            response = json_response(answer.response)
            del body, answer
        return response
    except ServiceError as exc:
        status = exc.status_code
        if status == 412:
            HOOK_412.labels(service).inc()
        raise
    except Exception:
        status = 500  # answered "internal error" by the one handler of unexpected errors
        raise
    finally:
        elapsed = time.perf_counter() - started
        if status == 200:
            HOOK_LATENCY.labels(service, data_path).observe(elapsed)
        elif status >= 400:
            HOOK_ERRORS.labels(service, str(status)).inc()
        log.info(
            "cds_hook",
            request_id=request_id,
            service=service,
            status=status,
            data_path=data_path,
            cards=n_cards,
            ms=round(elapsed * 1000, 2),
            authenticated=caller.authenticated,
            issuer=caller.iss,
            **({"data_gaps": data_gaps} if data_gaps else {}),
            **({"dev_mode": "UNAUTHENTICATED CALL ACCEPTED (development mode)"} if accepted_unsigned else {}),
        )


#: An RFC 3339 date-time (the CDS Hooks schema's ``format: date-time``), its offset optional (read as UTC when absent).
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})?", re.ASCII)


def _outcome_timestamp(value: str) -> datetime:
    """``outcomeTimestamp`` as an aware datetime; a date alone, or any other ISO 8601 form, is a 400."""
    text = value.upper()
    try:
        if _DATE_TIME.fullmatch(text) is None:
            raise ValueError
        ts = datetime.fromisoformat(text)
        # In UTC here, as it is stored: "0001-01-01T00:00:00+01:00" and "9999-12-31T23:59:59-23:59" have no UTC form.
        return ts.astimezone(UTC) if ts.tzinfo else ts.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise BadRequest("invalid feedback: outcomeTimestamp is not a date-time") from None


@router.post(
    "/cds-services/{service_id}/feedback",
    tags=["CDS Hooks"],
    summary="Feedback on cards",
    responses={200: {"description": "Recorded (idempotent)"}, **ERRORS},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FeedbackRequest"}}}}},
)
async def feedback(service_id: str, request: Request) -> Response:
    ctx = ctx_of(request)
    service = service_label(service_id)
    if service == UNKNOWN_SERVICE:
        raise NotFound("unknown CDS service")
    authenticate(request, "feedback")
    raw = _parse_json(await read_body(request, 1_000_000))
    try:
        parsed = FeedbackRequest.model_validate(raw)
    except ValidationError as exc:
        # Member names from the body are echoed only when they are the model's own (never an unknown key).
        fields = sorted({".".join(_loc_part(p) for p in e["loc"]) for e in exc.errors()})[:5]
        raise BadRequest(f"invalid feedback: {', '.join(fields)}") from None
    items = []
    for item in parsed.feedback:
        if item.outcome == "accepted" and not item.acceptedSuggestions:
            raise BadRequest("invalid feedback: acceptedSuggestions is required for an accepted outcome")
        items.append((item, _outcome_timestamp(item.outcomeTimestamp)))
    created = 0
    with session_scope(ctx.sessions) as session:
        repo = CardFeedbackRepository(session)
        for item, ts in items:
            created += repo.record_feedback(
                service_id=service_id,
                card_uuid=item.card,
                outcome=item.outcome,
                outcome_timestamp=ts,
                override_reason=item.overrideReason.model_dump(exclude_none=True) if item.overrideReason else None,
                accepted_suggestions=[s.model_dump() for s in item.acceptedSuggestions] if item.acceptedSuggestions else None,
                user_comment=item.overrideReason.userComment if item.overrideReason else None,
            )
    for item, _ in items:
        FEEDBACK.labels(service, item.outcome).inc()
    log.info("cds_feedback", service=service, items=len(items), new=created)
    return Response(status_code=200)


@router.get(
    "/cds-services/{service_id}/feedback",
    tags=["Audit"],
    summary="Read card feedback back (audit; admin token)",
    responses={401: {"model": OperationOutcome}},
)
def feedback_audit(
    service_id: str,
    request: Request,
    card: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    require_admin(request)
    ctx = ctx_of(request)
    with session_scope(ctx.sessions) as session:
        rows = CardFeedbackRepository(session).list_feedback_with_cards(service_id=service_id, card_uuid=card, limit=limit)
        data = [
            {
                "service": r.service_id,
                "card": r.card_uuid,
                "outcome": r.outcome,
                "outcomeTimestamp": r.outcome_timestamp.isoformat(),
                "overrideReason": r.override_reason,
                "acceptedSuggestions": r.accepted_suggestions,
                "receivedAt": r.received_at.isoformat(),
                # What the card was about, from the issued-card audit; null when this service has no record of it.
                "issued": None
                if issued is None
                else {"patient": issued.patient_ref, "topic": issued.topic, "rule": issued.rule_id, "issuedAt": issued.issued_at.isoformat()},
            }
            for r, issued in rows
        ]
    return json_response({"feedback": data})


__all__ = ["CdsRequest", "router"]
