"""The engine: one worker thread per device that runs batches through the compute backend.

The event loop never calls torch: it hands a batch to `Engine.run`, which runs it on the
engine's single thread. A backend is anything with `run(x, keys) -> Output` (embeddings (N, D)
and one logits vector per sample), plus `load(ref)`/`unload(key)`; `metalora.runtime.Runtime`
is the torch backend, and `--backend onnx` plugs in `metalora.onnx_backend` (`OrtRunner`).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from metalora.adapters import Output
from metalora.runtime import Runtime

from .batcher import WorkItem
from .metrics import Metrics


class Backend(Protocol):
    def run(self, x: torch.Tensor, keys: list[str]) -> Output: ...


@dataclass
class ItemResult:
    logits: torch.Tensor  # (num_classes,) float32 on the CPU
    embedding: torch.Tensor  # (D,) float32, L2-normalised, on the CPU


def make_backend(name: str, runtime, settings) -> Backend:
    """The compute backend by name; `torch` is the runtime itself, `auto` the faster one on the device."""
    if name == "auto":
        from metalora.onnx_backend import resolve_backend

        name = resolve_backend(name, runtime.device)
    if name == "torch":
        return runtime
    if name == "onnx":
        try:
            from metalora import onnx_backend
        except ImportError as e:
            raise RuntimeError(f"backend 'onnx' is not available here ({e}); use --backend torch") from None
        if hasattr(onnx_backend, "create_backend"):
            return onnx_backend.create_backend(runtime, settings)
        return onnx_backend.OrtRunner(runtime)
    raise ValueError(f"unknown backend {name!r}; choices: torch, onnx")


class Engine:
    """Runs batches of WorkItems on one thread; fuses items for different adapters in one forward."""

    def __init__(self, backend: Backend, metrics: Metrics, device: str):
        self.backend = backend
        self.metrics = metrics
        self._stages = isinstance(backend, Runtime)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{device}")

    async def run(self, items: list[WorkItem]) -> list[ItemResult]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._run, items)

    def _run(self, items: list[WorkItem]) -> list[ItemResult]:
        keys = [it.key for it in items]
        self.metrics.batch_size.observe(len(items))
        self.metrics.batch_adapters.observe(len(set(keys)))
        t0 = time.perf_counter()
        x = torch.stack([it.x for it in items])  # (N, 3, S, S)
        stages: dict[str, float] = {}
        with torch.inference_mode():
            out = self.backend.run(x, keys, stages=stages) if self._stages else self.backend.run(x, keys)
            emb = F.normalize(out.embeddings.float(), dim=-1).cpu()  # (N, D)
            logits = [lo.float().cpu() for lo in out.logits]
        self.metrics.inference.labels("forward").observe(time.perf_counter() - t0)
        for stage, seconds in stages.items():  # torch on CPU: the frozen prefix vs the adapted rest
            self.metrics.inference.labels(stage).observe(seconds)
        return [ItemResult(lo, e) for lo, e in zip(logits, emb)]

    def call(self, fn, *args):
        """Run `fn` on the engine thread (warm-up, anything that must not race a batch)."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
