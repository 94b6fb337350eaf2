"""(h) Low precision: images/s per precision side by side, `lowp_speedup`, `limit_fraction`, accuracy.

Run the long accuracy measurement once, resumable, in the background:

    python -m bench.lowp accuracy --state research/bench/lowp-accuracy.json > research/bench/lowp-accuracy.log 2>&1 &

Definitions (also in docs/benchmarks.md):

* `lowp_speedup` = images/s of the best low precision (int8 | bf16) whose start-up check passes /
  images/s of the FP32 ONNX Runtime backend as the issue found it (`OrtRunner`, the plain export;
  `metalora serve --precision fp32` on CPU now runs the static-pad graph, `int8_over_fp32_static`), same batch of 32 images mixing four adapters, runs
  alternated. `int8_over_fp32_static` separates the precision's own gain from the graph clean-up
  (static padding) that the `fp32` precision also gets.
* `limit_fraction` = achieved FLOP/s / peak FP32 FLOP/s of the cores the run uses. Achieved =
  images/s x FLOPs per image of the frozen backbone, counted by torch's `FlopCounterMode`
  (one multiply-add = 2 FLOPs; adapter branches excluded, they add < 1 %). Peak = cores x clock x FP32 lanes per vector x 2 (FMA) x
  FMA pipes per core, lanes counted per pipe (`peak_fp32`), or the FP32 GEMM rate measured in
  the same run where that is higher (`gemm_flop_s`: a VM reports its base clock, the cores boost).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import torch

from .common import interleaved
from .settings import BenchSettings

KEYS = ["cifar10", "mnist", "digits", "mixed"]


def _paths():
    """(ONNX graph cache, INT8 calibration set) of these runs: the shared data beside the
    checkout (BenchSettings), as the shipped adapters' accuracy figures were measured."""
    from metalora.backends.calib import CalibrationSet

    bs = BenchSettings()
    return bs.onnx_cache_dir, CalibrationSet(data=bs.data)


def backbone_flops(backbone, input_size: int) -> dict:
    """FLOPs per image of the frozen backbone (prefix; tail + head), counted by torch's
    `FlopCounterMode` (convolutions incl. depthwise and matmuls; 1 multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    bb = backbone.float().eval()
    x = torch.zeros(1, 3, input_size, input_size)  # (1, 3, S, S)
    with torch.no_grad():
        with FlopCounterMode(display=False) as f:
            h = bb.prefix(x)  # (1, C_p, H_p, W_p)
        prefix = f.get_total_flops()
        with FlopCounterMode(display=False) as f:
            bb.head(bb.tail(h))
        tail = f.get_total_flops()
    return {"prefix_flops": prefix, "tail_flops": tail, "total_flops": prefix + tail, "counted_with": "torch.utils.flop_counter.FlopCounterMode, 1 MAC = 2 FLOPs"}


def cpu_ghz(cpuinfo: str = "/proc/cpuinfo") -> tuple[float, str]:
    """Nominal clock: the GHz in the model name ('@ 2.10GHz'), else `cpu MHz`, else 2.0 (stated)."""
    text = Path(cpuinfo).read_text() if Path(cpuinfo).is_file() else ""
    m = re.search(r"model name\s*:.*@\s*([\d.]+)\s*GHz", text)
    if m:
        return float(m.group(1)), "model name"
    m = re.search(r"cpu MHz\s*:\s*([\d.]+)", text)
    if m:
        return float(m.group(1)) / 1000, "cpu MHz in /proc/cpuinfo (current clock as the guest sees it)"
    return 2.0, "not reported; 2.0 GHz assumed"


def _cpu_field(text: str, field: str) -> str | None:
    m = re.search(rf"^{field}\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else None


def peak_fp32(cores: int, flags: frozenset[str], cpuinfo: str = "/proc/cpuinfo") -> dict:
    """Peak FP32 FLOP/s = cores x GHz x FP32 lanes per FMA pipe x 2 (FMA) x FMA pipes per core.

    The lanes are those of the pipe's datapath, not of the instruction: AMD Zen 2-4 (`cpu family`
    23 and 25) run AVX-512 on two 256-bit FMA pipes (8 lanes each; AMD's "Software Optimization
    Guide for the AMD Zen4 Microarchitecture", section 2.11), Zen 5 (family 26) has two 512-bit
    pipes; Intel's Xeon Scalable (Skylake-SP and later Gold/Platinum, Sapphire/Emerald Rapids) has
    two 512-bit FMA units. Otherwise: 16 lanes with `avx512f`, 8 with AVX2+FMA, else 4, two pipes.
    A part with one 512-bit unit (some Xeon Silver/Bronze) has half this peak, so the fraction
    is a lower bound there.
    """
    ghz, src = cpu_ghz(cpuinfo)
    text = Path(cpuinfo).read_text() if Path(cpuinfo).is_file() else ""
    vendor, family = _cpu_field(text, "vendor_id"), _cpu_field(text, "cpu family")
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    why = "AVX-512" if lanes == 16 else "AVX2" if lanes == 8 else "SSE"
    if vendor == "AuthenticAMD" and family in ("23", "25") and lanes == 16:
        lanes, why = 8, f"AMD family {family} (Zen 2-4): 256-bit FMA pipes"
    units = 2
    return {
        "peak_fp32_flop_s": cores * ghz * 1e9 * lanes * 2 * units,
        "derivation": f"{cores} cores x {ghz:.2f} GHz ({src}) x {lanes} FP32 lanes ({why}) x 2 (FMA) x {units} FMA pipes",
    }


def gemm_flop_s(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """Best FP32 FLOP/s of an n x n matrix product in torch (oneDNN/MKL) on `threads` threads: the
    rate a compute-bound kernel reaches here, a measured check on `peak_fp32` (a GEMM above the
    stated peak means the clock or the pipes were counted too low)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)  # (n, n) each
        for _ in range(2):
            a @ b
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
        return best
    finally:
        torch.set_num_threads(old)


