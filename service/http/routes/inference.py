"""`/v1/predict`, `/v1/embed`, `/v1/knn`: images (or query vectors) × adapters -> answers.

Each route parses its body (`..parse`), calls the data plane, and writes the pydantic answer.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from .. import parse
from ..deps import PlaneDep
from ..schemas import (
    EmbedRequest,
    EmbedResponse,
    EmbedResult,
    KnnRequest,
    KnnResponse,
    KnnResult,
    Neighbor,
    Prediction,
    PredictRequest,
    PredictResponse,
    PredictResult,
    error_responses,
)

router = APIRouter(prefix="/v1", tags=["inference"], responses=error_responses(400, 404, 409, 413, 415, 422, 503, 504))


@router.post("/predict", response_model=PredictResponse, openapi_extra=parse.openapi_body(PredictRequest))
async def predict(request: Request, dp: PlaneDep) -> PredictResponse:
    """Class scores for each image × adapter (`base` = the backbone's ImageNet head)."""
    req, raws = await parse.images_body(request, PredictRequest, dp.settings.max_images)
    scored = await dp.predict(parse.refs(req.adapters), raws, req.top_k, parse.deadline(request, dp))
    out = []
    for s in scored:
        extra = {"seed": s.seed} if req.include_seed else {}
        if s.unknown is not None:
            extra["unknown"] = s.unknown
        out.append(PredictResult(adapter=s.adapter, version=s.version, predictions=[Prediction(label=p.label, index=p.index, score=p.score) for p in s.top(req.top_k)], **extra))
    return PredictResponse(results=out)


@router.post("/embed", response_model=EmbedResponse, openapi_extra=parse.openapi_body(EmbedRequest))
async def embed(request: Request, dp: PlaneDep) -> EmbedResponse:
    """L2-normalised embeddings of each image × adapter."""
    req, raws = await parse.images_body(request, EmbedRequest, dp.settings.max_images)
    scored = await dp.embed(parse.refs(req.adapters), raws, parse.deadline(request, dp))
    out = []
    for s in scored:
        extra = {"seed": s.seed} if req.include_seed else {}
        out.append(EmbedResult(adapter=s.adapter, version=s.version, embedding=s.embedding.tolist(), dim=s.embedding.numel(), **extra))
    return EmbedResponse(results=out)


@router.post("/knn", response_model=KnnResponse, openapi_extra=parse.openapi_body(KnnRequest))
async def knn(request: Request, dp: PlaneDep) -> KnnResponse:
    """Nearest gallery items (cosine) and their similarity-weighted vote, for images or query vectors."""
    req, raws = await parse.images_body(request, KnnRequest, dp.settings.max_images)
    found = await dp.knn(parse.refs(req.adapters), raws if req.vectors is None else None, req.vectors, req.k, parse.deadline(request, dp))
    return KnnResponse(results=[KnnResult(adapter=n.adapter, version=n.version, neighbors=[Neighbor(id=h.id, label=h.label, score=h.score) for h in n.neighbors],
                                          label=n.label, votes=n.votes, unknown=n.unknown) for n in found])
