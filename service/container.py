"""`Service`: everything one server process holds (runtime, backend engine, adapter registry,
micro-batcher, decoder pool, galleries), built at start-up and shared by every route.

Routes translate wire formats into calls on it (`decode`, `compute`, `gallery_index`); they hold
no state of their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from metalora.bundle import BundleError
from metalora.runtime import BASE, Runtime, pick_device

from .adapters import AdapterRegistry, Entry
from .batcher import Batcher, WorkItem
from .engine import Engine, ItemResult, make_backend
from .errors import ServiceError, public_message
from .galleries import open_store
from .inputs import Watch, decode_one
from .knn import GalleryEmpty, GalleryStore
from .metrics import Metrics
from .settings import Settings
from .thumbnails import ThumbnailStore

log = logging.getLogger("metalora.service")
_DROPPED = {"deadline_exceeded": "deadline", "client_closed_request": "cancelled"}  # error code -> rejected reason


class Service:
    """Everything one server process holds; built at start-up, shared by all routes."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.ready = False
        self.failed: dict[str, str] = {}
        self.metrics = Metrics(settings.metrics_max_adapters)
        # as configured and as resolved (the store's paths are resolved ones), never shown to clients
        self._private_dirs = {p for d in (settings.store, settings.galleries) for p in (Path(d).absolute(), Path(d).resolve())}

    def public(self, message: str) -> str:
        """An error message or failure reason as a client may see it: the store's bundles named
        `name@version`, no absolute path of the store or the gallery directory."""
        return public_message(message, self._private_dirs)

    async def start(self) -> None:
        s = self.settings
        device = pick_device(s.device)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.runtime = await asyncio.to_thread(Runtime, s.store, device)
        self.device = str(device)
        # A thread: the ONNX backend may export and quantise graphs on a first start (a minute on
        # 2 cores), and /healthz must keep answering meanwhile.
        self.backend_name, backend = await asyncio.to_thread(make_backend, s.backend, self.runtime, s)
        self.precision = getattr(backend, "precision", "fp32")
        log.info("backend %s, precision %s %s", self.backend_name, self.precision, getattr(backend, "precision_report", {}).get("prefix_img_s", ""))
        self.engine = Engine(backend, self.metrics, self.device)
        dsn = s.gallery_dsn.get_secret_value() if s.gallery_dsn else None
        store = open_store(s.galleries, dsn, timeout_s=s.gallery_db_timeout_s, pool_size=s.gallery_db_pool)
        self.galleries = GalleryStore(self.runtime.store, store, self.runtime.backbone.embed_dim, s.knn_exact_max, legacy_dir=s.galleries, retry_after_s=s.retry_after_s)
        self.thumbnails = ThumbnailStore(self.runtime.store, s.galleries)
        self.registry = AdapterRegistry(self.runtime, self.metrics, s.lru_capacity, on_evict=self.galleries.drop)
        self.batcher = Batcher(
            self.engine.run, self.metrics, max_batch_size=s.max_batch_size, max_delay_s=s.max_delay_ms / 1000, max_queue=s.max_queue, retry_after_s=s.retry_after_s
        )
        self.decode_pool = ThreadPoolExecutor(s.decode_workers, thread_name_prefix="decode")
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
        for key in self.registry.loaded():  # galleries load with their adapters (from the store, or PostgreSQL)
            try:
                await self.gallery_index(key)
            except ServiceError as e:  # e.g. the database is down: the gallery loads on first use instead
                log.warning("gallery of %s not loaded at start: %s", key, e.message)
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
        await asyncio.to_thread(self.galleries.close)

    # ---------------------------------------------------------------- images in, results out
    async def decode(self, raws: list[bytes | str], watch: Watch, names: list[str] | None = None) -> list[torch.Tensor]:
        """Raw images -> model inputs (N, 3, S, S) on the decoder pool, within the request's deadline.

        A bad image is refused naming it as `names` say (as the request has it; default
        `images[i]`). A deadline passing during decode is 504 (images not started are skipped;
        counted as rejected `deadline`), a client hanging up is 499 (counted as `cancelled`).
        """
        loop = asyncio.get_running_loop()
        s = self.settings
        if watch.left() <= 0:
            self.metrics.rejected.labels("deadline").inc(len(raws))
            raise watch.expired("before decoding")
        t0 = time.perf_counter()
        names = names or [f"images[{i}]" for i in range(len(raws))]
        futs = [loop.run_in_executor(self.decode_pool, decode_one, self.runtime.preprocessor, r, where, s.max_pixels, s.max_aspect_ratio) for r, where in zip(raws, names)]
        try:
            return await watch.wait(futs, "decode")
        except ServiceError as e:
            if e.code in _DROPPED:
                for f in futs:
                    f.cancel()  # images not started are skipped; one being decoded finishes unread
                self.metrics.rejected.labels(_DROPPED[e.code]).inc(len(raws))
            raise
        finally:
            self.metrics.inference.labels("decode").observe(time.perf_counter() - t0)

    async def compute(self, xs: list[torch.Tensor], refs: list[str], watch: Watch) -> tuple[list[Entry], list[ItemResult]]:
        """Images × adapters through the batcher; results image-major (image 0 with every adapter, ...).

        The deadline is the request's (from its arrival): items still queued when it passes are
        dropped by the batcher, and an answer that would come later is a 504, never a late 200.
        """
        entries: list[Entry] = []
        try:
            for ref in refs:
                entries.append(await self.registry.acquire(ref, len(xs)))
            n = len(xs) * len(entries)
            if n > self.batcher.max_queue:
                raise ServiceError(413, "too_many_images", f"{len(xs)} images × {len(entries)} adapters = {n} items, more than the queue holds ({self.batcher.max_queue})")
            items = [WorkItem(x, e.key, watch.deadline, partial(self.registry.release, e)) for x in xs for e in entries]
            futures = self.batcher.submit(items)
        except BaseException:
            for e in entries:
                self.registry.release(e, len(xs))
            raise
        try:
            return entries, await watch.wait(futures, "the queue or the batch")
        except ServiceError as e:
            if e.code in _DROPPED:
                self.batcher.drop(items, _DROPPED[e.code])
            raise

    def labels(self, entry: Entry) -> list[str]:
        return self.runtime.base_labels if entry.key == BASE else entry.labels

    async def gallery_index(self, key: str):
        """The live k-NN index of an adapter version, loaded from the gallery store on first use."""
        try:
            index = await asyncio.to_thread(self.galleries.get, key)
        except BundleError as e:
            raise ServiceError.from_bundle(e) from None
        self.metrics.gallery_items.labels(self.metrics.label(key)).set(len(index))
        return index

    async def knn_search(self, index, queries, k: int) -> list:
        """Up to k hits per query row (Q, D), off the event loop; an empty gallery answers 409."""
        try:
            return await asyncio.to_thread(index.search, queries, k)
        except GalleryEmpty:
            raise ServiceError(409, "gallery_empty", f"{index.key} has no gallery items; add some with PUT /v1/adapters/{{name}}/gallery/{{id}}") from None