def lowp_throughput(batch: int = 32, rounds: int = 5, precisions: list[str] | None = None, threads: int | None = None, log=print) -> dict:
    """Images/s of the same mixed batch through each backend variant, runs alternated."""
    from metalora.backends.calib import check_images
    from metalora.backends.cpu import cpu_flags, cpu_info
    from metalora.backends.lowp import LowpRunner, candidates, check_precision
    from metalora.backends.onnx import OrtRunner
    from metalora.runtime import Runtime

    cache, calibration = _paths()
    threads = threads or torch.get_num_threads()
    rt = Runtime(device="cpu")
    names = [n for n in KEYS if n in rt.store.adapter_names()] or rt.store.adapter_names()[:4]
    keys = [rt.load(n) for n in names]
    precisions = precisions or candidates()
    runners = {"fp32_ort": OrtRunner(rt, cache_dir=cache, threads=threads)}
    for p in precisions:
        t0 = time.perf_counter()
        runners[p] = LowpRunner(rt, p, cache_dir=cache, threads=threads, calibration=calibration)
        runners[p].prefix()
        log(f"[lowp] {p} ready in {time.perf_counter() - t0:.1f} s")
    x = check_images(rt.preprocessor, n=batch, calibration=calibration)  # (B, 3, S, S) real photos
    xb = torch.from_numpy(x)
    ks = [keys[i % len(keys)] for i in range(len(x))]
    t = interleaved({k: (lambda r=r: r.run(xb, ks)) for k, r in runners.items()}, rounds)
    img_s = {k: len(x) / t.median(k) for k in runners}
    check = check_precision(rt, {p: runners[p] for p in precisions}, check_images(rt.preprocessor, n=16, calibration=calibration))
    low = [p for p in precisions if p != "fp32" and check[p]["pass"]]  # a precision that fails its check does not count
    best = max(low, key=lambda p: img_s[p]) if low else None
    flags = cpu_flags()
    flops = backbone_flops(rt.backbone, int(rt.preprocess_cfg.input_size))
    peak = peak_fp32(threads, flags)
    peak["gemm_flop_s"] = round(gemm_flop_s(threads))
    peak["gemm_fraction_of_peak"] = round(peak["gemm_flop_s"] / peak["peak_fp32_flop_s"], 3)
    if peak["gemm_flop_s"] > peak["peak_fp32_flop_s"]:  # the clock read is below the one the cores run at
        peak["peak_from_clock_flop_s"] = peak["peak_fp32_flop_s"]
        peak["peak_fp32_flop_s"] = peak["gemm_flop_s"]
        peak["derivation"] = (f"the measured FP32 GEMM rate, {peak['gemm_flop_s'] / 1e9:.0f} GFLOP/s, because it exceeds the peak at the clock "
                              f"read ({peak['peak_from_clock_flop_s'] / 1e9:.0f} GFLOP/s = {peak['derivation']}): the cores run above that clock")
    return {
        "what": f"batch {len(x)} real photos mixing {', '.join(keys)}; fp32_ort = OrtRunner (the plain export); "
        f"fp32/int8/bf16 = LowpRunner (prefix in that precision, tails FP32 ORT); {threads} threads; median of {rounds} alternating rounds",
        "cpu": cpu_info(),
        "threads": threads,
        "batch": len(x),
        "keys": keys,
        "keys_names": names,
        "images_per_s": {k: round(v, 2) for k, v in img_s.items()},
        "speedup_vs_fp32_ort": {k: round(t.speedup(k, "fp32_ort"), 3) for k in runners},
        "best_low_precision": best,
        "lowp_speedup": round(t.speedup(best, "fp32_ort"), 3) if best else None,
        "int8_over_fp32_static": round(t.speedup("int8", "fp32"), 3) if {"int8", "fp32"} <= set(runners) else None,
        "check": check,
        **flops,
        **peak,
        "limit_fraction": {k: round(v * flops["total_flops"] / peak["peak_fp32_flop_s"], 4) for k, v in img_s.items()},
    }


