"""The service's galleries: one live FAISS index per loaded adapter version, kept in step with the store.

Every write goes to the store first (committed, fsync'ed or in PostgreSQL) and is then applied to
the live index; the answer goes out after both. Changes are applied in seq order under a lock
per gallery: a change that skips ahead of the index's cursor first fetches the gap from the
store, so own writes, other replicas' writes (through `AbstractStore.follow`) and catch-ups
after a reconnect interleave without losing or reordering anything, and the last writer by seq
wins everywhere.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file

from metalora.bundle import Gallery, load_gallery, read_manifest, verify_files
from metalora.refs import AdapterRef
from metalora.store import ModelStore, safe_join

from ..errors import DomainError, conflict, invalid, not_found, unavailable
from .index import GalleryEmpty, LiveIndex, normalise
from .store import AbstractStore, Change, Item, Seed, StoreReadOnly, StoreUnavailable, UnknownItems

log = logging.getLogger("metalora.galleries")


class Galleries:
    """Live indexes of the galleries in `store`; `get`, `put`, `delete` block (call them off the event loop).

    Errors are `DomainError`s: UNAVAILABLE `gallery_unavailable` (with a retry hint) when the store
    is down, CONFLICT `gallery_read_only` when it cannot be written here, NOT_FOUND `unknown_item`,
    INVALID `unknown_label` / `invalid_vector` / `duplicate_id`, CONFLICT `bad_gallery` / `gallery_empty`.
    """

    def __init__(self, models: ModelStore, store: AbstractStore, dim: int, exact_max: int, legacy_dir: Path | None = None, retry_after_s: int = 1):
        self.models, self.store, self.dim, self.exact_max = models, store, dim, exact_max
        self.legacy_dir, self.retry_after_s = (Path(legacy_dir) if legacy_dir else None), retry_after_s
        self.indexes: dict[str, LiveIndex] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._apply_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        store.follow(self.on_change, lambda: list(self.indexes))

    # ------------------------------------------------------------------ loading
    def legacy_path(self, key: str) -> Path | None:
        """Where the previous release wrote a whole edited gallery; imported once as the seed if present."""
        if self.legacy_dir is None:
            return None
        name, version = AdapterRef.split(key)
        return safe_join(self.legacy_dir, name) / f"{version}.safetensors"

    def get(self, key: str) -> LiveIndex:
        """The live index of an adapter version, opened from the store on first use."""
        index = self.indexes.get(key)
        if index is not None:
            return index
        with self._lock:
            loading = self._loading[key]
        with loading:
            if key in self.indexes:
                return self.indexes[key]
            index = self._open(key)
            with self._lock:
                self.indexes[key] = index
        if self.store.shared:  # writes of other replicas between the snapshot and now
            try:
                self.on_change(key, None)
            except DomainError as e:
                log.warning("catch-up of %s after loading failed (%s); the listener will retry", key, e.message)
        return index

    def _open(self, key: str) -> LiveIndex:
        labels, seed = self.bundle_source(key)
        snap = self._call(self.store.open, key, self.dim, seed)
        pos = {lab: j for j, lab in enumerate(labels)}
        idx = [pos.get(lab, -1) for lab in snap.labels]
        if -1 in idx:
            raise conflict("bad_gallery", f"{key}: the gallery store holds labels the adapter does not have ({snap.labels[idx.index(-1)]!r})")
        index = LiveIndex(key, labels, self.dim, self.exact_max, snap.source)
        index.threshold = self.knn_threshold(key)
        index.load(snap.ids, np.asarray(idx, dtype=np.int32), snap.vectors)
        index.cursor = snap.cursor
        if snap.seeded:
            log.info("gallery %s: imported %d seed items into the store", key, len(snap.ids))
        return index

    def knn_threshold(self, key: str) -> float | None:
        """The bundle's calibrated k-NN "unknown" threshold (manifest `calibration`), None without one
        (or without a model store: galleries opened by the benchmarks)."""
        if self.models is None:
            return None
        return (read_manifest(self.models.resolve(key)[2]).get("calibration") or {}).get("knn_threshold")

    def bundle_source(self, key: str) -> tuple[list[str], Callable[[], Seed | None]]:
        """(the adapter's labels, a function reading its seed gallery) from the model store."""
        name, version, path = self.models.resolve(key)
        manifest = read_manifest(path)
        labels: list[str] = manifest["adapter"]["labels"]

        def seed() -> Seed | None:
            legacy, source = self.legacy_path(key), "edited"
            if legacy is not None and legacy.is_file():
                try:
                    g = Gallery.from_tensors(load_file(str(legacy)))
                except (SafetensorError, OSError) as e:
                    raise conflict("bad_gallery", f"edited gallery {legacy} cannot be read ({e})") from None
            else:
                verify_files(path, manifest)  # the gallery is read without load_bundle: check its sha256 here
                g, source = load_gallery(path, manifest), "bundle"
            if g is None:
                return None
            if g.embeddings.shape[0] and g.embeddings.shape[1] != self.dim:
                raise conflict("bad_gallery", f"{key}: gallery vectors have dim {g.embeddings.shape[1]}, the adapter embeds to {self.dim}")
            idx = g.labels.tolist()
            if any(not 0 <= j < len(labels) for j in idx):
                raise conflict("bad_gallery", f"{key}: gallery label indices outside the adapter's {len(labels)} labels")
            return Seed(list(g.ids), [labels[j] for j in idx], normalise(g.embeddings.float().numpy()), source)

        return labels, seed

    def drop(self, key: str) -> None:
        """Forget the live index (the adapter was evicted); the store keeps the items."""
        with self._lock:
            self.indexes.pop(key, None)

    # ------------------------------------------------------------------ writes
    def check_items(self, index: LiveIndex, items: list[Item]) -> None:
        seen: set[str] = set()
        for n, it in enumerate(items):
            where = f"items[{n}]: " if len(items) > 1 else ""
            if it.id in seen:
                raise invalid("duplicate_id", f"{where}id {it.id!r} appears twice in one request")
            seen.add(it.id)
            if it.label not in index.labels:
                raise invalid("unknown_label", f"{where}label {it.label!r} is not one of {index.key}'s {len(index.labels)} labels")
            if it.vector.shape != (self.dim,):
                raise invalid("invalid_vector", f"{where}vector must have {self.dim} finite numbers, not all zero")
        v = np.stack([it.vector for it in items]) if items else np.zeros((0, self.dim), np.float32)  # (N, D)
        bad = ~(np.isfinite(v).all(1) & (np.abs(v).sum(1) > 0))
        if bad.any():
            n = int(np.flatnonzero(bad)[0])
            where = f"items[{n}]: " if len(items) > 1 else ""
            raise invalid("invalid_vector", f"{where}vector must have {self.dim} finite numbers, not all zero")

    def put(self, key: str, items: list[Item]) -> tuple[LiveIndex, list[bool]]:
        """Add or replace items, all or none; returns the index and, per item, whether its id was new."""
        index = self.get(key)
        items = [Item(it.id, it.label, np.asarray(it.vector, dtype=np.float32).reshape(-1)) for it in items]
        self.check_items(index, items)
        created = [it.id not in index for it in items]
        changes = self._call(self.store.put, key, items)
        self._apply(key, changes)
        return index, created

    def delete(self, key: str, ids: list[str]) -> LiveIndex:
        """Delete items, all or none (404 `unknown_item` naming the ids that are not there)."""
        index = self.get(key)
        if len(set(ids)) != len(ids):
            raise invalid("duplicate_id", "an id appears twice in one request")
        try:
            changes = self._call(self.store.delete, key, ids)
        except UnknownItems as e:
            shown = ", ".join(repr(i) for i in e.ids[:5])
            raise not_found("unknown_item", f"{key} has no gallery item {shown}") from None
        self._apply(key, changes)
        return index

    # ------------------------------------------------------------------ keeping in step
    def on_change(self, key: str, seq: int | None) -> None:
        """The store says gallery `key` has changes up to `seq` (None: unknown, look): catch up."""
        index = self.indexes.get(key)
        if index is None or (seq is not None and seq <= index.cursor):
            return
        with self._apply_locks[key]:
            if seq is not None and seq <= index.cursor:
                return
            self._apply_changes(index, self._call(self.store.changes, key, index.cursor))

    def _apply(self, key: str, changes: list[Change]) -> None:
        index = self.indexes.get(key)
        if index is None or not changes:
            return
        with self._apply_locks[key]:
            if changes[0].seq > index.cursor + 1:  # someone else committed first: their changes go before ours
                self._apply_changes(index, self._call(self.store.changes, key, index.cursor, changes[0].seq - 1))
            self._apply_changes(index, [c for c in changes if c.seq > index.cursor])

    def _apply_changes(self, index: LiveIndex, changes: list[Change]) -> None:
        """Apply changes in seq order (caller holds the gallery's apply lock)."""
        if not changes:
            return
        last: dict[str, Change] = {}
        for c in changes:  # the newest change of an id decides it
            last.pop(c.id, None)
            last[c.id] = c
        pos = {lab: j for j, lab in enumerate(index.labels)}
        ups, dels = [], []
        for c in last.values():
            if c.deleted or c.label not in pos:
                if not c.deleted:
                    log.warning("gallery %s: change %d has unknown label %r; treated as a delete", index.key, c.seq, c.label)
                dels.append(c.id)
            else:
                ups.append((c.id, pos[c.label], c.vector))
        index.apply(ups, dels)
        index.cursor = changes[-1].seq
        index.source = "edited"

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except StoreUnavailable as e:
            raise unavailable("gallery_unavailable", f"{e}; try again shortly", self.retry_after_s) from None
        except StoreReadOnly as e:
            raise conflict("gallery_read_only", f"gallery edits are off: {e}") from None

    def close(self) -> None:
        self.store.close()


__all__ = ["Galleries", "GalleryEmpty"]
