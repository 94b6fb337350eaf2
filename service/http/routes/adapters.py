"""`/v1/adapters`: what the store holds, load/unload, and each adapter version's k-NN gallery."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from metalora.refs import AdapterRef

from ...dataplane import NewItem
from .. import parse
from ..deps import AdminDep, PlaneDep, RefPath
from ..schemas import (
    AdapterInfo,
    AdapterList,
    GalleryBatchRequest,
    GalleryBatchResponse,
    GalleryInfo,
    GalleryItemRequest,
    GalleryItemResponse,
    ItemId,
    LoadResponse,
    UnloadResponse,
    error_responses,
)

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=error_responses(400, 404, 409, 422, 503))
# Declared where they can happen: 401/403 behind AdminDep, 413 where a body is read (the
# middleware's limit, images per batch), 415 and 504 where images are decoded within a deadline.
ADMIN = error_responses(401, 403, 413)
GALLERY_WRITE = error_responses(401, 403, 413, 415, 504)


@router.get("", response_model=AdapterList)
async def list_adapters(dp: PlaneDep) -> AdapterList:
    """What the store holds, and which versions are on the device."""
    return AdapterList.model_validate(asdict(dp.list_adapters()))


@router.get("/{name}", response_model=AdapterInfo)
async def adapter_info(name: RefPath, dp: PlaneDep) -> AdapterInfo:
    """Versions of one adapter: format, ranks, labels, metrics, and whether each is loaded."""
    return AdapterInfo.model_validate(asdict(dp.adapter_info(AdapterRef.parse(name))))


@router.post("/{name}/load", response_model=LoadResponse, dependencies=[AdminDep], responses=ADMIN)
async def load_adapter(name: RefPath, dp: PlaneDep, pin: Annotated[bool, Query(description="never evict it")] = False) -> LoadResponse:
    """Load a version onto the device (latest unless `name@version`); a corrupt bundle answers 409."""
    entry = await dp.load(AdapterRef.parse(name), pin=pin)
    return LoadResponse(adapter=entry.name, version=entry.version, loaded=True, pinned=entry.pinned, load_seconds=round(entry.load_seconds, 4))


@router.post("/{name}/unload", response_model=UnloadResponse, dependencies=[AdminDep], responses=ADMIN)
async def unload_adapter(name: RefPath, dp: PlaneDep) -> UnloadResponse:
    """Drop a version from the device; requests already accepted still finish with it."""
    ((entry, deferred),) = dp.unload(AdapterRef.parse(name))
    return UnloadResponse(adapter=entry.name, version=entry.version, unloaded=True, deferred=deferred)


@router.get("/{name}/gallery", response_model=GalleryInfo)
async def gallery_info(name: RefPath, dp: PlaneDep) -> GalleryInfo:
    """Size, index kind and label counts of an adapter version's k-NN gallery."""
    return GalleryInfo.model_validate(asdict(await dp.gallery_state(AdapterRef.parse(name))))


@router.put("/{name}/gallery/{item_id:path}", response_model=GalleryItemResponse, dependencies=[AdminDep], responses=GALLERY_WRITE)
async def gallery_put(name: RefPath, item_id: Annotated[ItemId, Path()], item: GalleryItemRequest, request: Request, dp: PlaneDep) -> GalleryItemResponse:
    """Add (or replace) one gallery item from an image or a vector; committed to the gallery store before answering."""
    ref = AdapterRef.parse(name)
    request.state.adapter = dp.resolve_gallery(ref)
    done = await dp.gallery_put(ref, NewItem(item_id, item.label, item.image, item.vector), parse.deadline(request, dp))
    return GalleryItemResponse.model_validate(asdict(done))


@router.post("/{name}/gallery", response_model=GalleryBatchResponse, dependencies=[AdminDep], responses=GALLERY_WRITE)
async def gallery_batch(name: RefPath, body: GalleryBatchRequest, request: Request, dp: PlaneDep) -> GalleryBatchResponse:
    """Add or replace many gallery items in one transaction: all of them or none (any bad item -> 4xx, nothing written)."""
    ref = AdapterRef.parse(name)
    request.state.adapter = dp.resolve_gallery(ref)
    items = [NewItem(it.id, it.label, it.image, it.vector) for it in body.items]
    return GalleryBatchResponse.model_validate(asdict(await dp.gallery_batch(ref, items, parse.deadline(request, dp))))


@router.delete("/{name}/gallery/{item_id:path}", response_model=GalleryItemResponse, dependencies=[AdminDep], responses=error_responses(401, 403))
async def gallery_delete(name: RefPath, item_id: Annotated[ItemId, Path()], request: Request, dp: PlaneDep) -> GalleryItemResponse:
    """Remove one gallery item; committed to the gallery store before answering (it never comes back)."""
    ref = AdapterRef.parse(name)
    request.state.adapter = dp.resolve_gallery(ref)
    return GalleryItemResponse.model_validate(asdict(await dp.gallery_delete(ref, item_id)))
