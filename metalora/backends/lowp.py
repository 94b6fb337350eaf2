"""Low-precision CPU inference of the shared frozen prefix: ONNX Runtime static INT8 and torch BF16.

The frozen prefix runs once per batch for every adapter, so it is where lower precision pays
(efficientnet_lite0: `blocks[:6]`, 87 % of the model's FLOPs, at the default cut; `blocks[:5]`,
63 %, and `blocks[:4]`, 41 %, in a store cut there); the per-adapter tail graphs, and the frozen
bridge blocks that take later-cut adapters' rows from an earlier cut to theirs (`OrtRunner.bridge`),
stay FP32. Precisions:

* `fp32`: the prefix graph with TF "SAME" padding made static for the fixed input size (timm's
  `Conv2dSame` pads from the runtime shape; the traced graph then keeps Shape/Ceil/Pad chains
  that ORT can neither fold nor fuse into the Conv). Same numbers as the torch prefix (max abs
  diff 0), measured ~1.5x faster than `OrtRunner`'s graph on this project's CPU.
* `int8`: that graph quantised with ORT's own tools (`quant_pre_process`, then
  `quantize_static` in QDQ format, MinMax calibration over a few hundred real images
  preprocessed by the project's `Preprocessor`; `quantize`, and `calib` for which images: the
  caller's `CalibrationSet`). ORT's CPU EP fuses the QDQ pairs into QLinearConv (MLAS u8s8
  kernels, VNNI where the CPU has it).
* `bf16`: the torch prefix under `torch.autocast("cpu", bfloat16)` with channels_last (oneDNN);
  offered only where /proc/cpuinfo lists `avx512_bf16` or `amx_bf16`.
* `auto`: the fastest precision whose start-up accuracy check passes (`choose_precision`),
  the result cached by model hash + CPU flags + library versions.

Nothing here assumes a CPU feature: `cpu.cpu_flags()` reads /proc/cpuinfo at run time. Graphs
and the `auto` decision are cached in the caller's `cache_dir` (default `base.onnx_cache_dir()`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .base import onnx_cache_dir
from .calib import CalibrationSet, calibration_digest, calibration_images, calibration_sources, check_images, photos_held_out
from .cpu import BF16_FLAGS, VNNI_FLAGS, cpu_flags, cpu_info
from .export import export_static_bridge, export_static_prefix, graph_digest
from .onnx import OrtRunner
from .quantize import QuantConfig, quantize_prefix

PRECISIONS = ("auto", "fp32", "int8", "bf16")

# Start-up accuracy check (`check_precision`): on a fixed batch of CHECK_IMAGES (32) real images (half held-out
# photos, half digit glyphs), the low-precision pipeline's base (ImageNet head) top-1 must agree
# with FP32 on at least this share of images and the mean cosine of its embeddings to FP32's must
# reach this. Measured here: bf16 0.9985 / 1.0; int8 with the stem and blocks 0-1 in FP32 (the
# default) 0.997 / 1.0; int8 throughout 0.983 / 0.81 (fails: it lost 4.7 points of k-NN top-1
# on digits). See docs/benchmarks.md ("Low precision").
CHECK_MIN_AGREEMENT = 0.9
CHECK_MIN_COSINE = 0.99


def unavailable(precision: str, flags: frozenset[str] | None = None) -> str | None:
    """Why `precision` cannot run here, or None when it can."""
    flags = cpu_flags() if flags is None else flags
    if precision not in PRECISIONS:
        return f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
    if precision == "bf16" and not any(f in flags for f in BF16_FLAGS):
        return f"bf16 needs one of the CPU flags {', '.join(BF16_FLAGS)}; this CPU reports none"
    if precision in ("fp32", "int8"):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return f"{precision} runs on onnxruntime, which is not installed"
    return None


def refused(precision: str, backend: str, device) -> str | None:
    """Why a resolved `backend` ("torch" | "onnx") on `device` cannot serve `precision`, or None.

    The one rule the server's pre-flight (`service.cli.preflight`) and its backend factory
    (`service.engine.make_backend`) both apply: int8/bf16 are the ONNX backend's CPU paths.
    """
    import torch

    if precision in ("auto", "fp32"):
        return None
    if backend == "torch":
        return f"--precision {precision} runs on the onnx backend (metalora.backends.lowp); the torch backend is fp32: use --backend onnx or --precision fp32"
    if torch.device(device).type != "cpu":
        return f"--precision {precision} is a CPU path; on {device} use --precision auto or fp32"
    why = unavailable(precision)
    return f"--precision {precision}: {why}" if why else None


def candidates(flags: frozenset[str] | None = None) -> list[str]:
    """The concrete precisions this CPU can run, FP32 first."""
    return [p for p in ("fp32", "int8", "bf16") if unavailable(p, flags) is None]


# ------------------------------------------------------------------------------------ the runner
class _TorchBF16Prefix:
    """The torch prefix under CPU BF16 autocast, with an ORT session's `run` call shape."""

    def __init__(self, backbone):
        self.backbone = copy.deepcopy(backbone).float().cpu().eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(self, _outputs, feed: dict) -> list[np.ndarray]:
        x = torch.from_numpy(feed["image"]).contiguous(memory_format=torch.channels_last)  # (N, 3, S, S)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.backbone.prefix(x)  # (N, C_p, H_p, W_p) bf16
        return [h.float().contiguous().numpy()]


