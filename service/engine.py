"""The engine: one worker thread per device that runs batches through the compute backend.

The event loop never calls torch: it hands a batch to `Engine.run`, which runs it on the
engine's single thread. A backend is anything with `run(x, keys) -> Output` (embeddings (N, D),
one logits vector per sample, and the seconds of each stage it measured in `Output.stages`;
`metalora.backends.base.Backend`): `metalora.runtime.Runtime` is the torch backend, and
`--backend onnx` plugs in `metalora.backends` (`lowp.LowpRunner` on CPU, `onnx.OrtRunner` on
CUDA). `make_backend` resolves the name once.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metalora.backends.base import Backend

from .batcher import WorkItem
from .metrics import Metrics


@dataclass
class ItemResult:
    logits: torch.Tensor  # (num_classes,) float32 on the CPU
    embedding: torch.Tensor  # (D,) float32, L2-normalised, on the CPU
    seed: torch.Tensor | None = None  # (S,) float32 on the CPU: the concatenated seed c(x); None for LoRA and base
    compute_s: float = 0.0  # this item's share of its batch's forward (seconds)
    queue_s: float = 0.0  # how long it waited in the batcher's queue (seconds; set by the batcher)


def make_backend(name: str, runtime, settings) -> tuple[str, Backend]:
    """The compute backend by name -> (resolved name, backend); `auto` picks the faster one on the
    runtime's device (`metalora.backends.base.resolve_backend`), `torch` is the runtime itself.

    On the ONNX CPU backend `settings.precision` picks the shared prefix's precision
    (`metalora.backends.lowp`), int8 calibrated on `settings.calibration`; ONNX graphs are cached
    in `settings.onnx_cache`. Raises ValueError for an unknown name or a precision the backend or
    CPU cannot run, and RuntimeError when `onnx` is asked for without onnxruntime.
    """
    from metalora.backends.base import resolve_backend
    from metalora.backends.lowp import refused

    name = resolve_backend(name, runtime.device)
    precision = getattr(settings, "precision", "fp32")
    why = refused(precision, name, runtime.device)
    if why:
        raise ValueError(why)
    if name == "torch":
        return name, runtime
    try:
        if torch.device(runtime.device).type == "cpu":
            from metalora.backends.lowp import create_lowp_backend

            return name, create_lowp_backend(runtime, precision, threads=torch.get_num_threads(), cache_dir=settings.onnx_cache,
                                             calibration=settings.calibration)
        from metalora.backends.onnx import create_backend

        return name, create_backend(runtime, cache_dir=settings.onnx_cache)
    except ImportError as e:
        raise RuntimeError(f"backend 'onnx' is not available here ({e}); use --backend torch") from None


class Engine:
    """Runs batches of WorkItems on one thread; fuses items for different adapters in one forward."""

    def __init__(self, backend: Backend, metrics: Metrics, device: str):
        self.backend = backend
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{device}")

    async def run(self, items: list[WorkItem]) -> list[ItemResult]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._run, items)

    def _run(self, items: list[WorkItem]) -> list[ItemResult]:
        keys = [it.key for it in items]
        self.metrics.batch_size.observe(len(items))
        self.metrics.batch_adapters.observe(len(set(keys)))
        t0 = time.perf_counter()
        x = torch.stack([it.x for it in items])  # (N, 3, S, S)
        with torch.inference_mode():
            out = self.backend.run(x, keys)
            emb = F.normalize(out.embeddings.float(), dim=-1).cpu()  # (N, D)
            logits = [lo.float().cpu() for lo in out.logits]
            seeds = [None if sd is None else sd.float().cpu() for sd in out.seeds]
        forward_s = time.perf_counter() - t0
        self.metrics.inference.labels("forward").observe(forward_s)
        for stage, seconds in out.stages.items():  # the frozen prefix vs the adapted rest, where measured
            self.metrics.inference.labels(stage).observe(seconds)
        share = forward_s / len(items)
        return [ItemResult(lo, e, sd, compute_s=share) for lo, e, sd in zip(logits, emb, seeds)]

    def call(self, fn, *args):
        """Run `fn` on the engine thread (warm-up, anything that must not race a batch)."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.backend, "close", None)  # OrtRunner: its scratch directory
        if close is not None:
            close()
