"""The GPU run (`bash bench/gpu.sh`): throughput on CUDA, written into docs/benchmarks.md as GPU figures.

Steps, each timed and each failure reported rather than fatal:

1. `precision`: `Runtime.run` (full model from images, channels_last) at batch 64/128/256 with 16
   mixed synthetic adapters, FP32 vs BF16 vs FP16 autocast, runs alternated.
2. `mixed`: section (b) (`bench.kernels.hetero`) at batch 64 with 1/16/64 distinct adapters vs
   HF peft grouped per adapter, under BF16 autocast.
3. `onnx`: the same mixed batch through torch and ONNX Runtime (`OrtRunner` with the CUDA
   execution provider when this onnxruntime build has it; the result says which providers ran).
4. `http`: a real `metalora serve` (torch backend, max batch 256) under closed-loop load at
   concurrency 64/128/256.

`--tiny` shrinks every size so the whole script's logic runs on a CPU in about a minute (the
test suite does that); figures from such a run are marked as CPU dry-run figures, never GPU ones.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from .common import interleaved, machine, sample_images

BEGIN, END = "<!-- gpu-figures:begin -->", "<!-- gpu-figures:end -->"
FULL = dict(batches=(64, 128, 256), adapters=16, mixes=(1, 16, 64), mixed_batch=64, onnx_batch=64, concurrencies=(64, 128, 256), window_s=8.0, rounds=3, max_batch=256)
TINY = dict(batches=(4, 8), adapters=2, mixes=(1, 2), mixed_batch=4, onnx_batch=4, concurrencies=(2, 4), window_s=1.0, rounds=2, max_batch=8)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: str, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def precision_step(device: str, sizes: dict) -> dict:
    from metalora.backends.measure import add_synthetic_adapters
    from metalora.runtime import Runtime

    rt = Runtime(device=device)
    keys = add_synthetic_adapters(rt, sizes["adapters"], "cp")
    dtypes = {k: v for k, v in DTYPES.items() if torch.device(device).type == "cuda" or k != "fp16"}  # no fp16 autocast gain on CPU
    out: dict = {"dtypes": list(dtypes), "adapters": len(keys), "images_per_s": {}, "speedup_vs_fp32": {}}
    for b in sizes["batches"]:
        x = torch.rand(b, 3, rt.preprocess_cfg.input_size, rt.preprocess_cfg.input_size, device=device) * 2 - 1  # (B, 3, S, S)
        ks = [keys[i % len(keys)] for i in range(b)]

        def fn(dt):
            def run():
                with torch.inference_mode(), _autocast(device, dt):
                    rt.run(x, ks)

            return run

        t = interleaved({k: fn(dt) for k, dt in dtypes.items()}, sizes["rounds"], device=device)
        out["images_per_s"][str(b)] = {k: round(b / t.median(k), 1) for k in dtypes}
        out["speedup_vs_fp32"][str(b)] = {k: round(t.speedup(k, "fp32"), 3) for k in dtypes}
    return out


def mixed_step(device: str, sizes: dict) -> dict:
    from . import kernels

    dt = torch.bfloat16
    with _autocast(device, dt):
        res = kernels.hetero(sizes["mixed_batch"], sizes["rounds"], sizes["mixes"], device, with_images=False, loop_mixes=())
    return {"autocast": "bf16", "hetero_ratio_cp": res.get("hetero_ratio_cp"), "vs_peft_lora": res.get("vs_peft_lora"), "samples_per_s": res.get("samples_per_s")}


def onnx_step(device: str, sizes: dict) -> dict:
    from metalora.backends.measure import add_synthetic_adapters, compare_throughput
    from metalora.runtime import Runtime

    from .settings import BenchSettings

    rt = Runtime(device=device)
    keys = add_synthetic_adapters(rt, min(4, sizes["adapters"]), "cp")
    return compare_throughput(rt, keys, batch=sizes["onnx_batch"], rounds=sizes["rounds"], progress=False, cache_dir=BenchSettings().onnx_cache_dir)


def http_step(device: str, sizes: dict, work: Path) -> dict:
    from clients.loadgen import LoadSpec, run_load_sync
    from service.launch import ServerProcess

    from .server import build_store

    store = build_store(work / "store", {f"gpu-cp-{i}": ("cp", (8,), 10) for i in range(4)}, seed=700)
    imgs = sample_images(16)
    srv = ServerProcess(store, work / "server.log", device=device, backend="torch", max_batch_size=sizes["max_batch"], max_queue=8192, max_delay_ms=5, log_level="warning")
    out: dict = {"backend": "torch", "max_batch_size": sizes["max_batch"], "window_s": sizes["window_s"], "sweep": {}}
    with srv:
        for c in sizes["concurrencies"]:
            rep = run_load_sync(LoadSpec(url=srv.url, images=imgs, adapters={f"gpu-cp-{i}": 1.0 for i in range(4)}, concurrency=c, duration_s=sizes["window_s"], warmup_requests=2, timeout_s=120))
            out["sweep"][str(c)] = {"images_per_s": rep["images_per_s"], "p50_s": rep["latency_s"]["p50"], "p99_s": rep["latency_s"]["p99"], "errors": rep["errors"], "ok": rep["ok"]}
    return out


def run_gpu(device: str = "cuda", tiny: bool = False, steps: str = "precision,mixed,onnx,http", log=print) -> dict:
    """Every step in turn; a failed step is recorded with its error and the rest still run."""
    sizes = TINY if tiny else FULL
    res: dict = {
        "kind": "cpu-dry-run" if torch.device(device).type != "cuda" else "gpu",
        "device": device,
        "machine": machine(),
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "errors": {},
    }
    fns = {"precision": precision_step, "mixed": mixed_step, "onnx": onnx_step, "http": None}
    with tempfile.TemporaryDirectory(prefix="metalora-gpu-") as tmp:
        for name in steps.split(","):
            t0 = time.perf_counter()
            log(f"[gpu] {name} ...")
            try:
                res[name] = http_step(device, sizes, Path(tmp)) if name == "http" else fns[name](device, sizes)
                res[name]["elapsed_s"] = round(time.perf_counter() - t0, 1)
            except Exception as e:  # reported, never silently dropped
                res["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
                log(f"[gpu] {name} FAILED: {e}")
    return res


def gpu_markdown(res: dict, json_path: str) -> str:
    """The GPU block of docs/benchmarks.md, between the BEGIN/END markers."""
    gpu = res["kind"] == "gpu"
    title = "## GPU figures" if gpu else "## GPU figures (CPU dry run of bench/gpu.sh: not GPU figures)"
    m = res["machine"]
    L = [BEGIN, title, "", f"`bash bench/gpu.sh` → `{json_path}`; started {res['started']} on {m.get('gpu', m['cpu'])}, torch {m['torch']}."]
    if not gpu:
        L.append("This block comes from the script's tiny-size dry run on a CPU (`--tiny`); no GPU was available to measure.")
    p = res.get("precision")
    if p:
        L += ["", "| batch | " + " | ".join(f"{d} img/s" for d in p["dtypes"]) + " | " + " | ".join(f"{d}/fp32" for d in p["dtypes"] if d != "fp32") + " |"]
        L.append("|---" * (1 + 2 * len(p["dtypes"]) - 1) + "|")
        for b, row in p["images_per_s"].items():
            L.append(f"| {b} | " + " | ".join(f"{row[d]:.1f}" for d in p["dtypes"]) + " | " + " | ".join(f"{p['speedup_vs_fp32'][b][d]:.2f}" for d in p["dtypes"] if d != "fp32") + " |")
    mx = res.get("mixed")
    if mx and mx.get("vs_peft_lora"):
        L += ["", "Mixed adapters (BF16 autocast), ours vs HF peft grouped per adapter: " + ", ".join(f"{k} adapters ×{v:.2f}" for k, v in mx["vs_peft_lora"].items())]
    o = res.get("onnx")
    if o:
        L += ["", f"ONNX Runtime ({', '.join(o['providers'])}) vs torch, batch {o['batch']}: {o['onnx_img_s']:.1f} vs {o['torch_img_s']:.1f} img/s (×{o['onnx_over_torch']:.2f})."]
    h = res.get("http")
    if h:
        L += ["", "| concurrency | images/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
        for c, r in h["sweep"].items():
            L.append(f"| {c} | {r['images_per_s']:.1f} | {1e3 * r['p50_s']:.1f} | {1e3 * r['p99_s']:.1f} | {sum(r['errors'].values()) if isinstance(r['errors'], dict) else r['errors']} |")
    if res["errors"]:
        L += ["", "Failed steps: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in res["errors"].items())]
    L.append(END)
    return "\n".join(L) + "\n"


def write_block(doc: Path, block: str) -> None:
    """Put the GPU block into `doc`, replacing an earlier one; the rest of the file is kept."""
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        text = text[:a] + block.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    doc.write_text(text if text.endswith("\n") else text + "\n")


def kept_block(doc: Path) -> str:
    """The GPU block already in `doc` ("" if none), for the CPU report to carry over."""
    text = doc.read_text() if doc.is_file() else ""
    if BEGIN in text and END in text:
        return text[text.index(BEGIN) : text.index(END) + len(END)] + "\n"
    return ""


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="The GPU benchmark steps (bench/gpu.sh).")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: the script's logic on a CPU")
    ap.add_argument("--steps", default="precision,mixed,onnx,http")
    ap.add_argument("--json", type=Path, default=Path("research/bench/gpu.json"))
    ap.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    a = ap.parse_args()
    res = run_gpu(a.device, a.tiny, a.steps, log=lambda s: print(s, flush=True))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1, default=float) + "\n")
    write_block(a.doc, gpu_markdown(res, str(a.json)))
    print(gpu_markdown(res, str(a.json)))
    raise SystemExit(1 if res["errors"] else 0)