class LowpRunner(OrtRunner):
    """`OrtRunner` with the shared prefix in a chosen precision (fp32 | int8 | bf16); tails FP32.

    Same `run(x, keys) -> Output` as `OrtRunner`. Graphs are cached in the ONNX cache directory
    under names that carry the prefix's content hash, the quantisation config and the calibration
    set's digest, so a restart reuses them.
    """

    def __init__(self, runtime, precision: str = "fp32", quant: QuantConfig | None = None, calibration: CalibrationSet | None = None, **kw):
        super().__init__(runtime, **kw)
        why = unavailable(precision)
        if precision == "auto":
            why = "resolve `auto` with choose_precision() first"
        if why:
            raise ValueError(why)
        self.precision = precision
        self.quant = quant or QuantConfig()
        self.calibration = calibration or CalibrationSet()  # int8 only: the images it calibrates on
        if precision == "int8" and not any(f in cpu_flags() for f in VNNI_FLAGS):
            # ORT's u8s8 kernels on AVX2/AVX-512 without VNNI can saturate intermediate sums
            # (ONNX Runtime's quantisation docs, "reduce_range"); `auto` checks accuracy at start.
            warnings.warn(f"int8 on a CPU without VNNI ({', '.join(VNNI_FLAGS)}): slower and possibly less accurate; --precision auto measures and checks it", stacklevel=2)

    def static_prefix_path(self) -> Path:
        digest = graph_digest(self.runtime.backbone, None, self.input_size, "prefix-static")
        return self.cached(f"{self.runtime.backbone.identity.name}-prefix-static-{digest}.onnx")

    def int8_prefix_path(self, calib_digest: str) -> Path:
        import onnxruntime as ort

        tag = hashlib.sha256(f"{self.static_prefix_path().name}|{self.quant.digest()}|{calib_digest}|{ort.__version__}".encode()).hexdigest()[:16]
        return self.cached(f"{self.runtime.backbone.identity.name}-prefix-int8-{tag}.onnx")

    def _ensure_static(self) -> Path:
        path = self.static_prefix_path()
        if not path.exists():
            export_static_prefix(self.runtime.backbone, path, self.input_size)
        return path

    def _ensure_int8(self) -> Path:
        fp32 = self._ensure_static()
        digest = calibration_digest(calibration_sources(self.quant.calib_images, self.calibration), self.calibration.data)
        path = self.int8_prefix_path(digest)
        if not path.exists():
            calib, _ = calibration_images(self.runtime.preprocessor, self.quant.calib_images, self.calibration)
            quantize_prefix(fp32, path, calib, self.quant)
        return path

    def prefix_graph(self) -> Path | None:
        """The prefix graph this precision runs (None for bf16, which runs torch)."""
        return {"fp32": self._ensure_static, "int8": self._ensure_int8}.get(self.precision, lambda: None)()

    def tag(self) -> str:
        """What this runner computes with: the precision, and for int8 the quantised graph's file
        name (it hashes the quantisation config, the calibration set and the ORT version)."""
        return f"int8 {self.prefix_graph().name}" if self.precision == "int8" else self.precision

    def bridge(self, start: int, stop: int):
        """The frozen blocks[start:stop] for rows of adapters cut after the prefix: FP32 in every
        precision (static pads, as the fp32 prefix), so only the shared prefix is quantised."""
        with self._lock:
            if (start, stop) not in self._bridges:
                digest = graph_digest(self.runtime.backbone.at_cut(start), None, self.input_size, f"bridge-static:{start}:{stop}")
                path = self.cached(f"{self.runtime.backbone.identity.name}-bridge-static-{start}-{stop}-{digest}.onnx")
                if not path.exists():
                    export_static_bridge(self.runtime.backbone, start, stop, path, self.input_size)
                self._bridges[(start, stop)] = self.ort.InferenceSession(str(path), self.options, providers=self.providers)
            return self._bridges[(start, stop)]

    def prefix(self):
        with self._lock:
            if self._prefix is None:
                if self.precision == "bf16":
                    self._prefix = _TorchBF16Prefix(self.runtime.backbone)
                else:
                    self._prefix = self.ort.InferenceSession(str(self.prefix_graph()), self.options, providers=self.providers)
            return self._prefix

    def features(self, x: np.ndarray) -> np.ndarray:
        """Prefix features (N, C_p, H_p, W_p) float32 of preprocessed images (N, 3, S, S)."""
        return self.prefix().run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]


