"""`Service`: everything one server process holds (runtime, backend engine, adapter registry,
micro-batcher, decoder pool, galleries), built at start-up, warmed, and stopped.

What a request does with it is `service.dataplane.DataPlane`'s business; the front doors hold no
state of their own.
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
from metalora.refs import BASE, AdapterRef
from metalora.runtime import Runtime, pick_device

from .adapters import AdapterRegistry
from .repository import Repository
from .batcher import Batcher, WorkItem
from .engine import Engine, make_backend
from .errors import DomainError, from_library, public_message
from .galleries import open_store
from .knn import GalleryStore
from .metrics import Metrics
from .settings import Settings
from .thumbnails import ThumbnailStore

log = logging.getLogger("metalora.service")


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
        self.repository = Repository(self.runtime.store, s.model_control_mode, s.version_policy)
        await asyncio.to_thread(self.repository.scan)  # hashes every version once: off the loop, before anything resolves
        self.registry = AdapterRegistry(self.runtime, self.metrics, s.lru_capacity, on_evict=self.galleries.drop, repository=self.repository)
        if s.model_control_mode == "explicit":
            self.registry.allowed = set()
        self.batcher = Batcher(
            self.engine.run, self.metrics, max_batch_size=s.max_batch_size, max_delay_s=s.max_delay_ms / 1000, max_queue=s.max_queue, retry_after_s=s.retry_after_s
        )
        self.decode_pool = ThreadPoolExecutor(s.decode_workers, thread_name_prefix="decode")
        self.batcher.start()
        self.registry._gauge()
        if s.model_control_mode == "poll":
            self._poll = asyncio.get_running_loop().create_task(self._poll_store(), name="metalora-repository-poll")

    async def warm(self) -> None:
        """Load the default adapters (skipping refused bundles), run one batch through them, turn ready."""
        s = self.settings
        names = list(dict.fromkeys([*s.pinned, *(s.adapters or self.repository.names()[: s.lru_capacity])]))
        if self.registry.allowed is not None:  # explicit model control: what starts loaded is what serves
            self.registry.allowed.update(AdapterRef(*AdapterRef.split(n)).name for n in names)
        for ref in names:
            try:
                await self.registry.load(ref, pin=ref in s.pinned)
            except DomainError as e:
                self.failed[ref] = f"{e.code}: {e.message}"
                log.warning("default adapter %s not loaded: %s", ref, e.message)
        for key in self.registry.loaded():  # galleries load with their adapters (from the store, or PostgreSQL)
            try:
                index = await asyncio.to_thread(self.galleries.get, key)
                self.metrics.gallery_items.labels(self.metrics.label(key)).set(len(index))
            except (DomainError, BundleError) as e:  # e.g. the database is down: the gallery loads on first use instead
                log.warning("gallery of %s not loaded at start: %s", key, from_library(e).message)
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

    async def _poll_store(self) -> None:
        """Poll mode: look at the store every `repository_poll_s`; versions that stopped serving are
        retired (unloaded once their images in flight are done)."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.rescan()
            except Exception:  # a store that cannot be read now is read again next time
                log.exception("model store scan failed")

    async def rescan(self, names: list[str] | None = None) -> None:
        added, removed = await asyncio.to_thread(self.repository.scan, names)
        if added or removed:
            log.info("model store: %s", ", ".join([*(f"+{k}" for k in sorted(added)), *(f"-{k}" for k in sorted(removed))]))
        self.registry.retire(removed)

    async def stop(self) -> None:
        poll = getattr(self, "_poll", None)
        if poll is not None:
            poll.cancel()
        await self.batcher.stop()
        self.engine.shutdown()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.galleries.close)
