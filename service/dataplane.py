"""The data plane: what every request *does*, once, for every front door (STYLE.md item 13).

`/v1` (service/http/routes), `/v2` REST (service/http/v2.py) and gRPC (service/grpc/server.py)
only translate their wire formats into calls here and map the `DomainError`s raised here through
one table per protocol. This module is the one place for: which adapter version answers
(`AdapterRef` -> key), the limits on a request, decoding within the deadline, the micro-batched
compute, scoring (softmax of the logits over the bundle's calibrated temperature), `unknown`
(the nearest gallery item against the bundle's k-NN threshold), k-NN over the live galleries,
gallery edits, load / unload and the repository's listing, readiness and the admin token.

Shapes: an image is (3, S, S) after decode; results are image-major (image 0 with every adapter,
then image 1, ...); embeddings (D,) are L2-normalised float32; probabilities (C,) float32.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from metalora.bundle import BundleError, read_manifest
from metalora.refs import BASE, AdapterRef, name_of, version_of

from .adapters import Entry
from .batcher import WorkItem
from .container import Service
from .deadline import Deadline
from .decode import Raw, check_count, check_model_input, check_pixels, decode_one
from .engine import ItemResult
from .errors import DomainError, Kind, conflict, from_library, invalid, not_found, too_large, unavailable
from .galleries import Item
from .knn import GalleryEmpty, Hit, vote
from .stats import ModelStats, Statistics

log = logging.getLogger("metalora.service")
_DROPPED = {"deadline_exceeded": "deadline", "client_closed_request": "cancelled"}  # error code -> rejected reason


# ------------------------------------------------------------------------ results
@dataclass
class Prediction:
    label: str
    index: int
    score: float


@dataclass
class Scored:
    """One image through one adapter version."""

    entry: Entry
    result: ItemResult
    labels: list[str]
    probabilities: torch.Tensor | None = None  # (C,) float32: softmax(logits / T), T the bundle's temperature (1: none)
    unknown: bool | None = None  # the nearest gallery item is below the bundle's threshold; None: no threshold, or no gallery to ask

    @property
    def adapter(self) -> str:
        return self.entry.name

    @property
    def version(self) -> str:
        return self.entry.version

    @property
    def embedding(self) -> torch.Tensor:  # (D,) float32, L2-normalised
        return self.result.embedding

    @property
    def seed(self) -> dict[str, list[float]] | None:
        """The seed c(x) by adapted layer, in the adapter's target order; None without one (lora, base)."""
        seed, dims = self.result.seed, self.entry.seed_dims
        if seed is None or not dims:
            return None
        return {layer: p.tolist() for layer, p in zip(dims, seed.split(list(dims.values())))}

    def top(self, k: int) -> list[Prediction]:
        """The k most probable labels, most probable first (k capped by the class count)."""
        scores, idx = self.probabilities.topk(min(k, self.probabilities.numel()))
        return [Prediction(label=self.labels[i], index=i, score=s) for s, i in zip(scores.tolist(), idx.tolist())]


@dataclass
class Neighbours:
    """One k-NN query's answer: the hits (best first), their vote, and `unknown`."""

    adapter: str
    version: str
    neighbors: list[Hit]
    label: str | None
    votes: dict[str, int]
    unknown: bool | None


@dataclass
class GalleryItem:
    """What a gallery item write or delete did."""

    adapter: str
    version: str
    id: str
    label: str | None
    items: int  # gallery size after it
    created: bool | None = None
    deleted: bool | None = None


@dataclass
class GalleryWrite:
    """What a batch write did."""

    adapter: str
    version: str
    items: int
    written: int
    created: int
    replaced: int


@dataclass
class GalleryState:
    adapter: str
    version: str
    items: int
    dim: int
    index: str  # flat | hnsw | none
    source: str  # bundle | edited | none
    store: str  # embedded | postgres
    labels: dict[str, int]


@dataclass
class AdapterVersion:
    version: str
    loaded: bool
    pinned: bool
    state: str = "available"  # the repository's: available | incomplete | invalid | retired
    format: str | None = None
    ranks: list[int] | None = None
    targets: list[str] | None = None
    num_classes: int | None = None
    labels: list[str] | None = None
    trainable_params: int | None = None
    cut: str | None = None
    metrics: dict | None = None
    gallery_items: int | None = None
    error: str | None = None


