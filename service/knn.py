"""k-NN over each adapter's gallery with FAISS: one index per adapter@version.

Vectors are L2-normalised, so inner product is cosine similarity. Galleries up to
`exact_max` items use an exact `IndexFlatIP`; larger ones an HNSW graph (approximate, much
faster per query). The bundle's `gallery.safetensors` is never modified, so its manifest
checksums stay valid: edits (add/remove) are written as a whole new gallery file under
`<gallery_dir>/<name>/<version>.safetensors` (temp file + fsync + os.replace, so a crash leaves
either the old or the new file), and that file takes precedence over the bundle's on load.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metalora.bundle import Gallery, load_gallery, read_manifest, verify_files
from metalora.store import ModelStore, safe_join

from .errors import ServiceError

HNSW_M = 32  # graph degree: the usual default, good recall at modest memory
HNSW_EF_SEARCH = 128


@dataclass
class Hit:
    id: str
    label: str
    score: float


class KnnIndex:
    """One adapter version's gallery and its FAISS index (rebuilt on every edit)."""

    def __init__(self, key: str, labels: list[str], gallery: Gallery | None, dim: int, exact_max: int, source: str):
        self.key, self.labels, self.dim, self.exact_max, self.source = key, labels, dim, exact_max, source
        if gallery is None:
            gallery = Gallery(torch.zeros(0, dim), torch.zeros(0, dtype=torch.long), [])
        if gallery.embeddings.shape[0] and gallery.embeddings.shape[1] != dim:
            raise ServiceError(409, "bad_gallery", f"{key}: gallery vectors have dim {gallery.embeddings.shape[1]}, the adapter embeds to {dim}")
        self.label_idx = gallery.labels.numpy().astype(np.int64)  # (N,)
        self.ids = list(gallery.ids)
        self._build(_normalise(gallery.embeddings.float().numpy()))  # (N, D)

    @property
    def vectors(self) -> np.ndarray:
        """(N, D) normalised vectors, read back from FAISS's own storage: no second copy is kept,
        which would double the memory of a large gallery."""
        n = len(self.ids)
        return self.index.reconstruct_n(0, n) if n else np.zeros((0, self.dim), dtype=np.float32)

    def _build(self, vectors: np.ndarray) -> None:
        n = len(self.ids)
        if n > self.exact_max:
            index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = HNSW_EF_SEARCH
            self.kind = "hnsw"
        else:
            index = faiss.IndexFlatIP(self.dim)
            self.kind = "flat"
        if n:
            index.add(vectors)
        self.index = index

    def __len__(self) -> int:
        return len(self.ids)

    def gallery(self) -> Gallery:
        return Gallery(torch.from_numpy(self.vectors), torch.from_numpy(self.label_idx.copy()), list(self.ids))

    def label_index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise ServiceError(422, "unknown_label", f"label {label!r} is not one of {self.key}'s {len(self.labels)} labels") from None

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """queries (Q, D) -> for each, up to k hits by descending cosine similarity."""
        if not len(self.ids):
            raise ServiceError(409, "gallery_empty", f"{self.key} has no gallery items; add some with PUT /v1/adapters/{{name}}/gallery/{{id}}")
        q = _normalise(np.ascontiguousarray(queries, dtype=np.float32))  # (Q, D)
        scores, idx = self.index.search(q, min(k, len(self.ids)))  # (Q, k) each
        return [
            [Hit(self.ids[j], self.labels[self.label_idx[j]], float(s)) for s, j in zip(srow, irow) if j >= 0]
            for srow, irow in zip(scores.tolist(), idx.tolist())
        ]

    def with_item(self, item_id: str, label: int, vector: np.ndarray) -> tuple["KnnIndex", bool]:
        """A copy with the item added (or replaced when the id exists); returns (index, created)."""
        vec = _normalise(vector.reshape(1, -1).astype(np.float32))
        ids, vecs, labs = list(self.ids), self.vectors, self.label_idx.copy()  # vectors: already a fresh copy
        created = item_id not in ids
        if created:
            ids.append(item_id)
            vecs = np.concatenate([vecs, vec])
            labs = np.concatenate([labs, [label]])
        else:
            j = ids.index(item_id)
            vecs[j], labs[j] = vec[0], label
        return self._copy(ids, vecs, labs), created

    def without_item(self, item_id: str) -> "KnnIndex":
        if item_id not in self.ids:
            raise ServiceError(404, "unknown_item", f"{self.key} has no gallery item {item_id!r}")
        j = self.ids.index(item_id)
        keep = np.ones(len(self.ids), dtype=bool)
        keep[j] = False
        return self._copy([i for i in self.ids if i != item_id], self.vectors[keep], self.label_idx[keep])

    def _copy(self, ids, vecs, labs) -> "KnnIndex":
        g = Gallery(torch.from_numpy(np.ascontiguousarray(vecs)), torch.from_numpy(np.asarray(labs, dtype=np.int64)), ids)
        return KnnIndex(self.key, self.labels, g, self.dim, self.exact_max, "edited")


