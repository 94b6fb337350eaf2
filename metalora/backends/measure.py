"""Torch vs ONNX Runtime on the same batch (`metalora bench-onnx`, bench sections f and the GPU run),
and randomized in-memory adapters for measurements where a store has no trained bundles."""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters import Adapter, AdapterConfig
from .onnx import OrtRunner


def add_synthetic_adapters(runtime, n: int, fmt: str = "tr", seed: int = 0) -> list[str]:
    """Register `n` randomized adapters (all targets, 10 classes) in memory, for measurements
    where the store has no trained bundles; their B factors and mapping nets are moved off zero
    so they do real low-rank work."""
    ranks = {"lora": (8,), "cp": (8,), "tr": (2, 4, 2)}[fmt]
    gen = torch.Generator().manual_seed(seed)
    keys = []
    for i in range(n):
        ad = Adapter(runtime.backbone, AdapterConfig(fmt, ranks, ["*"], [f"c{j}" for j in range(10)])).perturb_(0.05, gen)
        ad = ad.to(runtime.device).eval()
        key = f"synthetic-{fmt}-{i}@0"
        runtime.model.add_adapter(key, ad)
        keys.append(key)
    return keys


def compare_throughput(runtime, keys: list[str], batch: int = 16, rounds: int = 7, threads: int | None = None, progress: bool = True,
                       cache_dir: str | Path | None = None) -> dict:
    """Images/s of torch (`Runtime.run`) and ORT (`OrtRunner.run`) on the same batch, runs alternated.

    Each round times one torch run and one ORT run back to back (order swapped every round), so
    both see the same machine load; the medians and their ratio are reported. ORT's graphs are
    cached in `cache_dir` (default `base.onnx_cache_dir()`).
    """
    before = torch.get_num_threads()
    threads = threads or before
    torch.set_num_threads(threads)
    try:
        return _compare(runtime, keys, batch, rounds, threads, progress, cache_dir)
    finally:
        torch.set_num_threads(before)


def _compare(runtime, keys, batch, rounds, threads, progress, cache_dir) -> dict:
    import statistics
    import time

    from tqdm import tqdm

    runner = OrtRunner(runtime, cache_dir=cache_dir, threads=threads)
    ks = [keys[i % len(keys)] for i in range(batch)]
    x = torch.rand(batch, 3, runner.input_size, runner.input_size) * 2 - 1  # (B, 3, S, S)
    for k in set(ks):
        runner.prepare(k)
    runtime.run(x, ks), runner.run(x, ks)  # warm-up: allocator, thread pools, ORT arenas
    times = {"torch": [], "onnx": []}
    fns = {"torch": lambda: runtime.run(x, ks), "onnx": lambda: runner.run(x, ks)}
    for r in tqdm(range(rounds), desc="torch vs onnx", disable=not progress):
        for name in (("torch", "onnx") if r % 2 == 0 else ("onnx", "torch")):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "device": str(runtime.device),
        "providers": runner.providers,
        "threads": threads,
        "batch": batch,
        "rounds": rounds,
        "keys": sorted(set(ks)),
        "torch_img_s": batch / med["torch"],
        "onnx_img_s": batch / med["onnx"],
        "onnx_over_torch": med["torch"] / med["onnx"],
    }