def accuracy(state: Path, precisions: list[str] | None = None, imagenet: int | None = None, per_class: int | None = None, log=print,
             adapters: list[str] | None = None) -> dict:
    """Full accuracy per precision (resumable through `state`), with drops vs FP32 and pass/fail;
    `adapters` limits the bundles (default: every one in the store), `imagenet=0` skips the ImageNet sample."""
    from metalora.backends.accuracy import accuracy_table, evaluate_precisions
    from metalora.backends.lowp import candidates
    from metalora.runtime import Runtime

    cache, calibration = _paths()
    rt = Runtime(device="cpu")
    st = evaluate_precisions(rt, precisions or candidates(), adapters=adapters, imagenet=imagenet, per_class=per_class, state_path=state, data=calibration.data,
                             log=log, threads=torch.get_num_threads(), cache_dir=cache)
    return accuracy_table(st)


def lowp_http(precision: str, concurrency: int = 32, window_s: float = 4.0, rounds: int = 2, cache_dir: Path | None = None, workdir: Path | None = None) -> dict:
    """HTTP images/s at `concurrency` on the shipped store: the ONNX backend in `precision` and in
    FP32, two real servers loaded in alternating windows (one at a time)."""
    import tempfile

    from clients.loadgen import LoadSpec, run_load_sync
    from metalora.store import DEFAULT_STORE
    from service.launch import ServerProcess

    from .common import sample_images

    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="metalora-lowp-")
    work = Path(workdir or tmp.name)
    names = [n for n in KEYS if (DEFAULT_STORE / "adapters" / n).is_dir()]
    bs = BenchSettings()  # the servers calibrate on the shared data too, and share the graph cache
    common = dict(backend="onnx", max_queue=4096, max_delay_ms=10, max_batch_size=32, log_level="warning", onnx_cache=str(cache_dir or bs.onnx_cache_dir),
                  shared=str(bs.shared), adapters=",".join(names))
    servers = {p: ServerProcess(DEFAULT_STORE, work / f"{p}.log", precision=p, **common) for p in dict.fromkeys([precision, "fp32"])}
    imgs = sample_images(16)
    res: dict[str, list[float]] = {p: [] for p in servers}
    try:
        for s in servers.values():
            s.launch()
        for s in servers.values():
            s.wait_ready(600)
        for r in range(rounds):
            for p in list(servers) if r % 2 == 0 else list(servers)[::-1]:
                spec = LoadSpec(url=servers[p].url, images=imgs, adapters={n: 1.0 for n in names}, concurrency=concurrency, duration_s=window_s, warmup_requests=2, timeout_s=120)
                rep = run_load_sync(spec)
                res[p].append(rep["images_per_s"])
    finally:
        for s in servers.values():
            s.stop()
        if tmp is not None:
            tmp.cleanup()
    med = {p: statistics.median(v) for p, v in res.items()}
    return {
        "what": f"closed-loop HTTP, 1 image per request, concurrency {concurrency}, adapters {', '.join(names)} mixed uniformly; ONNX backend, max batch 32; median of {rounds} alternating {window_s:.0f} s windows",
        "precision": precision,
        "images_per_s": {p: round(v, 2) for p, v in med.items()},
        "rounds": res,
        "over_fp32": round(med[precision] / med["fp32"], 3) if med.get("fp32") else None,
    }