def _normalise(v: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float32)
    if v.size:
        faiss.normalize_L2(v)
    return v


class GalleryStore:
    """Loads each adapter version's gallery (edited copy first, else the bundle's) and persists edits."""

    def __init__(self, store: ModelStore, root: Path, dim: int, exact_max: int):
        self.store, self.root, self.dim, self.exact_max = store, Path(root), dim, exact_max
        self.indexes: dict[str, KnnIndex] = {}
        self._lock = threading.Lock()  # get/persist run on worker threads

    def edited_path(self, key: str) -> Path:
        name, version = key.split("@", 1)
        return safe_join(self.root, name) / f"{version}.safetensors"

    def get(self, key: str) -> KnnIndex:
        """The index for a loaded-or-not adapter version (blocking: call off the event loop)."""
        with self._lock:
            if key not in self.indexes:
                self.indexes[key] = self._open(key)
            return self.indexes[key]

    def _open(self, key: str) -> KnnIndex:
        name, version, path = self.store.resolve(key)
        manifest = read_manifest(path)
        labels = manifest["adapter"]["labels"]
        edited = self.edited_path(key)
        if edited.is_file():
            try:
                g = Gallery.from_tensors(load_file(str(edited)))
            except (SafetensorError, OSError) as e:
                raise ServiceError(409, "bad_gallery", f"edited gallery {edited} cannot be read ({e})") from None
            return KnnIndex(key, labels, g, self.dim, self.exact_max, "edited")
        verify_files(path, manifest)  # the gallery is read without load_bundle: check its sha256 here
        g = load_gallery(path, manifest)
        return KnnIndex(key, labels, g, self.dim, self.exact_max, "bundle" if g is not None else "none")

    def persist(self, index: KnnIndex) -> None:
        """Write the whole gallery atomically, then make it the live index."""
        dest = self.edited_path(index.key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        try:
            save_file(index.gallery().to_tensors(), tmp, metadata={"adapter": index.key, "schema": "metalora-gallery/1"})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            with self._lock:
                os.replace(tmp, dest)
                self.indexes[index.key] = index
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def drop(self, key: str) -> None:
        self.indexes.pop(key, None)


def vote(hits: list[Hit]) -> tuple[str | None, dict[str, int]]:
    """(label, counts): the similarity-weighted vote, the same rule as `metalora.evaluate`, so the
    served label is the one the bundle's reported k-NN accuracy was measured with."""
    votes = Counter(h.label for h in hits)
    if not votes:
        return None, {}
    sims: dict[str, float] = {}
    for h in hits:
        sims[h.label] = sims.get(h.label, 0.0) + h.score
    best = max(sims, key=lambda lab: (sims[lab], votes[lab]))
    return best, dict(votes.most_common())
