"""Section (c): end to end over HTTP against the in-process model, and micro-batching on vs off.

Two real `metalora serve` processes on loopback (torch backend, CPU unless told otherwise): one
with `max_batch_size=32`, one with `max_batch_size=1`. Rounds alternate three windows: the
in-process model on a batch of 32 preprocessed images with the same adapter mix, then closed-loop
HTTP load at concurrency 32 on each server. Only one of them runs at a time. The load generator
runs in this process, so it shares the CPU with the server, as a co-located client would.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clients.loadgen import LoadSpec, run_load_sync

from .common import sample_images
from .server import ServerProcess, build_store

ADAPTERS = {"svc-cp-a": ("cp", (8,), 10), "svc-cp-b": ("cp", (8,), 10), "svc-tr": ("tr", (4, 4, 4), 10), "svc-lora": ("lora", (8,), 10)}


def _inproc_images_per_s(runtime, x: torch.Tensor, keys: list[str], calls: int, device) -> float:
    from .common import sync

    runtime.run(x, keys)
    sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        runtime.run(x, keys)
    sync(device)
    return calls * x.shape[0] / (time.perf_counter() - t)


def serving(concurrencies=(1, 4, 16, 32, 64), window_s: float = 4.0, rounds: int = 3, batch: int = 32, device: str = "cpu", workdir: Path | None = None, progress=None) -> dict:
    from metalora.runtime import Runtime

    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="metalora-bench-")
    work = Path(workdir or tmp.name)
    store = build_store(work / "store", ADAPTERS, seed=500)
    imgs = sample_images(16)
    mix = {a: 1.0 for a in ADAPTERS}
    common = dict(device=device, backend="torch", max_queue=4096, max_delay_ms=10, warmup="true", log_level="warning")
    on = ServerProcess(store, work / "on.log", max_batch_size=batch, **common)
    off = ServerProcess(store, work / "off.log", max_batch_size=1, **common)
    out: dict = {
        "what": f"closed-loop HTTP load, 1 image per request, adapters mixed uniformly over {len(ADAPTERS)}; in-process = Runtime.run on a batch of {batch} preprocessed images (decode excluded) with the same mix",
        "batch": batch,
        "device": device,
        "window_s": window_s,
        "rounds": rounds,
        "backend": "torch",
    }
    try:
        on.launch()
        off.launch()
        on.wait_ready()
        off.wait_ready()
        rt = Runtime(store, device)
        keys = [rt.load(a) for a in ADAPTERS]
        pre = [rt.preprocess([b]) for b in imgs]
        x = torch.cat([pre[i % len(pre)] for i in range(batch)])  # (batch, 3, 224, 224)
        rng = random.Random(0)
        mixed = [rng.choice(keys) for _ in range(batch)]

        def load(server, c, secs):
            spec = LoadSpec(url=server.url, images=imgs, adapters=mix, concurrency=c, duration_s=secs, warmup_requests=2, timeout_s=120)
            return run_load_sync(spec)

        sweep = {}
        for c in concurrencies:
            sweep[c] = load(on, c, window_s)
            if progress is not None:
                progress.update(1)
        small = max(1, batch // 4)
        paired = []
        n0, s0 = on.metric_sum("metalora_batch_size_count"), on.metric_sum("metalora_batch_size_sum")
        for r in range(rounds):
            with torch.inference_mode():
                ip = _inproc_images_per_s(rt, x, mixed, 2, device)
                ip_small = _inproc_images_per_s(rt, x[:small], mixed[:small], 2 * batch // small, device)  # same image count
            a = load(on, 32, window_s)
            b = load(off, 32, window_s)
            paired.append({"inproc_images_per_s": ip, "inproc_small_images_per_s": ip_small, "http_on_c32": a, "http_off_c32": b})
            if progress is not None:
                progress.update(1)
        n1, s1 = on.metric_sum("metalora_batch_size_count"), on.metric_sum("metalora_batch_size_sum")
        out["server_mean_batch_c32"] = (s1 - s0) / max(1.0, n1 - n0)
        out["inproc_small_batch"] = small
        with torch.inference_mode():
            out["inproc_batch1_images_per_s"] = _inproc_images_per_s(rt, x[:1], mixed[:1], 6, device)
        eff = [p["http_on_c32"]["images_per_s"] / p["inproc_images_per_s"] for p in paired]
        strict = [p["http_on_c32"]["images_per_s"] / max(p["inproc_images_per_s"], p["inproc_small_images_per_s"]) for p in paired]
        out["serving_efficiency_c32_vs_best_inproc"] = statistics.median(strict)
        out["inproc_small_images_per_s_median"] = statistics.median(p["inproc_small_images_per_s"] for p in paired)
        mb = [p["http_on_c32"]["images_per_s"] / max(p["http_off_c32"]["images_per_s"], 1e-9) for p in paired]
        out.update(
            {
                "serving_efficiency_c32": statistics.median(eff),
                "serving_efficiency_c32_rounds": eff,
                "microbatch_speedup_c32": statistics.median(mb),
                "microbatch_speedup_c32_rounds": mb,
                "sweep": {
                    str(c): {
                        "images_per_s": rep["images_per_s"],
                        "p50_s": rep["latency_s"]["p50"],
                        "p90_s": rep["latency_s"]["p90"],
                        "p99_s": rep["latency_s"]["p99"],
                        "errors": rep["errors"],
                        "ok": rep["ok"],
                    }
                    for c, rep in sweep.items()
                },
                "rounds_detail": [
                    {
                        "inproc_images_per_s": p["inproc_images_per_s"],
                        "on": {k: p["http_on_c32"][k] for k in ("images_per_s", "latency_s", "errors", "ok")},
                        "off": {k: p["http_off_c32"][k] for k in ("images_per_s", "latency_s", "errors", "ok")},
                    }
                    for p in paired
                ],
            }
        )
        out["inproc_images_per_s_median"] = statistics.median(p["inproc_images_per_s"] for p in paired)
    finally:
        on.stop()
        off.stop()
        if tmp is not None:
            tmp.cleanup()
    return out
