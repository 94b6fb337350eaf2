"""(f) ONNX Runtime vs torch: the same mixed batch through both backends, runs alternated."""

from __future__ import annotations


def onnx_vs_torch(batch: int, rounds: int, device: str = "cpu") -> dict:
    """Images/s of both backends on the shipped store: `base` plus up to three shipped adapters mixed."""
    from metalora.backends.measure import compare_throughput
    from metalora.runtime import Runtime

    from .settings import BenchSettings

    rt = Runtime(device=device)
    keys = ["base"] + [rt.load(n) for n in rt.store.adapter_names()[:3]]
    res = compare_throughput(rt, keys, batch=batch, rounds=rounds, progress=False, cache_dir=BenchSettings().onnx_cache_dir)
    res["what"] = (
        f"batch {batch} mixing {', '.join(res['keys'])}; torch = `Runtime.run`, ORT = `OrtRunner.run` "
        f"(shared prefix graph once per batch, one tail graph per adapter), {res['threads']} threads each, "
        f"median of {rounds} alternating rounds"
    )
    return res
