"""What a compute backend is, which one `auto` means on a device, and where graphs are cached.

A backend is anything with `run(x, keys) -> Output` (embeddings (N, D), one logits vector per
sample, and the seconds of each stage it measured in `Output.stages`): `metalora.runtime.Runtime`
is the torch backend, `onnx.OrtRunner` and `lowp.LowpRunner` run ONNX Runtime. Light on purpose
(torch only inside functions), so settings and command lines can import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from ..adapters import Output

BASE = "base"  # the bare backbone's key (its ImageNet head), as in metalora.runtime

# Which backend `auto` picks per device kind, from the side-by-side measurement in
# docs/deploy.md ("ONNX Runtime vs torch"). CUDA stays on torch until it is measured there.
AUTO_BACKEND = {"cpu": "onnx", "cuda": "torch"}


class Backend(Protocol):
    """What the engine runs a batch on: images (N, 3, S, S) + one loaded key per sample."""

    def run(self, x: torch.Tensor, keys: list[str]) -> Output: ...


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """`auto|torch|onnx` -> `torch|onnx` for a device; `auto` falls back to torch without onnxruntime."""
    import torch

    if backend in ("torch", "onnx"):
        return backend
    if backend != "auto":
        raise ValueError(f"backend must be auto, torch or onnx, got {backend!r}")
    kind = torch.device(device).type
    choice = AUTO_BACKEND.get(kind, "torch")
    if choice == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "torch"
    return choice


def onnx_cache_dir(cache_home: str | Path | None = None) -> Path:
    """`<cache_home>/metalora/onnx`: where ONNX graphs and the `auto` precision decision are
    cached when the caller names no directory; `cache_home` is the XDG cache directory
    (`$XDG_CACHE_HOME`, which the settings layers read), ~/.cache when None."""
    return Path(cache_home if cache_home is not None else Path.home() / ".cache") / "metalora" / "onnx"
