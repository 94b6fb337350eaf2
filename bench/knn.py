"""Section (d): k-NN query latency vs gallery size, exact vs approximate, with recall@10.

The indexes are the service's own choice (`service/knn.py`): `IndexFlatIP` for exact search and
`IndexHNSWFlat` with the service's `HNSW_M` / `HNSW_EF_SEARCH` above `knn_exact_max`. They are
built straight in FAISS (not through `KnnIndex`, which keeps an extra copy of the vectors) so a
1M x 1280 gallery fits in memory. Galleries are random unit vectors with class structure
(`N/100` random centres plus isotropic noise, cosine to the centre about 0.7), queries are fresh
draws from the same classes: like a real gallery, and unlike pure noise, where every item is
about equally far and "nearest" means little.
"""

from __future__ import annotations

import statistics
import time

import faiss
import numpy as np

try:  # the service's settings for its approximate index
    from service.knn import HNSW_EF_SEARCH, HNSW_M
except ImportError:  # pragma: no cover - service not installed
    HNSW_M, HNSW_EF_SEARCH = 32, 128


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    lab = rng.integers(0, len(centres), n)
    x = centres[lab] + rng.standard_normal((n, dim), dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def knn_bench(sizes=(10_000, 30_000), queries: int = 64, k: int = 10, dim: int = 1280, seed: int = 0, progress=None) -> dict:
    rng = np.random.default_rng(seed)
    rows = {}
    for n in sizes:
        centres = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
        x = clustered(n, dim, rng, centres)
        q = clustered(queries, dim, rng, centres)
        exact = faiss.IndexFlatIP(dim)
        exact.add(x)
        hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        t = time.perf_counter()
        hnsw.add(x)
        build_s = time.perf_counter() - t
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH
        del x
        te, th, recall = [], [], []
        for i in range(queries):  # one query per call, as a request searches; order alternates
            pair = [(exact, te), (hnsw, th)] if i % 2 == 0 else [(hnsw, th), (exact, te)]
            res = {}
            for index, times in pair:
                t = time.perf_counter()
                _, ids = index.search(q[i : i + 1], k)
                times.append(time.perf_counter() - t)
                res[id(index)] = ids[0]
            recall.append(len(set(res[id(exact)]) & set(res[id(hnsw)])) / k)
        rows[str(n)] = {
            "exact_ms_p50": 1e3 * statistics.median(te),
            "hnsw_ms_p50": 1e3 * statistics.median(th),
            "exact_ms_p99": 1e3 * float(np.percentile(te, 99)),
            "hnsw_ms_p99": 1e3 * float(np.percentile(th, 99)),
            "speedup_hnsw": statistics.median(a / b for a, b in zip(te, th)),
            "recall_at_10": float(np.mean(recall)),
            "hnsw_build_s": build_s,
        }
        del exact, hnsw
        if progress is not None:
            progress.update(1)
    return {
        "what": f"one query per search call, k={k}, dim={dim}, {queries} queries per size; exact IndexFlatIP vs IndexHNSWFlat(M={HNSW_M}, efSearch={HNSW_EF_SEARCH}); recall@10 of HNSW against exact",
        "faiss": faiss.__version__,
        "omp_threads": faiss.omp_get_max_threads(),
        "sizes": rows,
    }
