"""`/v2`: the Open Inference Protocol over HTTP (KServe predict API v2, Triton's HTTP API).

A thin translator: each route parses its wire format (`service.oip.codec`), calls the protocol's
model mapping (`service.oip.model`) on the data plane, and writes the answer; errors go through
the protocol's status table (`service.oip.status`).
Errors use the protocol's shape, `{"error": "<message>"}` (plus the stable `code` every error of
this service carries), with 400 for any bad request (the protocol's status; `/v1` says 415/422),
413 for a limit (images per request, pixels, body size, compressed or not), 415 for a
`Content-Encoding` other than gzip / deflate,
404 for an unknown model, 503 + Retry-After for overload, 504 for a missed deadline.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from ..errors import LIBRARY_ERRORS, DomainError
from ..oip import codec
from ..oip import model as oip
from . import body as http_body
from . import parse
from .deps import AdminDep, AnyPlaneDep, PlaneDep
from .errors import v2_error, v2_response
from .schemas import error_responses
from .v2_schemas import (
    InferRequestBody,
    InferResponseBody,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    ModelStatisticsResponse,
    ProtocolError,
    RepositoryIndexRequest,
    RepositoryModel,
    ServerLive,
    ServerMetadata,
    ServerReady,
)


class ProtocolRoute(APIRoute):
    """A route whose errors (its dependencies' too) come out in the protocol's shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except (DomainError, *LIBRARY_ERRORS, RequestValidationError) as e:
                return v2_response(v2_error(e), request.app.state.dataplane.public)

        return route


ERRORS = {400: {"model": ProtocolError}, 404: {"model": ProtocolError}, 503: {"model": ProtocolError}, **error_responses(409, model=ProtocolError)}
ADMIN_ERRORS = error_responses(401, 403, 413, model=ProtocolError)  # the repository extension: admin token, an optional JSON body
router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=ProtocolRoute, responses=ERRORS)
ModelPath = Annotated[str, Path(description="the adapter's name (`base` = the frozen backbone)", max_length=130)]
VersionPath = Annotated[str, Path(description="the bundle version", max_length=64)]


# ------------------------------------------------------------------------ server
@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    """Server name, version and the protocol extensions it speaks."""
    return ServerMetadata(**oip.server_metadata())


@router.get("/health/live", response_model=ServerLive)
async def server_live() -> ServerLive:
    """Liveness: 200 while the process and its event loop live."""
    return ServerLive(live=True)


@router.get("/health/ready", response_model=ServerReady)
async def server_ready(dp: AnyPlaneDep):
    """Readiness: 200 once the default adapters are loaded and warmed, else 503."""
    return JSONResponse({"ready": dp.ready}, status_code=200 if dp.ready else 503)


# ------------------------------------------------------------------------ models
async def _model_ready(dp, name: str, version: str):
    ready = oip.model_ready(dp, name, version)
    if not ready:  # the protocol answers "not ready" with a 4xx
        return JSONResponse({"error": f"model {oip.model_ref(name, version)} is not loaded", "code": "not_loaded"}, status_code=400)
    return ModelReady(name=name, ready=True)


@router.get("/models/{model_name}/ready", response_model=ModelReady)
async def model_ready(model_name: ModelPath, dp: AnyPlaneDep):
    """200 when the adapter's latest loaded version (or `base`) is on the device, 400 when not, 404 if unknown."""
    return await _model_ready(dp, model_name, "")


@router.get("/models/{model_name}/versions/{model_version}/ready", response_model=ModelReady)
async def model_version_ready(model_name: ModelPath, model_version: VersionPath, dp: AnyPlaneDep):
    """200 when this bundle version is on the device, 400 when not, 404 if unknown."""
    return await _model_ready(dp, model_name, model_version)


# ------------------------------------------------------------------------ statistics extension
# Declared before `/models/{model_name}`, which would otherwise take `stats` for a model's name.
@router.get("/models/stats", response_model=ModelStatisticsResponse)
async def models_statistics(dp: AnyPlaneDep) -> ModelStatisticsResponse:
    """Inference statistics of every model version that has answered or is loaded (`base` included)."""
    return ModelStatisticsResponse(**oip.model_statistics(dp))


@router.get("/models/{model_name}/stats", response_model=ModelStatisticsResponse)
async def model_statistics(model_name: ModelPath, dp: AnyPlaneDep) -> ModelStatisticsResponse:
    """Inference statistics of the version the model resolves to (the latest): counts and cumulative ns."""
    return ModelStatisticsResponse(**oip.model_statistics(dp, model_name))


@router.get("/models/{model_name}/versions/{model_version}/stats", response_model=ModelStatisticsResponse)
async def model_version_statistics(model_name: ModelPath, model_version: VersionPath, dp: AnyPlaneDep) -> ModelStatisticsResponse:
    """Inference statistics of one bundle version."""
    return ModelStatisticsResponse(**oip.model_statistics(dp, model_name, model_version))


# ------------------------------------------------------------------------ model metadata and configuration
@router.get("/models/{model_name}", response_model=ModelMetadata)
async def model_metadata(model_name: ModelPath, dp: AnyPlaneDep) -> ModelMetadata:
    """Versions, inputs and outputs of an adapter (`base` included)."""
    return ModelMetadata(**await oip.model_metadata(dp, model_name))


