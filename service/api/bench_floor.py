"""POST /bench/floor: the latency floor for bench/cds_hooks.py. Mounted only when CDS_BENCH_FLOOR_ROUTE=1.

It reads the whole request body as a hook call does and answers one fixed card, so the benchmark can
subtract what the framework, the server and the network cost from what the CDS service costs.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

router = APIRouter(include_in_schema=False)

_CARD = orjson.dumps(
    {
        "cards": [
            {
                "uuid": "00000000-0000-4000-8000-000000000000",
                "summary": "Benchmark floor: a fixed card",
                "indicator": "info",
                "source": {"label": "calcinosis-cds benchmark"},
            }
        ]
    }
)


@router.post("/bench/floor")
async def floor(request: Request) -> Response:
    body = await request.body()
    return Response(_CARD if body else b'{"cards":[]}', media_type="application/json")
