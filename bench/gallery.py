"""Section (g): gallery writes at scale — single-PUT latency, batch insert rate, k-NN while writing.

Measured through the service's own write path (`service.galleries.Galleries.put`: commit to the
store, then the in-place FAISS edit), without HTTP, on the embedded SQLite store and on a private
PostgreSQL server (Debian's `postgresql`; skipped with a reason when absent). Galleries are the
clustered unit vectors of section (d) at the service's embedding size (1280), seeded through the
store's one-time import as a bundle's gallery would be; the index kind follows the service's
rule (HNSW above `exact_max`).

- put: `puts` single-item PUTs (new ids and replacements alternating), latency p50/p99.
- batch: `batches` x `batch_size` new items, items/s over the whole run.
- during writes: one thread replaces and deletes items in batches of 100 while the main thread
  runs single k-NN queries; latency p99 and recall@10 against an exact numpy search over the
  bench's own record of the gallery (updated before each write, so a query may count as a miss
  an item of a batch not yet applied: the recall is, if anything, understated).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .knn import clustered

LABELS = [f"c{i}" for i in range(10)]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _galleries(store, dim: int, exact_max: int, seed_vectors: np.ndarray):
    """The service's Galleries over `store`, with one gallery 'bench@1' seeded from `seed_vectors`."""
    from service.galleries import Seed
    from service.galleries.manager import Galleries

    n = len(seed_vectors)

    class BenchGalleries(Galleries):
        def bundle_source(self, key):  # the seed a bundle's gallery.safetensors would give
            return LABELS, lambda: Seed([f"s{j}" for j in range(n)], [LABELS[j % len(LABELS)] for j in range(n)], seed_vectors, "bundle")

    return BenchGalleries(None, store, dim, exact_max)


def _one_size(store_factory, n: int, dim: int, exact_max: int, puts: int, batches: int, batch_size: int, during: bool, queries: int, rng) -> dict:
    from service.galleries import Item

    centres = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
    x = clustered(n, dim, rng, centres)  # (n, D) unit rows
    t = time.perf_counter()
    g = _galleries(store_factory(), dim, exact_max, x)
    index = g.get("bench@1")
    row: dict = {"items": n, "index": index.kind, "seed_import_and_load_s": round(time.perf_counter() - t, 2)}
    extra = clustered(puts + batches * batch_size, dim, rng, centres)
    lat = []
    for i in range(puts):  # alternate: a new id, a replacement of a seed item
        item = Item(f"p{i}" if i % 2 == 0 else f"s{rng.integers(n)}", LABELS[i % len(LABELS)], extra[i])
        t = time.perf_counter()
        g.put("bench@1", [item])
        lat.append(time.perf_counter() - t)
    row["put_ms_p50"], row["put_ms_p99"] = 1e3 * statistics.median(lat), 1e3 * _pct(lat, 99)
    t = time.perf_counter()
    for b in range(batches):
        vs = extra[puts + b * batch_size : puts + (b + 1) * batch_size]
        g.put("bench@1", [Item(f"b{b}-{j}", LABELS[j % len(LABELS)], v) for j, v in enumerate(vs)])
    row["batch_size"] = batch_size
    row["batch_items_per_s"] = batches * batch_size / (time.perf_counter() - t)
    if during:
        row.update(_during_writes(g, index, centres, queries, rng))
    index.wait_compaction(600)
    row["compactions"] = index.compactions
    g.close()
    return row


