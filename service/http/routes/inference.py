"""`/v1/predict`, `/v1/embed`, `/v1/knn`: images (or query vectors) × adapters -> answers."""

from __future__ import annotations

import logging
import time

import numpy as np
from fastapi import APIRouter, Request

from metalora.runtime import BASE

from ..deps import ReadyDep
from ...errors import ServiceError
from ...inputs import Watch, openapi_body, parse_images_body, request_timeout
from ...knn import vote
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

log = logging.getLogger("metalora.service")
router = APIRouter(prefix="/v1", tags=["inference"], responses=error_responses(400, 404, 409, 413, 415, 422, 503, 504))


def seed_by_layer(entry, seed) -> dict[str, list[float]] | None:
    """The concatenated seed (S,) -> {layer: its part} in the adapter's target order; None without one."""
    if seed is None or not entry.seed_dims:
        return None
    parts = seed.split(list(entry.seed_dims.values()))
    return {layer: p.tolist() for layer, p in zip(entry.seed_dims, parts)}


@router.post("/predict", response_model=PredictResponse, openapi_extra=openapi_body(PredictRequest))
async def predict(request: Request, svc: ReadyDep) -> PredictResponse:
    """Class scores for each image × adapter (`base` = the backbone's ImageNet head)."""
    req, raws = await parse_images_body(request, PredictRequest, svc.settings, svc.registry)
    watch = Watch(request, request_timeout(request, svc.settings))
    if req.top_k > svc.settings.max_top_k:
        raise ServiceError(422, "invalid_top_k", f"top_k is at most {svc.settings.max_top_k}")
    entries, results = await svc.compute(await svc.decode(raws, watch), req.adapters, watch)
    unknown = await _unknown(svc, entries, results)
    out = []
    for j, res in enumerate(results):
        e = entries[j % len(entries)]
        probs = (res.logits / e.temperature).softmax(-1)  # the bundle's calibrated temperature (1: none)
        scores, idx = probs.topk(min(req.top_k, probs.numel()))
        labels = svc.labels(e)
        preds = [Prediction(label=labels[i], index=i, score=s) for s, i in zip(scores.tolist(), idx.tolist())]
        extra = {"seed": seed_by_layer(e, res.seed)} if req.include_seed else {}
        if j in unknown:
            extra["unknown"] = unknown[j]
        out.append(PredictResult(adapter=e.name, version=e.version, predictions=preds, **extra))
    return PredictResponse(results=out)


async def _unknown(svc, entries, results) -> dict[int, bool]:
    """Result index -> "unknown" for calibrated adapters: the same test as /v1/knn (the nearest item of
    the current gallery against the threshold), one search per adapter, off the event loop. Left out
    when the gallery is empty or its store is down (the scores stand; a 503 would lose them)."""
    rows: dict[str, list[int]] = {}
    for j in range(len(results)):
        e = entries[j % len(entries)]
        if e.knn_threshold is not None and e.key != BASE:
            rows.setdefault(e.key, []).append(j)
    out: dict[int, bool] = {}
    for key, js in rows.items():
        try:
            index = await svc.gallery_index(key)
        except ServiceError as err:
            if err.status != 503:
                raise
            log.warning("predict for %s without \"unknown\": %s", key, err.message)
            continue
        if len(index):
            q = np.stack([results[j].embedding.numpy() for j in js])  # (Q, D)
            for j, hits in zip(js, await svc.knn_search(index, q, 1)):
                out[j] = index.is_unknown(hits)
    return out


@router.post("/embed", response_model=EmbedResponse, openapi_extra=openapi_body(EmbedRequest))
async def embed(request: Request, svc: ReadyDep) -> EmbedResponse:
    """L2-normalised embeddings of each image × adapter."""
    req, raws = await parse_images_body(request, EmbedRequest, svc.settings, svc.registry)
    watch = Watch(request, request_timeout(request, svc.settings))
    entries, results = await svc.compute(await svc.decode(raws, watch), req.adapters, watch)
    out = []
    for j, res in enumerate(results):
        e = entries[j % len(entries)]
        extra = {"seed": seed_by_layer(e, res.seed)} if req.include_seed else {}
        out.append(EmbedResult(adapter=e.name, version=e.version, embedding=res.embedding.tolist(), dim=res.embedding.numel(), **extra))
    return EmbedResponse(results=out)


@router.post("/knn", response_model=KnnResponse, openapi_extra=openapi_body(KnnRequest))
async def knn(request: Request, svc: ReadyDep) -> KnnResponse:
    """Nearest gallery items (cosine) and their majority vote, for images or query vectors."""
    req, raws = await parse_images_body(request, KnnRequest, svc.settings, svc.registry)
    watch = Watch(request, request_timeout(request, svc.settings))
    if req.k > svc.settings.max_k:
        raise ServiceError(422, "invalid_k", f"k is at most {svc.settings.max_k}")
    if BASE in req.adapters:
        raise ServiceError(422, "no_gallery", "'base' has no gallery; k-NN needs an adapter")
    if req.vectors is not None:
        key = svc.registry.resolve(req.adapters[0])
        q = np.asarray(req.vectors, dtype=np.float32) if len({len(v) for v in req.vectors}) == 1 else None
        index = await svc.gallery_index(key)
        if q is None or q.shape[1] != index.dim:
            raise ServiceError(422, "dim_mismatch", f"vectors must all have {index.dim} numbers (the embedding dim of {key})")
        if not np.isfinite(q).all() or (np.abs(q).sum(1) == 0).any():
            raise ServiceError(422, "invalid_vector", "vectors must be finite and non-zero")
        pairs = [(key, q)]
    else:
        entries, results = await svc.compute(await svc.decode(raws, watch), req.adapters, watch)
        pairs = [(entries[j % len(entries)].key, res.embedding.numpy()[None]) for j, res in enumerate(results)]
    out = []
    t0 = time.perf_counter()
    for key, q in pairs:
        index = await svc.gallery_index(key)
        name, _, version = key.partition("@")
        for hits in await svc.knn_search(index, q, req.k):
            label, votes = vote(hits)
            out.append(KnnResult(adapter=name, version=version, neighbors=[Neighbor(id=h.id, label=h.label, score=h.score) for h in hits],
                                 label=label, votes=votes, unknown=index.is_unknown(hits)))
    svc.metrics.inference.labels("knn").observe(time.perf_counter() - t0)
    return KnnResponse(results=out)
