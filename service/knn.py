"""k-NN over each adapter's gallery: the names the routes use, over `service.galleries`.

One live FAISS index per adapter version, edited in place (`galleries.index.LiveIndex`: exact
`IndexFlatIP` up to `knn_exact_max` items, HNSW above), kept in step with the gallery store
(`galleries.manager.Galleries`: SQLite beside the store by default, PostgreSQL when
`METALORA_GALLERY_DSN` is set). Vectors are L2-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from metalora.bundle import Gallery

from .galleries.index import HNSW_EF_SEARCH, HNSW_M, GalleryEmpty, Hit, LiveIndex
from .galleries.manager import Galleries

GalleryStore = Galleries  # the service's galleries (the name this module exported before the store split)

__all__ = ["HNSW_EF_SEARCH", "HNSW_M", "GalleryEmpty", "GalleryStore", "Hit", "KnnIndex", "LiveIndex", "vote"]


class KnnIndex(LiveIndex):
    """A live index filled from a `Gallery` (N items): `KnnIndex(key, labels, gallery, dim, exact_max, source)`."""

    def __init__(self, key: str, labels: list[str], gallery: Gallery | None, dim: int, exact_max: int, source: str, background: bool = True):
        super().__init__(key, labels, dim, exact_max, source, background)
        if gallery is not None and len(gallery.ids):
            self.load(list(gallery.ids), gallery.labels.numpy().astype(np.int32), gallery.embeddings.float().numpy())


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
