"""A gallery's FAISS index, edited in place: add, replace and delete cost O(1) in the gallery size.

Why not `IndexIDMap2.remove_ids`: FAISS removes from a flat index by shifting every later vector
and then rebuilds the id map, O(N·D) per delete (21 ms at 200k x 128 here, about a second at
1M x 1280). Instead every vector keeps the position it was added at; a delete clears that
position's bit in an `alive` bitmap, a replace clears the old bit and appends the new vector.
Searches pass the bitmap to FAISS as an `IDSelectorBitmap`: the flat scan skips dead positions
(still exact) and HNSW keeps routing through dead nodes but never returns them (FAISS's filtered
search; no over-fetch that could come back short). When dead positions pass a share of the
index, or the size crosses `exact_max` (flat <-> HNSW), a background thread rebuilds a compact
index from a snapshot while searches and writes go on; writes made meanwhile are journalled and
replayed on the new index before it is swapped in.

Concurrency: one readers-writer lock per index. Searches share it; a write holds it for one
FAISS add (microseconds for flat, about a millisecond per vector for HNSW). Compaction reads the
old index in chunks under the shared lock and holds the exclusive lock only for the final swap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np

log = logging.getLogger("metalora.galleries")

HNSW_M = 32  # graph degree: the usual default, good recall at modest memory
HNSW_EF_SEARCH = 128
COMPACT_DEAD_SHARE = 0.2  # rebuild once a fifth of the positions are dead
COMPACT_MIN_DEAD = 1024  # ... and at least this many (tiny galleries are not worth a thread)
_CHUNK = 16_384  # rows read from the old index per shared-lock hold while compacting
_REPLAY_TAIL = 32  # journal entries replayed under the write lock at the end of a compaction
MERGE_SLICE_S = 0.005  # the delta -> HNSW merge holds the write lock about this long per slice
MERGE_PAUSE_S = 0.001  # ... and then lets waiting searches and writes in
MERGE_MIN = 2048  # delta size that starts a merge: scanning this many vectors exactly costs a search little


@dataclass
class Hit:
    id: str
    label: str
    score: float


class GalleryEmpty(LookupError):
    pass


class RWLock:
    """Many readers or one writer; a waiting writer stops new readers (no writer starvation)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    def acquire_read(self):
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    @contextmanager
    def read(self):
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self):
        self.acquire_write()
        try:
            yield
        finally:
            self.release_write()


def normalise(v: np.ndarray) -> np.ndarray:
    """(N, D) float32 rows scaled to unit L2 norm (a fresh contiguous copy)."""
    v = np.array(v, dtype=np.float32, order="C", copy=True)
    if v.size:
        faiss.normalize_L2(v)
    return v


def _new_index(kind: str, dim: int) -> faiss.Index:
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index
    return faiss.IndexFlatIP(dim)


