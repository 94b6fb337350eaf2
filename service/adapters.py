"""The adapter registry: what the store holds, what is on the device, and an LRU between them.

Loaded adapters live in an LRU of `capacity` entries; pinned ones are never evicted; `touch`
on every use. Each entry counts the images in flight that use it, and nothing with images in
flight is unloaded: an unload (or eviction) of a busy adapter is deferred until its last image
leaves, so no accepted request ever fails because of it. All state changes happen on the event
loop; only reading a bundle from disk runs on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from metalora.bundle import BundleError
from metalora.refs import BASE, AdapterRef, name_of, version_of
from metalora.runtime import Runtime

from .errors import from_library, invalid, not_found
from .repository import Repository
from .metrics import Metrics

log = logging.getLogger("metalora.service")


@dataclass(eq=False)
class Entry:
    """One adapter version on the device (or `base`, which is always there)."""

    key: str  # 'base' or 'name@version'
    pinned: bool = False
    inflight: int = 0  # images accepted and not yet finished
    unload_pending: bool = False
    load_seconds: float = 0.0
    labels: list[str] = field(default_factory=list)  # kept here so answers never need the runtime after an unload
    seed_dims: dict[str, int] = field(default_factory=dict)  # adapted layer -> its part of the seed (empty: no seed)
    temperature: float = 1.0  # the manifest's calibration: probabilities are softmax(logits / T)
    knn_threshold: float | None = None  # nearest-gallery cosine below this -> "unknown" (None: never)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return name_of(self.key)

    @property
    def version(self) -> str:
        return version_of(self.key)


class AdapterRegistry:
    """LRU of loaded adapters over a `Runtime`, with pinning, in-flight counts and deferred unloads."""

    def __init__(self, runtime: Runtime, metrics: Metrics, capacity: int, on_evict: Callable[[str], None] | None = None, repository: Repository | None = None):
        self.runtime = runtime
        if repository is None:  # the store as it is now, every version (a registry used on its own)
            repository = Repository(runtime.store, "none", "all")
            repository.scan()
        self.repository = repository
        self.metrics = metrics
        self.capacity = capacity
        self.on_evict = on_evict or (lambda key: None)
        self.entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self.base = Entry(BASE, pinned=True)
        self._locks: dict[str, asyncio.Lock] = {}
        self.failed: dict[str, str] = {}  # key -> why its bundle was refused (last attempt)
        self.allowed: set[str] | None = None  # explicit model control: the adapters loaded on request (None: every available one)

    # ---------------------------------------------------------------- lookups
    def resolve(self, ref: AdapterRef, any_state: bool = False) -> str:
        """An adapter reference -> the key of the version it names (`base` or `name@version`), as the
        repository serves it; unknown names raise NOT_FOUND `unknown_adapter`, bad names INVALID
        `invalid_name`, a version that cannot serve CONFLICT (`service.repository`). Under explicit
        model control an adapter not loaded by request is NOT_FOUND `not_loaded`."""
        if isinstance(ref, str):  # a key or a setting's name
            ref = AdapterRef(*AdapterRef.split(ref))
        key = self.repository.resolve(ref, any_state)
        if self.allowed is not None and not any_state and key != BASE and name_of(key) not in self.allowed:
            raise not_found("not_loaded", f"adapter {name_of(key)} is not loaded (model control mode explicit: load it with POST /v2/repository/models/{name_of(key)}/load)")
        self.metrics.admit(name_of(key))
        return key

    def loaded(self) -> list[str]:
        return list(self.entries)

    def is_pinned(self, key: str) -> bool:
        return key in self.entries and self.entries[key].pinned

    # ---------------------------------------------------------------- acquire / release
    async def acquire(self, ref: AdapterRef, n: int) -> Entry:
        """Resolve, load when cold, touch, and count `n` images in flight; pair with `release`."""
        key = self.resolve(ref)
        if key == BASE:
            return self.base
        entry = self.entries.get(key) or await self._load(key)
        entry.inflight += n
        entry.unload_pending = False  # wanted again: a pending unload is called off
        self._touch(entry)
        self._evict()
        return entry

    def release(self, entry: Entry, n: int = 1) -> None:
        if entry is self.base:
            return
        entry.inflight -= n
        if entry.inflight <= 0 and entry.unload_pending:
            self._drop(entry)
        self._evict()

    def _touch(self, entry: Entry) -> None:
        entry.last_used = time.monotonic()
        self.entries.move_to_end(entry.key)

    # ---------------------------------------------------------------- load / unload
    async def load(self, ref: AdapterRef, pin: bool = False) -> Entry:
        key = self.resolve(ref)
        if key == BASE:
            return self.base
        entry = self.entries.get(key) or await self._load(key)
        entry.unload_pending = False
        entry.pinned = entry.pinned or pin
        self._touch(entry)
        self._evict()
        self._gauge()
        return entry

    async def _load(self, key: str) -> Entry:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # concurrent first requests for a cold adapter load it once
            if key in self.entries:
                return self.entries[key]
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(self.runtime.load, key)
            except BundleError as e:
                self.failed[key] = f"{e.code}: {e}"
                log.warning("refused bundle %s: %s", key, e)
                raise from_library(e) from None
            dt = time.perf_counter() - t0
            self.metrics.adapter_load.observe(dt)
            self.failed.pop(key, None)
            adapter = self.runtime.model.adapters[key]
            cal = self.runtime.manifests[key].get("calibration") or {}
            entry = Entry(key, load_seconds=dt, labels=list(self.runtime.labels(key)), seed_dims=dict(adapter.seed_dims) if adapter.seed_dim else {},
                          temperature=float(cal.get("temperature") or 1.0), knn_threshold=cal.get("knn_threshold"))
            self.entries[key] = entry
            log.info("loaded %s in %.3f s", key, dt)
            self._gauge()
            return entry  # the caller touches it and then evicts, so the new entry is never the victim

    def unload(self, ref: AdapterRef) -> tuple[Entry, bool]:
        """Unload now, or when its images in flight are done; returns (entry, deferred)."""
        key = self.resolve(ref, any_state=True)
        if key == BASE:
            raise invalid("cannot_unload_base", "the frozen backbone ('base') is always loaded")
        entry = self.entries.get(key)
        if entry is None:
            raise not_found("not_loaded", f"adapter {key} is not loaded")
        entry.pinned = False
        if entry.inflight > 0:
            entry.unload_pending = True
            return entry, True
        self._drop(entry)
        return entry, False

    def retire(self, keys) -> None:
        """Versions the repository no longer serves (deleted, replaced by a newer one under the version
        policy): unloaded now, or when their last image in flight is done."""
        for key in keys:
            self.failed.pop(key, None)
            entry = self.entries.get(key)
            if entry is None:
                continue
            entry.pinned = False
            if entry.inflight > 0:
                entry.unload_pending = True
            else:
                self._drop(entry)
        self._gauge()

    def _drop(self, entry: Entry) -> None:
        if self.entries.get(entry.key) is not entry:
            return
        del self.entries[entry.key]
        self.runtime.unload(entry.key)
        self.on_evict(entry.key)
        log.info("unloaded %s", entry.key)
        self._gauge()

    def _evict(self) -> None:
        """Over capacity: drop least recently used, unpinned, idle entries (busy ones wait their turn)."""
        over = len(self.entries) - self.capacity
        if over <= 0:
            return
        for entry in list(self.entries.values())[:-1]:  # never the one just used
            if over <= 0:
                break
            if entry.pinned:
                continue
            if entry.inflight > 0:
                entry.unload_pending = True  # goes as soon as its last image is done
            else:
                self._drop(entry)
            over -= 1

    def _gauge(self) -> None:
        self.metrics.adapters_loaded.labels("device").set(len(self.entries))
        self.metrics.adapters_loaded.labels("pinned").set(sum(e.pinned for e in self.entries.values()))
        self.metrics.adapters_loaded.labels("store").set(self._count_store())

    def _count_store(self) -> int:
        """Adapters in the store (the repository's last scan)."""
        return len(self.repository.names())