@router.get("/models/{model_name}/versions/{model_version}", response_model=ModelMetadata)
async def model_version_metadata(model_name: ModelPath, model_version: VersionPath, dp: AnyPlaneDep) -> ModelMetadata:
    """Inputs and outputs of one bundle version."""
    return ModelMetadata(**await oip.model_metadata(dp, model_name, model_version))


@router.get("/models/{model_name}/config", response_model=ModelConfig, response_model_exclude_none=True)
async def model_config(model_name: ModelPath, dp: AnyPlaneDep) -> ModelConfig:
    """Triton's model configuration (model-configuration extension): batching, inputs and outputs."""
    return ModelConfig(**oip.model_config(dp, await oip.model_metadata(dp, model_name)))


@router.get("/models/{model_name}/versions/{model_version}/config", response_model=ModelConfig, response_model_exclude_none=True)
async def model_version_config(model_name: ModelPath, model_version: VersionPath, dp: AnyPlaneDep) -> ModelConfig:
    """The model configuration of one bundle version."""
    return ModelConfig(**oip.model_config(dp, await oip.model_metadata(dp, model_name, model_version)))


# ------------------------------------------------------------------------ infer
INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": InferRequestBody.model_json_schema()},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": f"JSON header then binary tensors; its length in {codec.HEADER_LENGTH}"}},
        },
    }
}
INFER_RESPONSES = {
    200: {"model": InferResponseBody, "description": f"JSON, followed by binary outputs when {codec.HEADER_LENGTH} is set"},
    **error_responses(413, 415, 504, model=ProtocolError),  # body (or decompressed body) over the limit, an unknown Content-Encoding, the deadline
}


async def _infer(request: Request, dp, model_name: str, model_version: str) -> Response:
    request.state.adapter = model_name
    body = await request.body()  # the middleware holds the compressed size to the limit ...
    encoding = request.headers.get("content-encoding")
    if encoding:  # ... and `decompress` the decompressed size; off the event loop, it is CPU work
        try:
            body = await asyncio.to_thread(http_body.decompress, body, encoding, dp.settings.max_body_bytes)
        except DomainError as e:
            if e.code == "body_too_large":
                request.app.state.service.metrics.rejected.labels("body_too_large").inc()
            raise
    req = codec.parse_rest(model_name, model_version, body, request.headers.get(codec.HEADER_LENGTH))
    resp = await oip.infer(dp, req, parse.deadline(request, dp))
    out, header = codec.encode_rest(resp, req)
    if header is None:
        return Response(out, media_type="application/json")
    return Response(out, media_type="application/octet-stream", headers={codec.HEADER_LENGTH: str(header)})


@router.post("/models/{model_name}/infer", response_model=None, openapi_extra=INFER_DOC, responses=INFER_RESPONSES)
async def infer(model_name: ModelPath, request: Request, dp: PlaneDep) -> Response:
    """Run images through the adapter's latest version: `probabilities`, `embedding`, `label` (and `unknown`)."""
    return await _infer(request, dp, model_name, "")


@router.post("/models/{model_name}/versions/{model_version}/infer", response_model=None, openapi_extra=INFER_DOC, responses=INFER_RESPONSES)
async def infer_version(model_name: ModelPath, model_version: VersionPath, request: Request, dp: PlaneDep) -> Response:
    """Run images through one bundle version."""
    return await _infer(request, dp, model_name, model_version)


# ------------------------------------------------------------------------ model-repository extension
async def _json_object(request: Request) -> dict:
    """The optional JSON body of a repository request (tritonclient sends none for the index)."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except ValueError:
        raise codec.bad("invalid_json", "the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise codec.bad("invalid_request", "the body must be a JSON object")
    return doc


@router.post("/repository/index", response_model=list[RepositoryModel], responses=error_responses(413, model=ProtocolError), openapi_extra={"requestBody": {"content": {"application/json": {"schema": RepositoryIndexRequest.model_json_schema()}}}})
async def repository_index(request: Request, dp: PlaneDep) -> list[RepositoryModel]:
    """Every adapter version in the store (and `base`) with its state; open, as `GET /v1/adapters` (the same facts) and Triton's index are."""
    doc = await _json_object(request)
    return [RepositoryModel(**r) for r in oip.repository_index(dp, bool(doc.get("ready", False)))]


@router.post("/repository/models/{model_name}/load", response_model=None, dependencies=[AdminDep], responses=ADMIN_ERRORS)
async def repository_load(model_name: ModelPath, request: Request, dp: PlaneDep) -> Response:
    """Load an adapter (latest version, or `name@version`) onto the device; admin token."""
    request.state.adapter = model_name
    await oip.load(dp, model_name, (await _json_object(request)).get("parameters") or {})
    return Response(status_code=200)


@router.post("/repository/models/{model_name}/unload", response_model=None, dependencies=[AdminDep], responses=ADMIN_ERRORS)
async def repository_unload(model_name: ModelPath, request: Request, dp: PlaneDep) -> Response:
    """Unload an adapter (every loaded version, or `name@version`); requests in flight finish; admin token."""
    request.state.adapter = model_name
    await _json_object(request)
    oip.unload(dp, model_name)
    return Response(status_code=200)