@dataclass
class AdapterSummary:
    name: str
    versions: list[str]
    latest: str | None
    loaded: list[str]
    pinned: list[str]


@dataclass
class AdapterList:
    backbone: dict
    capacity: int
    adapters: list[AdapterSummary]


@dataclass
class AdapterInfo:
    name: str
    latest: str | None
    versions: list[AdapterVersion]


@dataclass
class RepositoryEntry:
    """One model version of the repository index (`base` has version "")."""

    name: str
    version: str
    loaded: bool
    reason: str = ""


@dataclass
class ModelInfo:
    """What the Open Inference Protocol's metadata says of a model (an adapter, or `base`)."""

    name: str
    versions: list[str]
    classes: int
    dim: int
    backend: str
    labels: list[str] = field(default_factory=list)


@dataclass
class NewItem:
    """A gallery item to write: its id, label, and an image (embedded by the adapter) or a vector."""

    id: str
    label: str
    image: str | None = None
    vector: list[float] | None = None


class DataPlane:
    """Every operation a front door can ask for, on the process's one `Service`."""

    def __init__(self, service: Service):
        self.svc = service
        self.settings = service.settings
        self.statistics = Statistics()

    # ---------------------------------------------------------------- the process
    def public(self, message: str) -> str:
        """An error message as a client may see it: no absolute path of the store or galleries."""
        return self.svc.public(message)

    @property
    def ready(self) -> bool:
        return self.svc.ready

    def check_ready(self) -> None:
        if not self.svc.ready:
            raise unavailable("not_ready", "the server is still loading and warming its adapters", 2)

    def readiness(self) -> dict:
        """/readyz's facts: status (loading | ready | failed), device, backend, precision, what is loaded, what failed."""
        svc = self.svc
        reg = getattr(svc, "registry", None)
        status = "ready" if svc.ready else ("failed" if "startup" in svc.failed else "loading")
        return dict(status=status, device=getattr(svc, "device", ""), backend=getattr(svc, "backend_name", svc.settings.backend), precision=getattr(svc, "precision", ""),
                    loaded=reg.loaded() if reg else [], failed={k: svc.public(v) for k, v in svc.failed.items()})

    def authorize(self, authorization: str) -> None:
        """The admin bearer token (`Authorization: Bearer <token>`, HTTP header or gRPC metadata):
        no token configured -> PERMISSION_DENIED for everyone; a wrong or missing one -> UNAUTHENTICATED."""
        token = self.settings.admin_token
        if token is None:
            raise DomainError(Kind.PERMISSION_DENIED, "admin_disabled", "admin routes are disabled: set METALORA_ADMIN_TOKEN to enable them")
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
            raise DomainError(Kind.UNAUTHENTICATED, "unauthorized", "missing or wrong bearer token")

    def deadline(self, client_s: float | None = None, *, arrived: float | None = None, gone=None) -> Deadline:
        """The request's deadline: the server's `request_timeout_s` from `arrived` (default: now), or
        less when the client asked for less (`client_s` seconds; 0 or less: already past)."""
        limit = self.settings.request_timeout_s
        return Deadline(limit if client_s is None else min(limit, max(client_s, 0.0)), arrived, gone)

    def resolve(self, ref: AdapterRef) -> str:
        """The key of the version `ref` names (`base`, or `name@version`, the latest when unversioned)."""
        return self.svc.registry.resolve(ref)

    def resolve_gallery(self, ref: AdapterRef) -> str:
        key = self.resolve(ref)
        if key == BASE:
            raise invalid("no_gallery", "'base' has no gallery; galleries belong to adapters")
        return key

    # ---------------------------------------------------------------- images in, results out
    def check_images(self, raws: Sequence[Raw]) -> None:
        """The request's images against the limits: how many, and, for decoded pixels, their size
        and shape, for a model input (float32) its shape (files are checked from their header when
        decoded)."""
        s = self.settings
        check_count(len(raws), s.max_images)
        for raw in raws:
            if isinstance(raw, np.ndarray):
                if raw.dtype == np.float32:
                    check_model_input(raw, self.svc.runtime.preprocessor.cfg.input_size)
                else:
                    check_pixels(raw.shape[0], raw.shape[1], s.max_pixels, s.max_aspect_ratio)

    async def decode(self, raws: Sequence[Raw], deadline: Deadline, names: list[str] | None = None) -> list[torch.Tensor]:
        """Raw images -> model inputs (3, S, S) on the decoder pool, within the request's deadline.

        A bad image is refused naming it as `names` say (default `images[i]`). The deadline passing
        during decode is DEADLINE_EXCEEDED (images not started are skipped; counted as rejected
        `deadline`), the client hanging up CANCELLED (counted as `cancelled`)."""
        svc, s = self.svc, self.settings
        loop = asyncio.get_running_loop()
        if deadline.left() <= 0:
            svc.metrics.rejected.labels("deadline").inc(len(raws))
            raise deadline.expired("before decoding")
        t0 = time.perf_counter()
        names = names or [f"images[{i}]" for i in range(len(raws))]
        futs = [loop.run_in_executor(svc.decode_pool, decode_one, svc.runtime.preprocessor, r, where, s.max_pixels, s.max_aspect_ratio) for r, where in zip(raws, names)]
        try:
            return await deadline.wait(futs, "decode")
        except DomainError as e:
            if e.code in _DROPPED:
                for f in futs:
                    f.cancel()  # images not started are skipped; one being decoded finishes unread
                svc.metrics.rejected.labels(_DROPPED[e.code]).inc(len(raws))
            raise
        finally:
            svc.metrics.inference.labels("decode").observe(time.perf_counter() - t0)

    async def compute(self, xs: list[torch.Tensor], refs: Sequence[AdapterRef], deadline: Deadline) -> tuple[list[Entry], list[ItemResult]]:
        """Images × adapters through the micro-batcher; results image-major.

        The deadline is the request's (from its arrival): items still queued when it passes are
        dropped by the batcher, and an answer that would come later is an error, never a late one."""
        svc = self.svc
        entries: list[Entry] = []
        try:
            for ref in refs:
                entries.append(await svc.registry.acquire(ref, len(xs)))
            n = len(xs) * len(entries)
            if n > svc.batcher.max_queue:
                raise too_large("too_many_images", f"{len(xs)} images × {len(entries)} adapters = {n} items, more than the queue holds ({svc.batcher.max_queue})")
            items = [WorkItem(x, e.key, deadline.deadline, partial(svc.registry.release, e)) for x in xs for e in entries]
            futures = svc.batcher.submit(items)
        except BaseException:
            for e in entries:
                svc.registry.release(e, len(xs))
            raise
        try:
            return entries, await deadline.wait(futures, "the queue or the batch")
        except DomainError as e:
            if e.code in _DROPPED:
                svc.batcher.drop(items, _DROPPED[e.code])
            raise

    def labels(self, entry: Entry) -> list[str]:
        return self.svc.runtime.base_labels if entry.key == BASE else entry.labels

    def check_top_k(self, k: int, what: str = "top_k", code: str = "invalid_top_k") -> None:
        if k > self.settings.max_top_k:
            raise invalid(code, f"{what} is at most {self.settings.max_top_k}")

    async def infer(self, refs: Sequence[AdapterRef], raws: Sequence[Raw], deadline: Deadline, *, names: list[str] | None = None, unknown: bool = True) -> list[Scored]:
        """Every image × adapter, scored: probabilities, embedding, seed and (`unknown=True`) `unknown`;
        image-major. The one inference path of `/v1/predict`, `/v1/embed`, k-NN by image and
        the Open Inference Protocol's infer."""
        keys = [self.resolve(ref) for ref in refs]  # an unknown or bad name fails fast, before any image is decoded
        self.check_images(raws)
        t0 = time.perf_counter()
        try:
            entries, results = await self.compute(await self.decode(raws, deadline, names), refs, deadline)
        except BaseException:
            for key in dict.fromkeys(keys):
                self.statistics.failure(key, time.perf_counter() - t0)
            raise
        took = time.perf_counter() - t0
        for k, e in enumerate(entries):
            mine = results[k :: len(entries)]
            self.statistics.success(e.key, took, len(mine), sum(r.queue_s for r in mine), sum(r.compute_s for r in mine))
        out = []
        for j, res in enumerate(results):
            e = entries[j % len(entries)]
            probs = (res.logits / e.temperature).softmax(-1)  # the bundle's calibrated temperature (1: none)
            out.append(Scored(e, res, self.labels(e), probs))
        if unknown:
            await self._unknown(out)
        return out

    async def predict(self, refs: Sequence[AdapterRef], raws: Sequence[Raw], top_k: int, deadline: Deadline) -> list[Scored]:
        """`infer` for class scores: `top_k` checked against the server's limit first."""
        self.check_top_k(top_k)
        return await self.infer(refs, raws, deadline)

    async def embed(self, refs: Sequence[AdapterRef], raws: Sequence[Raw], deadline: Deadline) -> list[Scored]:
        return await self.infer(refs, raws, deadline, unknown=False)

    async def _unknown(self, scored: list[Scored]) -> None:
        """Sets `unknown` on results of calibrated adapters: the nearest item of the current gallery
        against the bundle's threshold (the same test as k-NN), one search per adapter, off the
        event loop. Left unset when the gallery is empty or its store is down (the scores stand; an
        error would lose them)."""
        rows: dict[str, list[Scored]] = {}
        for s in scored:
            if s.entry.knn_threshold is not None and s.entry.key != BASE:
                rows.setdefault(s.entry.key, []).append(s)
        for key, ss in rows.items():
            try:
                index = await self.gallery_index(key)
            except DomainError as err:
                if err.kind is not Kind.UNAVAILABLE:
                    raise
                log.warning("predict for %s without \"unknown\": %s", key, err.message)
                continue
            if len(index):
                q = np.stack([s.embedding.numpy() for s in ss])  # (Q, D)
                for s, hits in zip(ss, await self.knn_search(index, q, 1)):
                    s.unknown = index.is_unknown(hits)

    # ---------------------------------------------------------------- k-NN
    async def gallery_index(self, key: str):
        """The live k-NN index of an adapter version, loaded from the gallery store on first use."""
        svc = self.svc
        try:
            index = await asyncio.to_thread(svc.galleries.get, key)
        except BundleError as e:
            raise from_library(e) from None
        svc.metrics.gallery_items.labels(svc.metrics.label(key)).set(len(index))
        return index

    async def knn_search(self, index, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Up to k hits per query row (Q, D), off the event loop; an empty gallery is CONFLICT `gallery_empty`."""
        try:
            return await asyncio.to_thread(index.search, queries, k)
        except GalleryEmpty:
            raise conflict("gallery_empty", f"{index.key} has no gallery items; add some with PUT /v1/adapters/{{name}}/gallery/{{id}}") from None

    async def knn(self, refs: Sequence[AdapterRef], raws: Sequence[Raw] | None, vectors: list[list[float]] | None, k: int, deadline: Deadline) -> list[Neighbours]:
        """Nearest gallery items (cosine) and their vote, for images (image-major, as `infer`) or for
        query vectors of one adapter's embedding space (any finite, non-zero norm)."""
        if k > self.settings.max_k:
            raise invalid("invalid_k", f"k is at most {self.settings.max_k}")
        if any(r.is_base for r in refs):
            raise invalid("no_gallery", "'base' has no gallery; k-NN needs an adapter")
        if vectors is not None:
            key = self.resolve(refs[0])
            q = np.asarray(vectors, dtype=np.float32) if len({len(v) for v in vectors}) == 1 else None
            index = await self.gallery_index(key)
            if q is None or q.shape[1] != index.dim:
                raise invalid("dim_mismatch", f"vectors must all have {index.dim} numbers (the embedding dim of {key})")
            if not np.isfinite(q).all() or (np.abs(q).sum(1) == 0).any():
                raise invalid("invalid_vector", "vectors must be finite and non-zero")
            pairs = [(key, q)]
        else:
            scored = await self.infer(refs, raws, deadline, unknown=False)
            pairs = [(s.entry.key, s.embedding.numpy()[None]) for s in scored]
        out = []
        t0 = time.perf_counter()
        for key, q in pairs:
            index = await self.gallery_index(key)
            for hits in await self.knn_search(index, q, k):
                label, votes = vote(hits)
                out.append(Neighbours(name_of(key), version_of(key), hits, label, votes, index.is_unknown(hits)))
        self.svc.metrics.inference.labels("knn").observe(time.perf_counter() - t0)
        return out

    # ---------------------------------------------------------------- galleries
    async def gallery_state(self, ref: AdapterRef) -> GalleryState:
        """Size, index kind and label counts of an adapter version's gallery."""
        key = self.resolve_gallery(ref)
        index = await self.gallery_index(key)
        counts = await asyncio.to_thread(index.label_counts)
        store = "postgres" if self.svc.galleries.store.shared else "embedded"
        return GalleryState(name_of(key), version_of(key), len(index), index.dim, index.kind if len(index) else "none", index.source, store, counts)

    async def _vectors(self, key: str, items: Sequence[NewItem], names: list[str], deadline: Deadline) -> list[np.ndarray]:
        """Each item's vector: given, or the adapter's embedding of its image (one batch for all
        images). An image that does not decode is refused under its item's name in `names`."""
        raws = [it.image for it in items if it.vector is None]
        embedded: list[np.ndarray] = []
        if raws:
            xs = await self.decode(raws, deadline, [n for it, n in zip(items, names) if it.vector is None])
            _, results = await self.compute(xs, [AdapterRef.parse(key)], deadline)
            embedded = [r.embedding.numpy() for r in results]
        it_emb = iter(embedded)
        return [np.asarray(it.vector, dtype=np.float32) if it.vector is not None else next(it_emb) for it in items]

    def _thumbnails(self, key: str, items: list[tuple[str, str | None]]) -> list[tuple[str, bytes | None]]:
        """(id, thumbnail) to record before the write, from (id, base64 image or None): an image item's
        picture; for a vector item, an empty tombstone only where the id has a picture now or may get
        one (a bundle item, which `metalora thumbnails` makes pictures for), so a replaced item never
        shows a stale one, and a batch of new vectors writes no files."""
        from .thumbnails import thumbnail_of_base64

        thumbs = self.svc.thumbnails
        out = []
        for item_id, image in items:
            if image is not None:
                out.append((item_id, thumbnail_of_base64(image, self.settings.max_pixels)))
            elif thumbs.is_bundle_item(key, item_id) or thumbs.get(key, item_id) is not None:
                out.append((item_id, None))
        return out

    async def _write(self, key: str, items: list[Item], thumbs: list[tuple[str, bytes | None]] = ()) -> tuple[int, list[bool]]:
        svc = self.svc
        await self.gallery_index(key)  # loaded (and its labels known) before the write
        for item_id, data in thumbs:  # before the item exists: never an item with a stale picture
            await asyncio.to_thread(svc.thumbnails.put, key, item_id, data)
        index, created = await asyncio.to_thread(svc.galleries.put, key, items)
        svc.metrics.gallery_items.labels(svc.metrics.label(key)).set(len(index))
        return len(index), created

    async def gallery_put(self, ref: AdapterRef, item: NewItem, deadline: Deadline) -> GalleryItem:
        """Add (or replace) one item from an image or a vector; committed to the gallery store before it returns."""
        key = self.resolve_gallery(ref)
        index = await self.gallery_index(key)
        if item.label not in index.labels:  # before computing an embedding for nothing
            raise invalid("unknown_label", f"label {item.label!r} is not one of {key}'s {len(index.labels)} labels")
        (vec,) = await self._vectors(key, [item], ["image"], deadline)
        thumbs = await asyncio.to_thread(self._thumbnails, key, [(item.id, item.image)])
        size, (created,) = await self._write(key, [Item(item.id, item.label, vec)], thumbs)
        return GalleryItem(name_of(key), version_of(key), item.id, item.label, size, created=created)

    async def gallery_batch(self, ref: AdapterRef, items: Sequence[NewItem], deadline: Deadline) -> GalleryWrite:
        """Add or replace many items in one transaction: all of them or none."""
        key = self.resolve_gallery(ref)
        s = self.settings
        if len(items) > s.gallery_batch_max:
            raise too_large("too_many_items", f"{len(items)} items in one batch; at most {s.gallery_batch_max} (METALORA_GALLERY_BATCH_MAX)")
        images = sum(it.image is not None for it in items)
        if images > s.max_images:
            raise too_large("too_many_images", f"{images} images in one batch; at most {s.max_images} (METALORA_MAX_IMAGES); send vectors, or several batches")
        index = await self.gallery_index(key)
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise invalid("duplicate_id", f"id {dup!r} appears twice in one batch")
        bad = next((j for j, it in enumerate(items) if it.label not in index.labels), None)
        if bad is not None:
            raise invalid("unknown_label", f"items[{bad}]: label {items[bad].label!r} is not one of {key}'s {len(index.labels)} labels")
        vecs = await self._vectors(key, items, [f"items[{j}].image (id {it.id!r})" for j, it in enumerate(items)], deadline)
        thumbs = await asyncio.to_thread(self._thumbnails, key, [(it.id, it.image) for it in items])
        size, created = await self._write(key, [Item(it.id, it.label, v) for it, v in zip(items, vecs)], thumbs)
        return GalleryWrite(name_of(key), version_of(key), size, len(created), sum(created), len(created) - sum(created))

    async def gallery_delete(self, ref: AdapterRef, item_id: str) -> GalleryItem:
        """Remove one item; committed to the gallery store before it returns (it never comes back)."""
        svc = self.svc
        key = self.resolve_gallery(ref)
        await self.gallery_index(key)
        index = await asyncio.to_thread(svc.galleries.delete, key, [item_id])
        await asyncio.to_thread(svc.thumbnails.delete, key, item_id)
        svc.metrics.gallery_items.labels(svc.metrics.label(key)).set(len(index))
        return GalleryItem(name_of(key), version_of(key), item_id, None, len(index), deleted=True)

    async def thumbnail(self, ref: AdapterRef, item_id: str) -> tuple[str, bytes]:
        """(key, picture) of a live gallery item: the one `metalora thumbnails` made for a bundle item,
        the one made when it was added from an image, or the bundle's own. NOT_FOUND `unknown_item`,
        or `no_thumbnail` for an item added as a bare vector."""
        key = self.resolve_gallery(ref)
        index = await self.gallery_index(key)
        if item_id not in index:  # live items only
            raise not_found("unknown_item", f"{key} has no gallery item {item_id!r}")
        data = await asyncio.to_thread(self.svc.thumbnails.get, key, item_id)
        if data is None:
            raise not_found("no_thumbnail", f"{key} gallery item {item_id!r} has no thumbnail (added as a bare vector, or a bundle item whose picture was not made: run `metalora thumbnails`)")
        return key, data

    # ---------------------------------------------------------------- the repository
    def list_adapters(self) -> AdapterList:
        """What the store holds (the versions that serve), and which versions are on the device."""
        svc = self.svc
        repo, loaded = svc.repository, svc.registry.entries
        rows = []
        for name in repo.names():
            versions = repo.available(name)
            mine = [version_of(k) for k in loaded if name_of(k) == name]
            rows.append(AdapterSummary(name, versions, versions[-1] if versions else None, mine, [v for v in mine if loaded[AdapterRef.key_of(name, v)].pinned]))
        bb = svc.runtime.backbone
        backbone = {**bb.identity.to_dict(), "embed_dim": bb.embed_dim, "device": svc.device, "backend": svc.backend_name, "precision": svc.precision}
        return AdapterList(backbone, svc.registry.capacity, rows)

    def adapter_info(self, ref: AdapterRef) -> AdapterInfo:
        """Every version of one adapter: format, ranks, labels, metrics, whether each is loaded."""
        svc = self.svc
        key = svc.registry.resolve(ref, any_state=True)  # a listing: versions that cannot serve are shown, with why
        if key == BASE:
            raise not_found("unknown_adapter", "'base' is the frozen backbone, not a stored adapter; see GET /v1/adapters")
        name = name_of(key)
        store, bb = svc.runtime.store, svc.runtime.backbone
        default_cut = f"blocks[:{bb.default_split}]" if bb.default_split is not None else None  # bundles at the default cut leave it unrecorded
        rows = []
        for st in svc.repository.states(name):
            v, k = st.version, st.key
            entry = svc.registry.entries.get(k)
            row = AdapterVersion(v, entry is not None, bool(entry and entry.pinned), state=st.state)
            if st.reason:
                row.error = svc.public(f"{st.code}: {st.reason}" if st.code else st.reason)
            try:
                m = read_manifest(store.resolve(k)[2])
                a = m["adapter"]
                row.format, row.ranks, row.targets = a.get("format"), a.get("ranks"), m.get("resolved_targets")
                row.num_classes, row.labels = len(a.get("labels", [])), a.get("labels")
                row.trainable_params, row.metrics, row.cut = m.get("trainable_params"), m.get("metrics"), m["backbone"].get("cut") or default_cut
            except BundleError as e:
                row.error = row.error or svc.public(f"{e.code}: {e}")
            if k in svc.registry.failed:
                row.error = svc.public(svc.registry.failed[k])
            if k in svc.galleries.indexes:
                row.gallery_items = len(svc.galleries.indexes[k])
            rows.append(row)
        avail = svc.repository.available(name)
        return AdapterInfo(name, avail[-1] if avail else None, rows)

    async def load(self, ref: AdapterRef, pin: bool = False) -> Entry:
        """Load a version onto the device (latest unless versioned); a bundle that cannot be served is
        CONFLICT. Under explicit model control the adapter is looked at on disk again first, and
        serves from now on."""
        svc = self.svc
        reg = svc.registry
        if reg.allowed is not None and not ref.is_base:
            await svc.rescan([ref.name])
            reg.allowed.add(ref.name)
        return await reg.load(ref, pin=pin)

    def unload(self, ref: AdapterRef, *, every_version: bool = False) -> list[tuple[Entry, bool]]:
        """Drop a version from the device (`name@version`, or the latest), or with `every_version`
        each loaded version of `name` (the repository's unload: idempotent, nothing loaded is no
        error); requests already accepted finish with it. Under explicit model control an
        unversioned unload stops the adapter serving. Returns (entry, deferred) per version dropped.
        A single version that is not loaded is NOT_FOUND `not_loaded`."""
        reg = self.svc.registry
        key = reg.resolve(ref, any_state=True)
        if key == BASE:
            raise invalid("cannot_unload_base", "the frozen backbone ('base') is always loaded")
        if every_version and not ref.version:
            keys = [k for k in reg.loaded() if name_of(k) == ref.name]
        else:
            keys = [key]
        if not every_version and key not in reg.entries:
            raise not_found("not_loaded", f"adapter {key} is not loaded")
        dropped = [reg.unload(AdapterRef.parse(k)) for k in keys if k in reg.entries]
        if reg.allowed is not None and not ref.version:
            reg.allowed.discard(ref.name)
        return dropped

    def repository_index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        """Every model version in the store (and `base`), with whether it is on the device and why not
        (`unloaded`, a failed load, or the repository's state: incomplete, invalid, retired)."""
        svc = self.svc
        rows = [RepositoryEntry(BASE, "", svc.ready)]
        for name in svc.repository.names():
            for st in svc.repository.states(name):
                key = st.key
                loaded = key in svc.registry.entries
                why = "" if loaded else f"{st.state}: {st.code + ': ' if st.code else ''}{st.reason}" if st.reason else "unloaded"
                rows.append(RepositoryEntry(name, st.version, loaded, svc.public(svc.registry.failed.get(key, why))))
        return [r for r in rows if r.loaded] if ready_only else rows

    def model_ready(self, ref: AdapterRef) -> bool:
        """Whether the version `ref` names (or `base`) is on the device now; unknown ones are NOT_FOUND."""
        key = self.resolve(ref)
        return self.svc.ready and (key == BASE or key in self.svc.registry.entries)

    async def model_info(self, ref: AdapterRef) -> ModelInfo:
        """Name, versions, classes and embedding size of one adapter (or `base`)."""
        svc = self.svc
        key = self.resolve(ref)
        store = svc.runtime.store
        if key == BASE:
            versions, labels = [], svc.runtime.base_labels
        else:
            entry = svc.registry.entries.get(key)
            if entry is not None:
                labels = entry.labels
            else:
                try:
                    manifest = await asyncio.to_thread(read_manifest, store.resolve(key)[2])
                except BundleError as e:
                    raise from_library(e) from None
                labels = manifest["adapter"].get("labels", [])
            versions = svc.repository.available(name_of(key))
        return ModelInfo(name_of(key), versions, len(labels), svc.runtime.backbone.embed_dim, svc.backend_name, list(labels))

    def model_statistics(self, ref: AdapterRef | None = None) -> list[tuple[str, str, ModelStats]]:
        """(name, version, statistics) of the version `ref` names, or of every version that has
        answered or is loaded (`base` included) when `ref` is None."""
        if ref is not None:
            key = self.resolve(ref)
            keys = [key]
        else:
            keys = list(dict.fromkeys([BASE, *self.svc.registry.loaded(), *self.statistics.models]))
        return [(name_of(k), version_of(k), self.statistics.get(k)) for k in keys]


    def unload_all(self, ref: AdapterRef) -> list[str]:
        """The repository extension's unload: `unload(ref, every_version=True)`; the keys dropped."""
        return [e.key for e, _ in self.unload(ref, every_version=True)]