# ------------------------------------------------------------------------------------ choosing
def base_outputs(runtime, feats: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (N, D) and ImageNet logits (N, 1000) of the frozen tail on prefix features: what
    the start-up check and the accuracy runs compare across precisions."""
    bb = runtime.backbone
    with torch.inference_mode():
        h = torch.from_numpy(feats).to(next(bb.parameters()).dtype)  # (N, C_p, H_p, W_p)
        emb = bb.tail(h)  # (N, D)
        return emb.float(), bb.head(emb).float()  # (N, D), (N, 1000)


def check_precision(runtime, runners: dict[str, LowpRunner], x: np.ndarray, reference: str = "fp32") -> dict:
    """Each precision against FP32 on one fixed batch: base top-1 agreement and embedding cosine."""
    ref_emb, ref_logits = base_outputs(runtime, runners[reference].features(x))
    out = {}
    for name, r in runners.items():
        emb, logits = base_outputs(runtime, r.features(x))
        agree = float((logits.argmax(1) == ref_logits.argmax(1)).float().mean())
        cos = float(torch.nn.functional.cosine_similarity(emb, ref_emb, dim=1).mean())
        out[name] = {"agreement": round(agree, 4), "cosine": round(cos, 5), "pass": agree >= CHECK_MIN_AGREEMENT and cos >= CHECK_MIN_COSINE}
    return out


def time_prefixes(runners: dict[str, LowpRunner], x: np.ndarray, rounds: int = 3) -> dict[str, float]:
    """Images/s of each runner's prefix on `x`, runs alternated (order reversed every round)."""
    names = list(runners)
    for n in names:
        runners[n].features(x)  # warm-up: sessions, arenas, oneDNN primitives
    t: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            runners[n].features(x)
            t[n].append(time.perf_counter() - t0)
    return {n: len(x) / statistics.median(v) for n, v in t.items()}


def choose_precision(runtime, precision: str = "auto", cache_dir: Path | None = None, threads: int | None = None,
                     calibration: CalibrationSet | None = None, log=None) -> tuple[str, dict]:
    """`auto` -> the fastest precision here whose accuracy check passes; others are validated.

    The decision (check and timing) is cached as JSON keyed by the prefix graph's content hash,
    the quantisation config and calibration source, the CPU model and flags, the thread count and
    the torch/onnxruntime versions; a cache hit costs nothing.
    Returns (precision, report).
    """
    if precision != "auto":
        why = unavailable(precision)
        if why:
            raise ValueError(why)
        return precision, {"chosen": precision, "how": "asked for"}
    import onnxruntime as ort

    cache_dir = Path(cache_dir) if cache_dir else onnx_cache_dir()
    calibration = calibration or CalibrationSet()
    info = cpu_info()
    key = hashlib.sha256(
        json.dumps(
            [graph_digest(runtime.backbone, None, int(runtime.preprocess_cfg.input_size), "prefix"), QuantConfig().digest(), calibration_digest(calibration_sources(QuantConfig().calib_images, calibration), calibration.data), str(calibration.data), info["model"], sorted(cpu_flags()), torch.__version__, ort.__version__, threads]
        ).encode()
    ).hexdigest()[:16]
    path = cache_dir / f"precision-auto-{key}.json"
    try:
        rep = json.loads(path.read_text())
        if rep["chosen"] in ("fp32", "int8", "bf16") and unavailable(rep["chosen"]) is None:
            return rep["chosen"], {**rep, "how": "cached"}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent, unreadable or cut short: decide again
    threads = threads or torch.get_num_threads()
    cands = candidates()
    skipped = {}
    if "int8" in cands and not photos_held_out(calibration):
        # Checked on digit glyphs alone, int8 could not be trusted on photos, so `auto` leaves it
        # out (an explicit --precision int8 still runs).
        cands.remove("int8")
        skipped["int8"] = "no held-out photos to check it on (no shared data, and METALORA_CALIBRATION_DATA unset or under 4 images)"
    runners = {p: LowpRunner(runtime, p, cache_dir=cache_dir, threads=threads, calibration=calibration) for p in cands}
    x = check_images(runtime.preprocessor, calibration=calibration)
    checks = check_precision(runtime, runners, x)
    speed = time_prefixes({p: r for p, r in runners.items() if checks[p]["pass"]}, x)
    chosen = max(speed, key=speed.get)
    rep = {"chosen": chosen, "checks": checks, "skipped": skipped, "prefix_img_s": {k: round(v, 1) for k, v in speed.items()}, "cpu": info, "threads": threads}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rep, indent=1) + "\n")
        os.replace(tmp, path)  # atomic: a second server starting meanwhile reads all of it or nothing
    except OSError as e:  # a read-only cache: the decision is not kept, the next start measures again
        warnings.warn(f"precision auto: could not cache the decision in {path.parent}: {e}", stacklevel=2)
    if log:
        log(f"precision auto -> {chosen} ({rep['prefix_img_s']})")
    return chosen, {**rep, "how": "measured"}


def create_lowp_backend(runtime, precision: str = "auto", threads: int | None = None, cache_dir: Path | None = None,
                        calibration: CalibrationSet | None = None) -> LowpRunner:
    """A LowpRunner over the runtime in `precision` (auto resolved by `choose_precision`), graphs
    and the decision cached in `cache_dir`, int8 calibrated on `calibration`."""
    threads = threads or torch.get_num_threads()
    chosen, report = choose_precision(runtime, precision, cache_dir=cache_dir, threads=threads, calibration=calibration)
    runner = LowpRunner(runtime, chosen, cache_dir=cache_dir, threads=threads, calibration=calibration)
    runner.precision_report = report
    try:  # now, not on the first request: a missing calibration set or a cache that cannot be written fails the start
        runner.prefix()
    except (OSError, RuntimeError, ValueError) as e:
        hint = " (METALORA_CALIBRATION_DATA names the calibration images)" if chosen == "int8" else ""
        raise RuntimeError(f"precision {chosen}: the prefix graph could not be built: {e}{hint}") from e
    return runner
