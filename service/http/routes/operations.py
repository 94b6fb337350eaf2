"""Operations: liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...metrics import CONTENT_TYPE
from ..deps import AnyPlaneDep
from ..schemas import Health, Ready, error_responses

router = APIRouter(tags=["operations"], responses=error_responses(400))


# Load balancers and uptime checkers probe with HEAD: each probe also answers HEAD, with GET's
# status and headers (uvicorn sends no body for HEAD). Separate routes, so each operation keeps
# its own operationId in the OpenAPI document.
def _head(descriptions: dict[int, str]) -> dict:
    """OpenAPI `responses` of a HEAD route: these statuses, none with a body."""
    return {status: {"description": d, "content": None} for status, d in descriptions.items()}


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: answers while the process and its event loop live."""
    return Health(status="ok")


@router.head("/healthz", response_class=Response, responses=_head({200: "alive: GET's status and headers, no body", 400: "malformed request framing"}))
async def healthz_head() -> Response:
    """Liveness for HEAD probes: GET /healthz without the body."""
    return JSONResponse(Health(status="ok").model_dump())


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready, "description": "still loading or warming (the same body, status not ready)"}})
async def readyz(dp: AnyPlaneDep):
    """Readiness: 200 once the default adapters are loaded and one batch has run through them."""
    return JSONResponse(Ready(**dp.readiness()).model_dump(), status_code=200 if dp.ready else 503)


@router.head("/readyz", response_class=Response, responses=_head({200: "ready: GET's status and headers, no body", 400: "malformed request framing", 503: "still loading or warming"}))
async def readyz_head(dp: AnyPlaneDep) -> Response:
    """Readiness for HEAD probes: GET /readyz's status without the body."""
    return await readyz(dp)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics (DESIGN.md §6)."""
    return Response(request.app.state.service.metrics.render(), media_type=CONTENT_TYPE)
