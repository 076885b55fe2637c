"""The FastAPI application: create_app(settings) wires routers, CORS and the single error handler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api import cds_hooks, health, notifications, patients
from service.api.handlers import install_handlers
from service.api.models import CdsRequest, FeedbackRequest
from service.api.paths import CollapseSlashes
from service.api.state import build_context
from service.cds.thresholds import Thresholds
from service.cds.validate import warm_up
from service.config import Settings, get_settings
from service.logging import configure_logging, get_logger
from service.runtime import settle_gc
from service.terminology.catalog import Catalog


def create_app(settings: Settings | None = None, *, catalog: Catalog | None = None, thresholds: Thresholds | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    ctx = build_context(settings, catalog=catalog, thresholds=thresholds)  # refuses to start on a bad mapping file

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log = get_logger()
        log.info("startup", mappings_version=ctx.catalog.version, rules_version=ctx.thresholds.rules_version(), dev_mode=settings.dev_mode)
        if settings.dev_mode:
            log.warning("development_mode", detail="unsigned CDS Hooks calls are accepted; never use in production")
        warm_up()  # the FHIR models' first validation, before the first request
        settle_gc(settings.gc_gen0_threshold)  # start-up objects live for the process; collect less often
        yield
        await ctx.hooks.fetcher.aclose()
        ctx.issued_cards.close()
        close = getattr(ctx.monitor.queue, "close", None)
        if close is not None:
            close()
        ctx.verifier.close()
        ctx.engine.dispose()

    app = FastAPI(
        title="calcinosis-cds",
        version="0.1.0",
        description="CDS Hooks 2.0 services flagging calciphylaxis and metastatic calcification risk, and the FHIR subscription receiver.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PUT", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        max_age=600,
        # Chrome's Private Network Access preflight (a public page such as the CDS Hooks Sandbox calling a service on
        # localhost or a private address): answered yes when the origins are named, or for a development or Sandbox
        # set-up (both refused in production); never for every origin of a production service on a private network
        allow_private_network=settings.cors_origins != ["*"] or settings.dev_mode or settings.trust_sandbox,
    )
    app.add_middleware(CollapseSlashes)  # before routing: "…/cds-services/" registered with its slash still routes
    install_handlers(app)
    app.include_router(cds_hooks.router)
    app.include_router(notifications.router)
    app.include_router(patients.router)
    app.include_router(health.router)
    if settings.bench_floor_route:  # bench/cds_hooks.py only; never on by default
        from service.api import bench_floor

        app.include_router(bench_floor.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (CdsRequest, FeedbackRequest):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            _document_served_media_types(schema)
            _document_security(schema, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


_OUTCOME_REF = "#/components/schemas/OperationOutcome"


def _document_security(schema: dict[str, Any], settings: Settings) -> None:
    """Say in the document how each route is authenticated, as these settings enforce it (Swagger UI's Authorize)."""
    schemes: dict[str, dict[str, Any]] = {
        "ehrJwt": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "The EHR's signed JWT (CDS Hooks 2.0 trust): ES384 or RS384 from a trusted issuer, `aud` the exact URL called.",
        },
        "adminToken": {"type": "http", "scheme": "bearer", "description": "`CDS_ADMIN_TOKEN` (audit and assessment reads)."},
        "subscriptionSecret": {
            "type": "apiKey",
            "in": "header",
            "name": settings.subscription_header,
            "description": "`CDS_SUBSCRIPTION_SECRET`, as `Bearer <secret>` or the secret alone, in the subscription's channel header.",
        },
        "medplumSignature": {
            "type": "apiKey",
            "in": "header",
            "name": "X-Signature",
            "description": "HMAC-SHA256 of the body with `CDS_MEDPLUM_HMAC_SECRET` (Medplum subscriptions).",
        },
    }
    hook: list[dict[str, list[str]]] = [{"ehrJwt": []}]
    if settings.dev_mode:
        hook.append({})  # development mode also accepts a call without a token (a token present is still verified)
    # Development mode without an admin token leaves the audit reads open (a configured token is always required).
    admin: list[dict[str, list[str]]] = [{}] if settings.dev_mode and settings.admin_token is None else [{"adminToken": []}]
    receiver: list[dict[str, list[str]]] = []
    if settings.subscription_secret is not None:
        receiver.append({"subscriptionSecret": []})
    if settings.medplum_hmac_secret is not None:
        receiver.append({"medplumSignature": []})
    if not receiver:  # neither configured: development mode accepts anything, otherwise every call is refused
        receiver.append({} if settings.dev_mode else {"subscriptionSecret": []})
    schema.setdefault("components", {})["securitySchemes"] = schemes
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if path.startswith("/fhir/notifications"):
                operation["security"] = receiver
            elif (path == "/cds-services/{service_id}/feedback" and method == "get") or path.startswith("/patients/"):
                operation["security"] = admin
            elif path.startswith("/cds-services/"):
                operation["security"] = hook
            else:  # discovery, health, readiness, metrics (and the bench route): no credentials
                operation["security"] = []


def _document_served_media_types(schema: dict[str, Any]) -> None:
    """Make the document say what is served: errors are ``application/fhir+json`` OperationOutcomes, request
    validation fails with 400 (never FastAPI's 422), and ``/metrics`` is Prometheus text."""
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", {"description": "Invalid request", "content": {"application/json": {"schema": {"$ref": _OUTCOME_REF}}}})
            for response in responses.values():
                content = response.get("content", {})
                if content.get("application/json", {}).get("schema", {}).get("$ref") == _OUTCOME_REF:
                    content["application/fhir+json"] = content.pop("application/json")
            if path == "/metrics" and "200" in responses:
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