class _Positions:
    """Per-position bookkeeping of one FAISS index: id, label index and alive bit; grows by doubling."""

    def __init__(self, capacity: int = 1024):
        self.n = 0  # positions used (alive or dead)
        self.ids: list[str] = []  # position -> item id
        self.labels = np.zeros(capacity, dtype=np.int32)  # (capacity,)
        self.alive = np.zeros((capacity + 7) // 8, dtype=np.uint8)  # bit p = position p is live (little-endian bits)
        self.pos: dict[str, int] = {}  # live id -> position
        self.dead = 0

    def _grow(self, need: int) -> None:
        cap = len(self.labels)
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        labels = np.zeros(cap, dtype=np.int32)
        labels[: self.n] = self.labels[: self.n]
        alive = np.zeros((cap + 7) // 8, dtype=np.uint8)
        alive[: len(self.alive)] = self.alive
        self.labels, self.alive = labels, alive

    def append(self, item_id: str, label: int) -> int:
        """A new position for the item; an older position of the same id dies."""
        self.kill(item_id)
        self._grow(self.n + 1)
        p = self.n
        self.n += 1
        self.ids.append(item_id)
        self.labels[p] = label
        self.alive[p >> 3] |= np.uint8(1 << (p & 7))
        self.pos[item_id] = p
        return p

    def kill(self, item_id: str) -> bool:
        p = self.pos.pop(item_id, None)
        if p is None:
            return False
        self.alive[p >> 3] &= np.uint8(~(1 << (p & 7)) & 0xFF)
        self.dead += 1
        return True

    def alive_mask(self) -> np.ndarray:
        return np.unpackbits(self.alive, bitorder="little")[: self.n].astype(bool)  # (n,)


class LiveIndex:
    """One adapter version's gallery in memory: ids, labels, vectors in a FAISS index edited in place.

    Positions [0, m) live in the main index (flat, or HNSW above `exact_max`); with HNSW, new
    vectors first go to a small exact `delta` index (positions [m, n)), because one HNSW insert
    at D=1280 costs about a millisecond and a batch of 1000 would hold the write lock, and every
    search, for a second. A background merge moves the delta into the graph a few vectors per
    lock hold (`MERGE_SLICE_S`), so a search or a write never waits longer than one slice.
    Searches query both and merge by score; the delta is searched exactly.

    `cursor` is the store's change sequence number this index has applied up to (see
    `service.galleries.store`); the caller advances it. Vectors are L2-normalised on the way in, so
    inner product is cosine similarity. Raises `GalleryEmpty` when searching an empty gallery.
    """

    def __init__(self, key: str, labels: list[str], dim: int, exact_max: int, source: str = "none", background: bool = True):
        self.key, self.labels, self.dim, self.exact_max, self.source = key, list(labels), dim, exact_max, source
        self.background = background
        self.threshold: float | None = None  # the manifest's calibration.knn_threshold: nearest cosine below it -> unknown
        self.cursor = 0
        self._lock = RWLock()
        self._p = _Positions()
        self.index = _new_index("flat", dim)
        self.kind = "flat"
        self.delta: faiss.IndexFlatIP | None = None  # HNSW only: positions [m, n) not yet in the graph
        self.m = 0
        self._journal: list[tuple[str, str, int, np.ndarray | None]] | None = None  # writes during a compaction
        self._worker: threading.Thread | None = None
        self._job_lock = threading.Lock()  # one background job (merge or compaction) at a time
        self.compactions = 0
        self._sel = None  # (IDSelectorBitmap, the bitmap it points into, n) for the current positions

    # ------------------------------------------------------------------ reads
    def is_unknown(self, hits: list[Hit]) -> bool | None:
        """True when the nearest hit is below the threshold; None without a threshold or hits."""
        if self.threshold is None or not hits:
            return None
        return hits[0].score < self.threshold

    def __len__(self) -> int:
        return len(self._p.pos)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._p.pos

    @property
    def dead(self) -> int:
        return self._p.dead

    @property
    def pending_merge(self) -> int:
        return self._p.n - self.m if self.delta is not None else 0

    def label_counts(self) -> dict[str, int]:
        with self._lock.read():
            p = self._p
            counts = np.bincount(p.labels[: p.n][p.alive_mask()], minlength=len(self.labels))
        return {self.labels[j]: int(c) for j, c in enumerate(counts) if c}

    def _vectors(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, D) stored vectors of positions [start, stop) (caller holds a lock)."""
        parts = []
        if start < self.m:
            parts.append(self.index.reconstruct_n(start, min(stop, self.m) - start))
        if stop > self.m and self.delta is not None:
            lo = max(start, self.m)
            parts.append(self.delta.reconstruct_n(lo - self.m, stop - lo))
        return np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.zeros((0, self.dim), np.float32))

    def items(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, label indices (N,), normalised vectors (N, D)) of the live items, in position order."""
        with self._lock.read():
            p = self._p
            mask = p.alive_mask()
            vecs = self._vectors(0, p.n)[mask]
            ids = [i for i, m in zip(p.ids, mask) if m]
            return ids, p.labels[: p.n][mask].astype(np.int64), vecs

    def get(self, item_id: str) -> tuple[str, np.ndarray] | None:
        """(label, normalised vector (D,)) of one live item, or None."""
        with self._lock.read():
            pos = self._p.pos.get(item_id)
            if pos is None:
                return None
            return self.labels[self._p.labels[pos]], self._vectors(pos, pos + 1)[0]

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """queries (Q, D) any norm -> for each, up to k live items by descending cosine similarity."""
        q = normalise(np.atleast_2d(queries))  # (Q, D)
        with self._lock.read():
            p = self._p
            live = len(p.pos)
            if not live:
                raise GalleryEmpty(self.key)
            k = min(k, live)
            scores, pos = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
            if self.m:
                params = None
                if p.dead:
                    sel = self._selector()
                    params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(HNSW_EF_SEARCH, k)) if self.kind == "hnsw" else faiss.SearchParameters(sel=sel)
                elif self.kind == "hnsw" and k > HNSW_EF_SEARCH:
                    params = faiss.SearchParametersHNSW(efSearch=k)
                scores, pos = self.index.search(q, min(k, self.m), params=params)  # (Q, k) each; -1 where fewer found
            if self.delta is not None and p.n > self.m:
                nd = p.n - self.m
                bits = np.packbits(p.alive_mask()[self.m :], bitorder="little")  # the delta's alive bits, from 0
                ds, dp = self.delta.search(q, min(k, nd), params=faiss.SearchParameters(sel=faiss.IDSelectorBitmap(nd, faiss.swig_ptr(bits))))
                dp = np.where(dp >= 0, dp + self.m, -1)
                scores, pos = np.concatenate([scores, ds], 1), np.concatenate([pos, dp], 1)  # (Q, <=2k)
                scores = np.where(pos >= 0, scores, -np.inf)
                top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
                scores, pos = np.take_along_axis(scores, top, 1), np.take_along_axis(pos, top, 1)
            ids, labels, names = p.ids, p.labels, self.labels
            return [[Hit(ids[j], names[labels[j]], float(s)) for s, j in zip(srow, prow) if j >= 0] for srow, prow in zip(scores.tolist(), pos.tolist())]

    def _selector(self):
        """An IDSelectorBitmap over the alive bits (a new wrapper only when the bitmap changed size)."""
        p = self._p
        if self._sel is None or self._sel[1] is not p.alive or self._sel[2] != p.n:
            self._sel = (faiss.IDSelectorBitmap(p.n, faiss.swig_ptr(p.alive)), p.alive, p.n)
        return self._sel[0]

    # ------------------------------------------------------------------ writes
    def load(self, ids: list[str], labels: Iterable[int], vectors: np.ndarray) -> None:
        """Fill an empty index in one go (N ids, N label indices, (N, D) vectors)."""
        vecs = normalise(vectors.reshape(len(ids), self.dim))
        labs = np.asarray(labels, dtype=np.int32)
        kind = "hnsw" if len(ids) > self.exact_max else "flat"
        index = _new_index(kind, self.dim)
        p = _Positions(max(1024, len(ids)))
        for item_id, lab in zip(ids, labs.tolist()):  # a later duplicate wins, as a replace would
            p.append(item_id, lab)
        if len(ids):
            index.add(vecs)
        with self._lock.write():
            if self._p.n:
                raise RuntimeError("load() is for an empty index")
            self.index, self._p, self.kind, self._sel, self.m = index, p, kind, None, p.n
            self.delta = faiss.IndexFlatIP(self.dim) if kind == "hnsw" else None

    def apply(self, upserts: list[tuple[str, int, np.ndarray]] = (), deletes: Iterable[str] = ()) -> list[bool]:
        """Add or replace items (id, label index, vector (D,)) and delete ids, all under one write lock.

        Returns, per upsert, whether the id was new. Unknown ids in `deletes` are ignored (the
        store decides what exists). Order: deletes first, then upserts.
        """
        vecs = normalise(np.stack([v for _, _, v in upserts]).reshape(len(upserts), self.dim)) if upserts else None
        with self._lock.write():
            for d in deletes:
                self._p.kill(d)
                if self._journal is not None:
                    self._journal.append(("del", d, 0, None))
            created = []
            if upserts:
                for (item_id, lab, _), v in zip(upserts, vecs):
                    created.append(item_id not in self._p.pos)
                    self._p.append(item_id, lab)
                    if self._journal is not None:
                        self._journal.append(("put", item_id, lab, v))
                if self.delta is not None:
                    self.delta.add(vecs)
                else:
                    self.index.add(vecs)
                    self.m = self._p.n
        self.maybe_work()
        return created

    # ------------------------------------------------------------------ background work
    def wants_compaction(self) -> bool:
        p = self._p
        live = len(p.pos)
        if p.dead >= COMPACT_MIN_DEAD and p.dead >= COMPACT_DEAD_SHARE * p.n:
            return True
        return (self.kind == "flat" and live > self.exact_max) or (self.kind == "hnsw" and live <= self.exact_max // 2)

    def maybe_work(self) -> None:
        if not (self.wants_compaction() or self.pending_merge >= MERGE_MIN) or (self._worker and self._worker.is_alive()):
            return
        if self.background:
            self._worker = threading.Thread(target=self._work, name=f"gallery-{self.key}", daemon=True)
            self._worker.start()
        else:
            self._work()

    def _work(self) -> None:
        while True:
            if self.wants_compaction():
                self.compact()
            elif self.pending_merge >= MERGE_MIN:
                self.merge()
            else:
                return

    def wait_compaction(self, timeout: float | None = None) -> None:
        """Wait for the background merge/compaction running now (tests and benchmarks); a delta
        below `MERGE_MIN` stays where it is (it is searched exactly)."""
        t = self._worker
        if t is not None:
            t.join(timeout)

    def merge(self) -> None:
        """Move the delta into the HNSW graph, a slice at a time, each slice under the write lock."""
        with self._job_lock:
            chunk = 8
            while self.delta is not None and self._p.n > self.m:
                t = time.perf_counter()
                with self._lock.write():
                    if self.delta is None:
                        break
                    c = min(chunk, self._p.n - self.m)
                    self.index.add(self.delta.reconstruct_n(0, c))
                    self.delta.remove_ids(faiss.IDSelectorRange(0, c))  # O(delta): shifts the rest down
                    self.m += c
                    if self._p.dead:
                        self._sel = None
                spent = time.perf_counter() - t
                chunk = int(min(4096, max(1, chunk * MERGE_SLICE_S / max(spent, 1e-6))))  # aim at one slice per hold
                time.sleep(MERGE_PAUSE_S)  # let waiting searches and writes in

    def compact(self) -> None:
        """Rebuild a dense index of the live items (flat or HNSW by size) and swap it in.

        Searches and writes continue while the new index is built; writes made meanwhile are
        journalled and replayed onto it, and only the last few are replayed under the write lock.
        """
        with self._job_lock:
            with self._lock.write():
                p = self._p
                n0, mask, self._journal = p.n, p.alive_mask(), []
                ids0, labels0 = p.ids[:n0], p.labels[:n0].copy()
            live = int(mask.sum())
            kind = "hnsw" if live > self.exact_max else "flat"
            try:
                index, q = _new_index(kind, self.dim), _Positions(max(1024, live))
                for start in range(0, n0, _CHUNK):  # positions < n0 never change: read them in chunks
                    stop = min(n0, start + _CHUNK)
                    with self._lock.read():
                        block = self._vectors(start, stop)
                    keep = mask[start:stop]
                    for j in np.flatnonzero(keep):
                        q.append(ids0[start + j], int(labels0[start + j]))
                    if keep.any():
                        index.add(np.ascontiguousarray(block[keep]))
                done = 0
                while True:  # replay the journal, the tail under the write lock
                    with self._lock.read():
                        pending = len(self._journal)
                    if pending - done > _REPLAY_TAIL:
                        done = _replay(index, q, self._journal, done, pending)
                        continue
                    with self._lock.write():
                        _replay(index, q, self._journal, done, len(self._journal))
                        self.index, self._p, self.kind, self._sel, self._journal, self.m = index, q, kind, None, None, q.n
                        self.delta = faiss.IndexFlatIP(self.dim) if kind == "hnsw" else None
                        break
            except BaseException:
                with self._lock.write():
                    self._journal = None
                raise
            self.compactions += 1
            log.info("compacted gallery %s: %d live items, %s index", self.key, live, kind)

    def compact_now(self) -> None:
        """Compact in the calling thread (tests), whatever the dead share."""
        self.wait_compaction()
        self.compact()


def _replay(index, q: _Positions, journal: list, start: int, stop: int) -> int:
    adds: list[np.ndarray] = []
    for op, item_id, lab, v in journal[start:stop]:  # deletes take no position, so adds can go in one call
        if op == "del":
            q.kill(item_id)
        else:
            q.append(item_id, lab)
            adds.append(v)
    if adds:
        index.add(np.stack(adds))
    return stop
