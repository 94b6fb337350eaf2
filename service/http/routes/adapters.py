"""`/v1/adapters`: what the store holds, load/unload, and each adapter version's k-NN gallery."""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Query, Request

from metalora.bundle import BundleError, read_manifest
from metalora.runtime import BASE

from ...container import Service
from ..deps import AdminDep, ReadyDep, RefPath
from ...errors import ServiceError
from ...galleries import Item
from ...inputs import Watch, request_timeout
from ..schemas import (
    AdapterInfo,
    AdapterList,
    AdapterSummary,
    AdapterVersion,
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
from ...thumbnails import thumbnail_of_base64

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=error_responses(400, 404, 409, 422, 503))
# Declared where they can happen: 401/403 behind AdminDep, 413 where a body is read (the
# middleware's limit, images per batch), 415 and 504 where images are decoded within a deadline.
ADMIN = error_responses(401, 403, 413)
GALLERY_WRITE = error_responses(401, 403, 413, 415, 504)


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
    return AdapterList(backbone={**bb.identity.to_dict(), "embed_dim": bb.embed_dim, "device": svc.device, "backend": svc.backend_name, "precision": svc.precision}, capacity=svc.registry.capacity, adapters=rows)


def _default_cut(backbone) -> str | None:
    """The default cut's name ('blocks[:6]' for efficientnet_lite0), which bundles leave unrecorded."""
    return f"blocks[:{backbone.default_split}]" if backbone.default_split is not None else None


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
                update=dict(format=a.get("format"), ranks=a.get("ranks"), targets=m.get("resolved_targets"), num_classes=len(a.get("labels", [])), labels=a.get("labels"), trainable_params=m.get("trainable_params"), metrics=m.get("metrics"),
                            cut=m["backbone"].get("cut") or _default_cut(svc.runtime.backbone))
            )
        except BundleError as e:
            row.error = svc.public(f"{e.code}: {e}")
        if k in svc.registry.failed:
            row.error = svc.public(svc.registry.failed[k])
        if k in svc.galleries.indexes:
            row.gallery_items = len(svc.galleries.indexes[k])
        rows.append(row)
    return AdapterInfo(name=base_name, latest=rows[-1].version if rows else None, versions=rows)


@router.post("/{name}/load", response_model=LoadResponse, dependencies=[AdminDep], responses=ADMIN)
async def load_adapter(name: RefPath, svc: ReadyDep, pin: Annotated[bool, Query(description="never evict it")] = False) -> LoadResponse:
    """Load a version onto the device (latest unless `name@version`); a corrupt bundle answers 409."""
    entry = await svc.registry.load(name, pin=pin)
    return LoadResponse(adapter=entry.name, version=entry.version, loaded=True, pinned=entry.pinned, load_seconds=round(entry.load_seconds, 4))


@router.post("/{name}/unload", response_model=UnloadResponse, dependencies=[AdminDep], responses=ADMIN)
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
    counts = await asyncio.to_thread(index.label_counts)
    n, v = key.split("@", 1)
    store = "postgres" if svc.galleries.store.shared else "embedded"
    return GalleryInfo(adapter=n, version=v, items=len(index), dim=index.dim, index=index.kind if len(index) else "none", source=index.source, store=store, labels=counts)


async def _vectors(svc: Service, key: str, request: Request, items: list, names: list[str]) -> list[np.ndarray]:
    """Each item's vector: given, or the adapter's embedding of its image (one batch for all
    images). An image that does not decode is refused under its item's name in `names`."""
    raws = [it.image for it in items if it.vector is None]
    embedded: list[np.ndarray] = []
    if raws:
        watch = Watch(request, request_timeout(request, svc.settings))
        xs = await svc.decode(raws, watch, [n for it, n in zip(items, names) if it.vector is None])
        _, results = await svc.compute(xs, [key], watch)
        embedded = [r.embedding.numpy() for r in results]
    it_emb = iter(embedded)
    return [np.asarray(it.vector, dtype=np.float32) if it.vector is not None else next(it_emb) for it in items]


def _thumbnails(svc: Service, key: str, items: list[tuple[str, str | None]], max_pixels: int) -> list[tuple[str, bytes | None]]:
    """(id, thumbnail) to record before the write, from (id, base64 image or None): an image item's
    picture; for a vector item, an empty tombstone only where the id has a picture now or may get
    one (a bundle item, which `metalora thumbnails` makes pictures for), so a replaced item never
    shows a stale one, and a batch of new vectors writes no files."""
    out = []
    for item_id, image in items:
        if image is not None:
            out.append((item_id, thumbnail_of_base64(image, max_pixels)))
        elif svc.thumbnails.is_bundle_item(key, item_id) or svc.thumbnails.get(key, item_id) is not None:
            out.append((item_id, None))
    return out


