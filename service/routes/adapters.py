"""`/v1/adapters`: what the store holds, load/unload, and each adapter version's k-NN gallery."""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Query, Request

from metalora.bundle import BundleError, read_manifest
from metalora.runtime import BASE

from ..container import Service
from ..deps import AdminDep, ReadyDep, RefPath
from ..errors import ServiceError
from ..inputs import request_timeout
from ..schemas import (
    AdapterInfo,
    AdapterList,
    AdapterSummary,
    AdapterVersion,
    GalleryInfo,
    GalleryItemRequest,
    GalleryItemResponse,
    ItemId,
    LoadResponse,
    UnloadResponse,
)
from ..thumbnails import thumbnail_of_base64

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


@router.get("", response_model=AdapterList)
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


@router.get("/{name}", response_model=AdapterInfo)
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


@router.post("/{name}/load", response_model=LoadResponse, dependencies=[AdminDep])
async def load_adapter(name: RefPath, svc: ReadyDep, pin: Annotated[bool, Query(description="never evict it")] = False) -> LoadResponse:
    """Load a version onto the device (latest unless `name@version`); a corrupt bundle answers 409."""
    entry = await svc.registry.load(name, pin=pin)
    return LoadResponse(adapter=entry.name, version=entry.version, loaded=True, pinned=entry.pinned, load_seconds=round(entry.load_seconds, 4))


@router.post("/{name}/unload", response_model=UnloadResponse, dependencies=[AdminDep])
async def unload_adapter(name: RefPath, svc: ReadyDep) -> UnloadResponse:
    """Drop a version from the device; requests already accepted still finish with it."""
    entry, deferred = svc.registry.unload(name)
    return UnloadResponse(adapter=entry.name, version=entry.version, unloaded=True, deferred=deferred)


def _gallery_key(svc: Service, name: str) -> str:
    key = svc.registry.resolve(name)
    if key == BASE:
        raise ServiceError(422, "no_gallery", "'base' has no gallery; galleries belong to adapters")
    return key


@router.get("/{name}/gallery", response_model=GalleryInfo)
async def gallery_info(name: RefPath, svc: ReadyDep) -> GalleryInfo:
    """Size, index kind and label counts of an adapter version's k-NN gallery."""
    key = _gallery_key(svc, name)
    index = await svc.gallery_index(key)
    counts: dict[str, int] = {}
    for j in index.label_idx.tolist():
        counts[index.labels[j]] = counts.get(index.labels[j], 0) + 1
    n, v = key.split("@", 1)
    return GalleryInfo(adapter=n, version=v, items=len(index), dim=index.dim, index=index.kind if len(index) else "none", source=index.source, labels=counts)


@router.put("/{name}/gallery/{item_id}", response_model=GalleryItemResponse, dependencies=[AdminDep])
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
        _, (res,) = await svc.compute(xs, [key], request_timeout(request, svc.settings))
        vec = res.embedding.numpy()
    thumb = await asyncio.to_thread(thumbnail_of_base64, item.image, svc.settings.max_pixels) if item.image is not None else None
    async with svc.edit_locks.setdefault(key, asyncio.Lock()):  # edits of one gallery in order
        index = await svc.gallery_index(key)
        new, created = index.with_item(item_id, label, vec)
        await asyncio.to_thread(svc.thumbnails.put, key, item_id, thumb)  # before the item exists: never an item with a stale picture
        await asyncio.to_thread(svc.galleries.persist, new)
    svc.metrics.gallery_items.labels(svc.metrics.label(key)).set(len(new))
    n, v = key.split("@", 1)
    return GalleryItemResponse(adapter=n, version=v, id=item_id, label=item.label, items=len(new), created=created)


@router.delete("/{name}/gallery/{item_id}", response_model=GalleryItemResponse, dependencies=[AdminDep])
async def gallery_delete(name: RefPath, item_id: Annotated[ItemId, Path()], svc: ReadyDep) -> GalleryItemResponse:
    """Remove one gallery item; persisted before answering."""
    key = _gallery_key(svc, name)
    async with svc.edit_locks.setdefault(key, asyncio.Lock()):
        index = await svc.gallery_index(key)
        new = index.without_item(item_id)
        await asyncio.to_thread(svc.galleries.persist, new)
        await asyncio.to_thread(svc.thumbnails.delete, key, item_id)
    svc.metrics.gallery_items.labels(svc.metrics.label(key)).set(len(new))
    n, v = key.split("@", 1)
    return GalleryItemResponse(adapter=n, version=v, id=item_id, label=None, items=len(new), deleted=True)
