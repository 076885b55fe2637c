"""GET /patients/{id}/assessment: the latest stored Assessment (CONTRACT "HTTP"); admin token required."""

from __future__ import annotations

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from service.api.cds_hooks import ctx_of, json_response, require_admin
from service.api.models import OperationOutcome
from service.db.repositories import EvaluationRepository
from service.db.session import session_scope
from service.errors import NotFound

router = APIRouter(tags=["Monitoring"])


@router.get(
    "/patients/{patient_id}/assessment",
    summary="Latest stored assessment of a patient",
    responses={401: {"model": OperationOutcome}, 404: {"model": OperationOutcome}},
)
def latest_assessment(request: Request, patient_id: str = Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9\-.]{1,64}$")) -> Response:
    require_admin(request)
    with session_scope(ctx_of(request).sessions) as session:
        row = EvaluationRepository(session).latest_for(f"Patient/{patient_id}")
        if row is None:
            raise NotFound("no stored assessment for this patient")
        return json_response(row.assessment)
