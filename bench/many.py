"""Section (e): many registered adapters: memory per adapter, cold-load time, and throughput when
every request names a random adapter, through the service's LRU (`service.adapters.AdapterRegistry`).

For each store size N, a serving step is one micro-batch of `batch` single-image requests, each
for an adapter drawn uniformly from the N registered ones: acquire them from the registry (a miss
loads the bundle from disk, verifying its checksums, and evicts the least recently used beyond
the LRU capacity), run the mixed batch from images, release. Steps for the different N alternate,
and each N's throughput is compared with N=smallest (everything fits the cache: all hits). Only the first N bundles of one store are drawn from, so
every N shares the same store (and the same store-scan cost).
"""

from __future__ import annotations

import asyncio
import inspect
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .common import sample_images
from .server import build_store


def many_adapters(counts=(10, 100), batch: int = 16, rounds: int = 4, capacity: int = 16, device: str = "cpu", workdir: Path | None = None, progress=None) -> dict:
    from metalora.runtime import Runtime
    from metalora.store import ModelStore
    from service.adapters import AdapterRegistry
    from service.metrics import Metrics

    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="metalora-bench-")
    work = Path(workdir or tmp.name)
    nmax = max(counts)
    names = [f"task{i:04d}" for i in range(nmax)]
    t = time.perf_counter()
    store = build_store(work / "store", {n: ("cp", (8,), 10) for n in names}, seed=900, progress=progress)
    write_s = (time.perf_counter() - t) / nmax

    # the registry's bookkeeping rescans the store on loads and evictions: time one scan
    t = time.perf_counter()
    rt_store_names = len(ModelStore(store).adapter_names())
    scan_ms = 1e3 * (time.perf_counter() - t)

    # cold load: load K adapters into one runtime, timing each (bundles just written: page cache warm)
    rt = Runtime(store, device)
    k = min(nmax, 100)
    loads = []
    for n in names[:k]:
        t = time.perf_counter()
        rt.load(n)
        loads.append(time.perf_counter() - t)
    one = rt.model.adapters[f"{names[0]}@1"]
    param_bytes = sum(p.numel() * p.element_size() for p in one.parameters())
    file_bytes = (store / "adapters" / names[0] / "1" / "weights.safetensors").stat().st_size
    del rt

    imgs = sample_images(batch)
    loop = asyncio.new_event_loop()
    setups = {}
    for n in counts:
        r = Runtime(store, device)
        x = r.preprocess(imgs)  # (batch, 3, 224, 224)
        setups[n] = (r, AdapterRegistry(r, Metrics(), capacity), x, {"hits": 0, "misses": 0})

    def step(n: int, rng: random.Random) -> None:
        r, reg, x, counts_ = setups[n]
        picks = [names[rng.randrange(n)] for _ in range(batch)]

        async def go():
            entries = []
            for p in picks:
                counts_["hits" if f"{p}@1" in reg.entries else "misses"] += 1
                entries.append(await reg.acquire(p, 1))
            return entries

        entries = loop.run_until_complete(go())
        with torch.inference_mode():
            r.run(x, [e.key for e in entries])
        for e in entries:
            reg.release(e)

    rng = random.Random(0)
    for n in counts:  # warm the caches to steady state before timing
        for _ in range(2):
            step(n, rng)
        setups[n][3].update(hits=0, misses=0)
    times: dict[int, list[float]] = {n: [] for n in counts}
    for i in range(rounds):
        for n in counts if i % 2 == 0 else reversed(counts):
            t = time.perf_counter()
            step(n, rng)
            times[n].append(time.perf_counter() - t)
        if progress is not None:
            progress.update(1)
    loop.close()
    base = min(counts)
    per = {}
    for n in counts:
        h, m = setups[n][3]["hits"], setups[n][3]["misses"]
        per[str(n)] = {
            "images_per_s": batch / statistics.median(times[n]),
            "throughput_vs_all_hits": statistics.median(b / a for a, b in zip(times[n], times[base])),
            "hit_rate": h / max(1, h + m),
        }
    setups.clear()
    if tmp is not None:
        tmp.cleanup()
    return {
        "what": f"CP rank-8 adapters (3 tail layers, 10 classes); LRU capacity {capacity}; steps of {batch} single-image requests with uniformly random adapters, mixed batch from images",
        "registered": list(counts),
        "adapter_param_bytes": param_bytes,
        "adapter_file_bytes": file_bytes,
        "cold_load_ms_p50": 1e3 * statistics.median(loads),
        "cold_load_ms_p90": 1e3 * sorted(loads)[int(0.9 * (len(loads) - 1))],
        "bundle_write_ms": 1e3 * write_s,
        "store_scan_ms": scan_ms,  # ModelStore.adapter_names() over all registered bundles
        "store_adapters": rt_store_names,
        # whether the registry's gauge update (run on every load and eviction) scans the store
        "registry_rescans_store": "adapter_names" in inspect.getsource(AdapterRegistry._gauge),
        "capacity": capacity,
        "batch": batch,
        "rounds": rounds,
        "per_store_size": per,
    }