def lowp_section(batch: int = 32, rounds: int = 5, http_window_s: float = 4.0, http_rounds: int = 2, accuracy_state: Path | None = None, quick: bool = False, log=print) -> dict:
    """Section (h): throughput per precision, the choice `auto` makes, HTTP at c=32, accuracy."""
    from metalora.backends.accuracy import accuracy_table
    from metalora.backends.lowp import LowpRunner, choose_precision
    from metalora.runtime import Runtime

    cache, calibration = _paths()
    out = lowp_throughput(batch, rounds, log=log)
    rt = Runtime(device="cpu")
    chosen, report = choose_precision(rt, "auto", cache_dir=cache, threads=out["threads"], calibration=calibration)
    out["auto"] = {k: report.get(k) for k in ("chosen", "checks", "prefix_img_s", "how")}
    out["limit_fraction_chosen"] = out["limit_fraction"][chosen]
    out["http"] = lowp_http(chosen, 32, http_window_s, http_rounds)
    out["http_limit_fraction"] = round(out["http"]["images_per_s"][chosen] * out["total_flops"] / out["peak_fp32_flop_s"], 4)
    # Accuracy: the full, resumable run's figures when it has finished; otherwise a small set.
    state = Path(accuracy_state) if accuracy_state else None
    # FP32 and every low precision faster than FP32 ORT (a slower one is never worth choosing:
    # BF16 without AMX runs at a fraction of FP32's speed, and its full run would take hours).
    measured = [p for p in out["images_per_s"] if p == "fp32" or (p in ("int8", "bf16") and out["speedup_vs_fp32_ort"][p] > 1)]
    sets = ["imagenet", *(rt.load(n) for n in rt.store.adapter_names())]  # every shipped adapter as name@version
    graph = {p: LowpRunner(rt, p, cache_dir=cache, calibration=calibration).tag() for p in measured}  # what evaluate_precisions records
    saved = json.loads(state.read_text()) if state is not None and state.is_file() else {}
    saved = {k: v for k, v in saved.items() if k.split("/")[0] in sets and v.get("graph") == graph.get(k.split("/")[1])}  # this graph, these bundles
    full = all(f"{s}/{p}" in saved for s in sets for p in measured)
    if full:
        out["accuracy"] = accuracy_table(saved)
        root = Path(__file__).resolve().parent.parent
        shown = state.resolve().relative_to(root) if state.resolve().is_relative_to(root) else state
        out["accuracy_set"] = f"full ({shown}; every test image of each set)"
    else:
        small = (state.parent if state else Path("research/bench")) / "lowp-accuracy-small.json"
        out["accuracy"] = accuracy(small, ["fp32", "int8"] + (["bf16"] if "bf16" in out["images_per_s"] else []), imagenet=96 if quick else 400, per_class=5 if quick else 20, log=log)
        out["accuracy_set"] = f"small ({small}); the full run: python -m bench.lowp accuracy"
    out["accuracy_pass"] = {p: all(row[p].get("pass", False) for row in out["accuracy"].values() if p in row) for p in ("int8", "bf16") if any(p in r for r in out["accuracy"].values())}  # no FP32 reference: not a pass
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["accuracy", "throughput"])
    ap.add_argument("--state", type=Path, default=Path("research/bench/lowp-accuracy.json"))
    ap.add_argument("--precisions", default=None, help="comma list; default: every precision this CPU can run")
    ap.add_argument("--imagenet", type=int, default=None)
    ap.add_argument("--per-class", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--adapters", default=None, help="accuracy: comma list of bundles (default: every one in the store)")
    a = ap.parse_args()
    precs = a.precisions.split(",") if a.precisions else None
    if a.what == "accuracy":
        res = accuracy(a.state, precs, a.imagenet, a.per_class, log=lambda s: print(s, flush=True),
                       adapters=a.adapters.split(",") if a.adapters else None)
    else:
        res = lowp_throughput(rounds=a.rounds, precisions=precs)
    print(json.dumps(res, indent=1, default=float))
