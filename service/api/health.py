"""Liveness, readiness and metrics."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.metrics import INBOUND_EVENTS, SUBSCRIPTIONS, exposition

router = APIRouter(tags=["Operations"])


@router.get("/healthz", summary="Liveness: the process is up")
def healthz() -> Response:
    return Response(orjson.dumps({"status": "ok"}), media_type="application/json")


@router.get("/readyz", summary="Readiness: database, broker and mappings")
async def readyz(request: Request) -> Response:
    result = await run_in_threadpool(request.app.state.ctx.readiness)
    return Response(orjson.dumps(result), status_code=200 if result["status"] == "ready" else 503, media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    ctx = request.app.state.ctx
    counts = await run_in_threadpool(ctx.event_counts)
    if counts is not None:  # the database is down: the gauges keep their last values (readiness says why)
        for status, n in counts.items():
            INBOUND_EVENTS.labels(status).set(n)
    subscriptions = await run_in_threadpool(ctx.subscription_counts)
    if subscriptions is not None:
        for status, n in subscriptions.items():
            SUBSCRIPTIONS.labels(status).set(n)
    return Response(await run_in_threadpool(exposition, ctx.settings.metrics_dir), media_type=CONTENT_TYPE_LATEST)