def _during_writes(g, index, centres: np.ndarray, queries: int, rng) -> dict:
    """k-NN latency and recall@10 while another thread replaces and deletes items in batches of 100."""
    from service.galleries import Item

    index.wait_compaction(600)
    names, labs, ref = index.items()  # the bench's own record: row r is item names[r]; dead rows masked
    n, dim = ref.shape
    alive = np.ones(n, dtype=bool)
    lock, stop, writes = threading.Lock(), threading.Event(), [0]
    wrng = np.random.default_rng(123)

    def writer():
        while not stop.is_set():
            rows = wrng.choice(n, 100, replace=False)
            new = clustered(50, dim, wrng, centres)
            with lock:  # record first: a query may then miss an item not yet applied, never count a stale one
                ref[rows[:50]] = new
                gone = [names[r] for r in rows[50:].tolist() if alive[r]]
                alive[rows[:50]] = True
                alive[rows[50:]] = False
            g.put("bench@1", [Item(names[r], LABELS[r % len(LABELS)], v) for r, v in zip(rows[:50].tolist(), new)])
            if gone:
                g.delete("bench@1", gone)
            writes[0] += 1

    q = clustered(queries, dim, rng, centres)
    th = threading.Thread(target=writer, daemon=True)
    th.start()
    lat, recall = [], []
    try:
        for i in range(queries):
            t = time.perf_counter()
            hits = index.search(q[i : i + 1], 10)[0]
            lat.append(time.perf_counter() - t)
            with lock:
                s = ref @ q[i]
                s[~alive] = -np.inf
                truth = {names[r] for r in np.argpartition(-s, 10)[:10].tolist()}
            recall.append(len({h.id for h in hits} & truth) / 10)
    finally:
        stop.set()
        th.join()
    return {"knn_ms_p99_during_writes": 1e3 * _pct(lat, 99), "knn_ms_p50_during_writes": 1e3 * statistics.median(lat), "recall_at_10_during_writes": float(np.mean(recall)), "write_batches_during_knn": writes[0]}


def gallery_bench(sizes=(10_000, 100_000), dim: int = 1280, exact_max: int = 50_000, puts: int = 200, batches: int = 10, batch_size: int = 1000, queries: int = 100, postgres: bool = True, seed: int = 0, log=print) -> dict:
    """Section (g) as a dict; the top-level keys the targets read are filled by `bench.run`."""
    from service.galleries import EmbeddedStore

    out: dict = {"sizes": list(sizes), "dim": dim, "exact_max": exact_max, "stores": {}}
    with tempfile.TemporaryDirectory(prefix="metalora-gbench-") as tmp:
        cluster = None
        try:
            if postgres:
                from service.galleries.pgcluster import PostgresCluster, find_bindir

                if find_bindir() is None:
                    out["stores"]["postgres"] = {"skipped": "PostgreSQL server binaries absent (apt-get install postgresql)"}
                else:
                    cluster = PostgresCluster().init().start()
            for kind in ["embedded", "postgres"]:
                if kind == "postgres" and cluster is None:
                    continue
                rows = {}
                for n in sizes:
                    rng = np.random.default_rng(seed + n)
                    if kind == "embedded":
                        d = Path(tmp) / f"emb-{n}"
                        factory = lambda d=d: EmbeddedStore(d)  # noqa: E731
                    else:
                        import psycopg

                        from service.galleries.postgres import PostgresStore

                        db = f"bench_{n}"
                        with psycopg.connect(cluster.dsn, autocommit=True) as c:
                            c.execute(f"DROP DATABASE IF EXISTS {db}")
                            c.execute(f"CREATE DATABASE {db}")
                        dsn = cluster.dsn.rsplit("/", 1)[0] + "/" + db
                        factory = lambda dsn=dsn: PostgresStore(dsn, timeout_s=10)  # noqa: E731
                    log(f"[bench] (g) {kind} gallery of {n} items ...")
                    rows[str(n)] = _one_size(factory, n, dim, exact_max, puts, batches, batch_size, during=(n == max(sizes)), queries=queries, rng=rng)
                out["stores"][kind] = rows
        finally:
            if cluster is not None:
                cluster.__exit__(None, None, None)
    emb = out["stores"]["embedded"]
    top = str(max(sizes))
    out["put_p99_ms_largest"] = emb[top]["put_ms_p99"]
    out["put_p99_size"] = max(sizes)
    out["batch_items_per_s"] = min(r["batch_items_per_s"] for r in emb.values())
    out["recall_at_10_during_writes"] = emb[top]["recall_at_10_during_writes"]
    out["knn_ms_p99_during_writes"] = emb[top]["knn_ms_p99_during_writes"]
    return out
