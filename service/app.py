"""The FastAPI app: routes per resource over one `Service` (runtime, registry, batcher, engine, k-NN).

`create_app(settings)` builds it; `serve(settings)` runs it under uvicorn (`metalora serve`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from metalora.bundle import BundleError, read_manifest
from metalora.images import ImageError, decode_image
from metalora.runtime import BASE, Runtime, pick_device

from . import errors
from .adapters import AdapterRegistry, Entry
from .batcher import Batcher, WorkItem
from .engine import Engine, ItemResult, make_backend
from .errors import ServiceError
from .knn import GalleryStore, vote
from .metrics import CONTENT_TYPE, FANOUT, Metrics
from .schemas import (
    AdapterInfo,
    AdapterList,
    AdapterSummary,
    AdapterVersion,
    EmbedRequest,
    EmbedResponse,
    EmbedResult,
    GalleryInfo,
    GalleryItemRequest,
    GalleryItemResponse,
    Health,
    ImagesRequest,
    ItemId,
    KnnRequest,
    KnnResponse,
    KnnResult,
    LoadResponse,
    Neighbor,
    PredictRequest,
    PredictResponse,
    PredictResult,
    Prediction,
    Ready,
    UnloadResponse,
)
from .settings import Settings

log = logging.getLogger("metalora.service")
TIMEOUT_HEADER = "x-timeout-ms"


class Service:
    """Everything one server process holds; built at start-up, shared by all routes."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.ready = False
        self.failed: dict[str, str] = {}
        self.metrics = Metrics(settings.metrics_max_adapters)

    async def start(self) -> None:
        s = self.settings
        device = pick_device(s.device)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.runtime = await asyncio.to_thread(Runtime, s.store, device)
        self.device = str(device)
        self.backend_name = s.backend
        if s.backend == "auto":
            from metalora.onnx_backend import resolve_backend

            self.backend_name = resolve_backend("auto", device)
        backend = make_backend(self.backend_name, self.runtime, s)
        self.engine = Engine(backend, self.metrics, self.device)
        self.galleries = GalleryStore(self.runtime.store, s.galleries, self.runtime.backbone.embed_dim, s.knn_exact_max)
        self.registry = AdapterRegistry(self.runtime, self.metrics, s.lru_capacity, on_evict=self.galleries.drop)
        self.batcher = Batcher(
            self.engine.run, self.metrics, max_batch_size=s.max_batch_size, max_delay_s=s.max_delay_ms / 1000, max_queue=s.max_queue, retry_after_s=s.retry_after_s
        )
        self.decode_pool = ThreadPoolExecutor(s.decode_workers, thread_name_prefix="decode")
        self.edit_locks: dict[str, asyncio.Lock] = {}
        self.batcher.start()
        self.registry._gauge()

    async def warm(self) -> None:
        """Load the default adapters (skipping refused bundles), run one batch through them, turn ready."""
        s = self.settings
        names = list(dict.fromkeys([*s.pinned, *(s.adapters or self.runtime.store.adapter_names()[: s.lru_capacity])]))
        for ref in names:
            try:
                await self.registry.load(ref, pin=ref in s.pinned)
            except ServiceError as e:
                self.failed[ref] = f"{e.code}: {e.message}"
                log.warning("default adapter %s not loaded: %s", ref, e.message)
        if s.warmup:
            size = self.runtime.preprocess_cfg.input_size
            keys = [BASE, *self.registry.loaded()]
            entries = [await self.registry.acquire(k, 1) for k in keys]
            items = [WorkItem(torch.zeros(3, size, size), e.key, time.monotonic() + 600, partial(self.registry.release, e)) for e in entries]
            t0 = time.perf_counter()
            await asyncio.gather(*self.batcher.submit(items))
            log.info("warm-up batch of %d adapters took %.2f s", len(items), time.perf_counter() - t0)
        self.ready = True
        log.info("ready on %s with %s", self.device, ", ".join(self.registry.loaded()) or "base only")

    async def stop(self) -> None:
        await self.batcher.stop()
        self.engine.shutdown()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- images in, results out
    def _decode_one(self, raw: bytes | str, i: int) -> torch.Tensor:
        if isinstance(raw, str):
            if raw.startswith("data:"):
                raw = raw.partition(",")[2]
            try:
                raw = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise ServiceError(422, "invalid_base64", f"images[{i}] is not valid base64") from None
        try:
            return self.runtime.preprocessor(decode_image(raw, self.settings.max_pixels))  # (3, S, S)
        except ImageError as e:
            raise ServiceError.from_image(e, i) from None

    async def decode(self, raws: list[bytes | str]) -> list[torch.Tensor]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        futs = [loop.run_in_executor(self.decode_pool, self._decode_one, r, i) for i, r in enumerate(raws)]
        out = await asyncio.gather(*futs, return_exceptions=True)
        self.metrics.inference.labels("decode").observe(time.perf_counter() - t0)
        for o in out:
            if isinstance(o, BaseException):
                raise o
        return out

    async def compute(self, xs: list[torch.Tensor], refs: list[str], timeout_s: float) -> tuple[list[Entry], list[ItemResult]]:
        """Images × adapters through the batcher; results image-major (image 0 with every adapter, ...)."""
        entries: list[Entry] = []
        try:
            for ref in refs:
                entries.append(await self.registry.acquire(ref, len(xs)))
            n = len(xs) * len(entries)
            if n > self.batcher.max_queue:
                raise ServiceError(413, "too_many_images", f"{len(xs)} images × {len(entries)} adapters = {n} items, more than the queue holds ({self.batcher.max_queue})")
            deadline = time.monotonic() + timeout_s
            items = [WorkItem(x, e.key, deadline, partial(self.registry.release, e)) for x in xs for e in entries]
            futures = self.batcher.submit(items)
        except BaseException:
            for e in entries:
                self.registry.release(e, len(xs))
            raise
        results = await asyncio.gather(*futures, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return entries, results

    def labels(self, entry: Entry) -> list[str]:
        return self.runtime.base_labels if entry.key == BASE else entry.labels

    async def gallery_index(self, key: str):
        try:
            index = await asyncio.to_thread(self.galleries.get, key)
        except BundleError as e:
            raise ServiceError.from_bundle(e) from None
        self.metrics.gallery_items.labels(self.metrics.label(key)).set(len(index))
        return index


# -------------------------------------------------------------------- dependencies
async def get_service(request: Request) -> Service:
    return request.app.state.service


async def get_ready_service(request: Request) -> Service:
    svc: Service = request.app.state.service
    if not svc.ready:
        raise ServiceError(503, "not_ready", "the server is still loading and warming its adapters", {"Retry-After": "2"})
    return svc


async def require_admin(request: Request) -> None:
    """Bearer token check: no token configured -> 403 for everyone; a wrong or missing token -> 401.

    Dependencies are `async def` so FastAPI runs them on the loop, not via a thread hand-off.
    """
    token = request.app.state.service.settings.admin_token
    if token is None:
        raise ServiceError(403, "admin_disabled", "admin routes are disabled: set METALORA_ADMIN_TOKEN to enable them")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise ServiceError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


ServiceDep = Annotated[Service, Depends(get_service)]
ReadyDep = Annotated[Service, Depends(get_ready_service)]
AdminDep = Depends(require_admin)
RefPath = Annotated[str, Path(description="`name` or `name@version`", max_length=130)]


def _timeout(request: Request, svc: Service) -> float:
    """The request's deadline: the server's, or shorter when the client sends X-Timeout-Ms."""
    limit = svc.settings.request_timeout_s
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return limit
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if not math.isfinite(ms) or ms <= 0:
        raise ServiceError(422, "invalid_timeout", f"{TIMEOUT_HEADER} must be a positive number of milliseconds, got {raw!r}")
    return min(limit, ms / 1000)


async def parse_images_body(request: Request, model: type[ImagesRequest], svc: Service) -> tuple[ImagesRequest, list[bytes | str]]:
    """A JSON body (base64 images) or a multipart form (image files + fields) -> (request, raw images)."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    max_images = svc.settings.max_images
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=64)
        except StarletteHTTPException as e:  # the multipart parser's own limits and syntax errors
            raise ServiceError(422, "invalid_multipart", f"multipart body refused: {e.detail}") from None
        files = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
        fields: dict = {}
        for key in {k for k in form.keys() if k != "images"}:
            vals = [v for v in form.getlist(key) if isinstance(v, str)]
            fields[key] = vals if key == "adapter" and len(vals) > 1 else (vals[0] if vals else None)
        fields["images"] = [""] * len(files) if files else None
        raws: list[bytes | str] = [await f.read() for f in files]
        data = fields
    elif ctype in ("application/json", "text/json") or ctype.endswith("+json"):
        data = await request.body()
        raws = []
    else:
        raise ServiceError(415, "unsupported_media_type", f"send application/json or multipart/form-data, not {ctype!r}")
    try:
        req = model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    if isinstance(data, bytes):
        raws = list(req.images or [])
    if len(raws) > max_images:
        raise ServiceError(413, "too_many_images", f"{len(raws)} images in one request; the limit is {max_images}")
    request.state.adapter = req.adapters[0] if len(req.adapters) == 1 else FANOUT
    for ref in req.adapters:  # a wrong name fails fast, before any image is decoded
        svc.registry.resolve(ref)
    return req, raws


def _openapi_body(model: type[BaseModel]) -> dict:
    """OpenAPI request body for routes that take JSON or a multipart form."""
    schema = model.model_json_schema()
    form = {
        "type": "object",
        "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "adapter": {"type": "array", "items": {"type": "string"}},
            **{k: v for k, v in schema["properties"].items() if k in ("top_k", "k")},
        },
        "required": ["images"],
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": form}}}}


# -------------------------------------------------------------------- inference routes
infer = APIRouter(prefix="/v1", tags=["inference"])


@infer.post("/predict", response_model=PredictResponse, openapi_extra=_openapi_body(PredictRequest))
async def predict(request: Request, svc: ReadyDep) -> PredictResponse:
    """Class scores for each image × adapter (`base` = the backbone's ImageNet head)."""
    req, raws = await parse_images_body(request, PredictRequest, svc)
    timeout = _timeout(request, svc)
    if req.top_k > svc.settings.max_top_k:
        raise ServiceError(422, "invalid_top_k", f"top_k is at most {svc.settings.max_top_k}")
    entries, results = await svc.compute(await svc.decode(raws), req.adapters, timeout)
    out = []
    for j, res in enumerate(results):
        e = entries[j % len(entries)]
        probs = res.logits.softmax(-1)
        scores, idx = probs.topk(min(req.top_k, probs.numel()))
        labels = svc.labels(e)
        preds = [Prediction(label=labels[i], index=i, score=s) for s, i in zip(scores.tolist(), idx.tolist())]
        out.append(PredictResult(adapter=e.name, version=e.version, predictions=preds))
    return PredictResponse(results=out)


@infer.post("/embed", response_model=EmbedResponse, openapi_extra=_openapi_body(EmbedRequest))
async def embed(request: Request, svc: ReadyDep) -> EmbedResponse:
    """L2-normalised embeddings of each image × adapter."""
    req, raws = await parse_images_body(request, EmbedRequest, svc)
    timeout = _timeout(request, svc)
    entries, results = await svc.compute(await svc.decode(raws), req.adapters, timeout)
    out = []
    for j, res in enumerate(results):
        e = entries[j % len(entries)]
        out.append(EmbedResult(adapter=e.name, version=e.version, embedding=res.embedding.tolist(), dim=res.embedding.numel()))
    return EmbedResponse(results=out)


@infer.post("/knn", response_model=KnnResponse, openapi_extra=_openapi_body(KnnRequest))
async def knn(request: Request, svc: ReadyDep) -> KnnResponse:
    """Nearest gallery items (cosine) and their majority vote, for images or query vectors."""
    req, raws = await parse_images_body(request, KnnRequest, svc)
    timeout = _timeout(request, svc)
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
        entries, results = await svc.compute(await svc.decode(raws), req.adapters, timeout)
        pairs = [(entries[j % len(entries)].key, res.embedding.numpy()[None]) for j, res in enumerate(results)]
    out = []
    t0 = time.perf_counter()
    for key, q in pairs:
        index = await svc.gallery_index(key)
        name, _, version = key.partition("@")
        for hits in index.search(q, req.k):
            label, votes = vote(hits)
            out.append(KnnResult(adapter=name, version=version, neighbors=[Neighbor(id=h.id, label=h.label, score=h.score) for h in hits], label=label, votes=votes))
    svc.metrics.inference.labels("knn").observe(time.perf_counter() - t0)
    return KnnResponse(results=out)


# -------------------------------------------------------------------- adapter routes
adapters = APIRouter(prefix="/v1/adapters", tags=["adapters"])


@adapters.get("", response_model=AdapterList)
async def list_adapters(svc: ReadyDep) -> AdapterList:
    """What the store holds, and which versions are on the device."""
    store = svc.runtime.store
    loaded = svc.registry.entries
    rows = []
    for name in store.adapter_names():
        versions = store.versions(name)
        mine = [k.split("@", 1)[1] for k in loaded if k.split("@", 1)[0] == name]
        rows.append(AdapterSummary(name=name, versions=versions, latest=versions[-1] if versions else None, loaded=mine, pinned=[v for v in mine if loaded[f"{name}@{v}"].pinned]))
    bb = svc.runtime.backbone
    return AdapterList(backbone={**bb.identity.to_dict(), "embed_dim": bb.embed_dim, "device": svc.device, "backend": svc.backend_name}, capacity=svc.registry.capacity, adapters=rows)


@adapters.get("/{name}", response_model=AdapterInfo)
async def adapter_info(name: RefPath, svc: ReadyDep) -> AdapterInfo:
    """Versions of one adapter: format, ranks, labels, metrics, and whether each is loaded."""
    key = svc.registry.resolve(name)
    if key == BASE:
        raise ServiceError(404, "unknown_adapter", "'base' is the frozen backbone, not a stored adapter; see GET /v1/adapters")
    base_name = key.split("@", 1)[0]
    store = svc.runtime.store
    rows = []
    for v in store.versions(base_name):
        k = f"{base_name}@{v}"
        entry = svc.registry.entries.get(k)
        row = AdapterVersion(version=v, loaded=entry is not None, pinned=bool(entry and entry.pinned))
        try:
            m = read_manifest(store.resolve(k)[2])
            a = m["adapter"]
            row = row.model_copy(
                update=dict(format=a.get("format"), ranks=a.get("ranks"), targets=m.get("resolved_targets"), num_classes=len(a.get("labels", [])), labels=a.get("labels"), trainable_params=m.get("trainable_params"), metrics=m.get("metrics"))
            )
        except BundleError as e:
            row.error = f"{e.code}: {e}"
        if k in svc.registry.failed:
            row.error = svc.registry.failed[k]
        if k in svc.galleries.indexes:
            row.gallery_items = len(svc.galleries.indexes[k])
        rows.append(row)
    return AdapterInfo(name=base_name, latest=rows[-1].version if rows else None, versions=rows)


@adapters.post("/{name}/load", response_model=LoadResponse, dependencies=[AdminDep])
async def load_adapter(name: RefPath, svc: ReadyDep, pin: Annotated[bool, Query(description="never evict it")] = False) -> LoadResponse:
    """Load a version onto the device (latest unless `name@version`); a corrupt bundle answers 409."""
    entry = await svc.registry.load(name, pin=pin)
    return LoadResponse(adapter=entry.name, version=entry.version, loaded=True, pinned=entry.pinned, load_seconds=round(entry.load_seconds, 4))


@adapters.post("/{name}/unload", response_model=UnloadResponse, dependencies=[AdminDep])
async def unload_adapter(name: RefPath, svc: ReadyDep) -> UnloadResponse:
    """Drop a version from the device; requests already accepted still finish with it."""
    entry, deferred = svc.registry.unload(name)
    return UnloadResponse(adapter=entry.name, version=entry.version, unloaded=True, deferred=deferred)


def _gallery_key(svc: Service, name: str) -> str:
    key = svc.registry.resolve(name)
    if key == BASE:
        raise ServiceError(422, "no_gallery", "'base' has no gallery; galleries belong to adapters")
    return key


@adapters.get("/{name}/gallery", response_model=GalleryInfo)
async def gallery_info(name: RefPath, svc: ReadyDep) -> GalleryInfo:
    """Size, index kind and label counts of an adapter version's k-NN gallery."""
    key = _gallery_key(svc, name)
    index = await svc.gallery_index(key)
    counts: dict[str, int] = {}
    for j in index.label_idx.tolist():
        counts[index.labels[j]] = counts.get(index.labels[j], 0) + 1
    n, v = key.split("@", 1)
    return GalleryInfo(adapter=n, version=v, items=len(index), dim=index.dim, index=index.kind if len(index) else "none", source=index.source, labels=counts)


@adapters.put("/{name}/gallery/{item_id}", response_model=GalleryItemResponse, dependencies=[AdminDep])
async def gallery_put(name: RefPath, item_id: Annotated[ItemId, Path()], item: GalleryItemRequest, request: Request, svc: ReadyDep) -> GalleryItemResponse:
    """Add (or replace) one gallery item from an image or a vector; persisted before answering."""
    key = _gallery_key(svc, name)
    request.state.adapter = key
    index = await svc.gallery_index(key)
    label = index.label_index(item.label)
    if item.vector is not None:
        vec = np.asarray(item.vector, dtype=np.float32)
        if vec.shape != (index.dim,) or not np.isfinite(vec).all() or not np.abs(vec).sum():
            raise ServiceError(422, "invalid_vector", f"vector must have {index.dim} finite numbers, not all zero")
    else:
        xs = await svc.decode([item.image])
        _, (res,) = await svc.compute(xs, [key], _timeout(request, svc))
        vec = res.embedding.numpy()
    async with svc.edit_locks.setdefault(key, asyncio.Lock()):  # edits of one gallery in order
        index = await svc.gallery_index(key)
        new, created = index.with_item(item_id, label, vec)
        await asyncio.to_thread(svc.galleries.persist, new)
    svc.metrics.gallery_items.labels(svc.metrics.label(key)).set(len(new))
    n, v = key.split("@", 1)
    return GalleryItemResponse(adapter=n, version=v, id=item_id, label=item.label, items=len(new), created=created)


@adapters.delete("/{name}/gallery/{item_id}", response_model=GalleryItemResponse, dependencies=[AdminDep])
async def gallery_delete(name: RefPath, item_id: Annotated[ItemId, Path()], svc: ReadyDep) -> GalleryItemResponse:
    """Remove one gallery item; persisted before answering."""
    key = _gallery_key(svc, name)
    async with svc.edit_locks.setdefault(key, asyncio.Lock()):
        index = await svc.gallery_index(key)
        new = index.without_item(item_id)
        await asyncio.to_thread(svc.galleries.persist, new)
    svc.metrics.gallery_items.labels(svc.metrics.label(key)).set(len(new))
    n, v = key.split("@", 1)
    return GalleryItemResponse(adapter=n, version=v, id=item_id, label=None, items=len(new), deleted=True)


# -------------------------------------------------------------------- operations
ops = APIRouter(tags=["operations"])


@ops.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: answers while the process and its event loop live."""
    return Health(status="ok")


@ops.get("/readyz", response_model=Ready, responses={503: {"description": "still loading or warming"}})
async def readyz(svc: ServiceDep):
    """Readiness: 200 once the default adapters are loaded and one batch has run through them."""
    reg = getattr(svc, "registry", None)
    body = Ready(status="ready" if svc.ready else ("failed" if "startup" in svc.failed else "loading"), device=getattr(svc, "device", ""), backend=getattr(svc, "backend_name", svc.settings.backend), loaded=reg.loaded() if reg else [], failed=svc.failed)
    return JSONResponse(body.model_dump(), status_code=200 if svc.ready else 503)


@ops.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}})
async def metrics(svc: ServiceDep) -> Response:
    """Prometheus metrics (DESIGN.md §6)."""
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE)


# -------------------------------------------------------------------- middleware
class _BodyTooLarge(Exception):
    pass


class LimitsAndMetrics:
    """ASGI middleware: refuses bodies over the limit (header or streamed) and records request metrics."""

    def __init__(self, app, service: Service):
        self.app, self.svc = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.svc.settings.max_body_bytes
        t0 = time.perf_counter()
        status = {"code": 500, "started": False}
        state = scope.setdefault("state", {})
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            code = "body_too_large" if length.isdigit() else "bad_content_length"
            resp = errors.error_response(413 if length.isdigit() else 400, code, f"request body is over the {limit}-byte limit" if length.isdigit() else "bad Content-Length")
            self.svc.metrics.rejected.labels("body_too_large").inc()
            await resp(scope, receive, send)
            self._observe(scope, state, resp.status_code, t0)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return msg

        async def tracking_send(msg):
            if msg["type"] == "http.response.start":
                status["code"], status["started"] = msg["status"], True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            self.svc.metrics.rejected.labels("body_too_large").inc()
            if not status["started"]:
                status["code"] = 413
                await errors.error_response(413, "body_too_large", f"request body is over the {limit}-byte limit")(scope, receive, send)
        self._observe(scope, state, status["code"], t0)

    def _observe(self, scope, state, code, t0):
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        if endpoint in ("/metrics", "/healthz", "/readyz"):
            return  # probes and scrapes would drown the request counts
        adapter = self.svc.metrics.label(state.get("adapter"))
        self.svc.metrics.requests.labels(endpoint, adapter, str(code)).inc()
        self.svc.metrics.request_duration.labels(endpoint, adapter).observe(time.perf_counter() - t0)


# -------------------------------------------------------------------- app
def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        warm = asyncio.create_task(service.warm())
        warm.add_done_callback(partial(_log_failure, service))
        try:
            yield
        finally:
            warm.cancel()
            await service.stop()

    app = FastAPI(
        title="MetaLoRA Serve",
        version="1",
        summary="One frozen vision backbone, many input-conditioned MetaLoRA adapters, cross-adapter micro-batching.",
        lifespan=lifespan,
    )
    app.state.service = service
    errors.install(app)
    app.include_router(infer)
    app.include_router(adapters)
    app.include_router(ops)
    app.add_middleware(LimitsAndMetrics, service=service)
    return app


def _log_failure(service: Service, task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        service.failed["startup"] = repr(task.exception())
        log.error("start-up failed: %r", task.exception())


def serve(settings: Settings) -> None:
    """Run the app under uvicorn with the settings' host, port and log level."""
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=10)