async def _write(svc: Service, key: str, items: list[Item], thumbs: list[tuple[str, bytes | None]] = ()) -> tuple[int, list[bool]]:
    index = await svc.gallery_index(key)  # loaded (and its labels known) before the write
    for item_id, data in thumbs:  # before the item exists: never an item with a stale picture
        await asyncio.to_thread(svc.thumbnails.put, key, item_id, data)
    index, created = await asyncio.to_thread(svc.galleries.put, key, items)
    svc.metrics.gallery_items.labels(svc.metrics.label(key)).set(len(index))
    return len(index), created


@router.put("/{name}/gallery/{item_id:path}", response_model=GalleryItemResponse, dependencies=[AdminDep], responses=GALLERY_WRITE)
async def gallery_put(name: RefPath, item_id: Annotated[ItemId, Path()], item: GalleryItemRequest, request: Request, svc: ReadyDep) -> GalleryItemResponse:
    """Add (or replace) one gallery item from an image or a vector; committed to the gallery store before answering."""
    key = _gallery_key(svc, name)
    request.state.adapter = key
    index = await svc.gallery_index(key)
    if item.label not in index.labels:  # before computing an embedding for nothing
        raise ServiceError(422, "unknown_label", f"label {item.label!r} is not one of {key}'s {len(index.labels)} labels")
    (vec,) = await _vectors(svc, key, request, [item], ["image"])
    thumbs = await asyncio.to_thread(_thumbnails, svc, key, [(item_id, item.image)], svc.settings.max_pixels)
    size, (created,) = await _write(svc, key, [Item(item_id, item.label, vec)], thumbs)
    n, v = key.split("@", 1)
    return GalleryItemResponse(adapter=n, version=v, id=item_id, label=item.label, items=size, created=created)


@router.post("/{name}/gallery", response_model=GalleryBatchResponse, dependencies=[AdminDep], responses=GALLERY_WRITE)
async def gallery_batch(name: RefPath, body: GalleryBatchRequest, request: Request, svc: ReadyDep) -> GalleryBatchResponse:
    """Add or replace many gallery items in one transaction: all of them or none (any bad item -> 4xx, nothing written)."""
    key = _gallery_key(svc, name)
    request.state.adapter = key
    limit = svc.settings.gallery_batch_max
    if len(body.items) > limit:
        raise ServiceError(413, "too_many_items", f"{len(body.items)} items in one batch; at most {limit} (METALORA_GALLERY_BATCH_MAX)")
    images = sum(it.image is not None for it in body.items)
    if images > svc.settings.max_images:
        raise ServiceError(413, "too_many_images", f"{images} images in one batch; at most {svc.settings.max_images} (METALORA_MAX_IMAGES); send vectors, or several batches")
    index = await svc.gallery_index(key)
    ids = [it.id for it in body.items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ServiceError(422, "duplicate_id", f"id {dup!r} appears twice in one batch")
    bad = next((j for j, it in enumerate(body.items) if it.label not in index.labels), None)
    if bad is not None:
        raise ServiceError(422, "unknown_label", f"items[{bad}]: label {body.items[bad].label!r} is not one of {key}'s {len(index.labels)} labels")
    vecs = await _vectors(svc, key, request, body.items, [f"items[{j}].image (id {it.id!r})" for j, it in enumerate(body.items)])
    thumbs = await asyncio.to_thread(_thumbnails, svc, key, [(it.id, it.image) for it in body.items], svc.settings.max_pixels)
    size, created = await _write(svc, key, [Item(it.id, it.label, v) for it, v in zip(body.items, vecs)], thumbs)
    n, v = key.split("@", 1)
    return GalleryBatchResponse(adapter=n, version=v, items=size, written=len(created), created=sum(created), replaced=len(created) - sum(created))


@router.delete("/{name}/gallery/{item_id:path}", response_model=GalleryItemResponse, dependencies=[AdminDep], responses=error_responses(401, 403))
async def gallery_delete(name: RefPath, item_id: Annotated[ItemId, Path()], request: Request, svc: ReadyDep) -> GalleryItemResponse:
    """Remove one gallery item; committed to the gallery store before answering (it never comes back)."""
    key = _gallery_key(svc, name)
    request.state.adapter = key
    await svc.gallery_index(key)
    index = await asyncio.to_thread(svc.galleries.delete, key, [item_id])
    await asyncio.to_thread(svc.thumbnails.delete, key, item_id)
    svc.metrics.gallery_items.labels(svc.metrics.label(key)).set(len(index))
    n, v = key.split("@", 1)
    return GalleryItemResponse(adapter=n, version=v, id=item_id, label=None, items=len(index), deleted=True)
