"""Timing and reporting helpers shared by the benchmark sections.

Every figure is a ratio of variants timed in the same rounds: variants alternate inside a round
(order reversed every other round, so drift hits both), each round gives one paired ratio, and
the figure is the median over rounds. That makes the ratios robust to CPU contention from other
work on the machine, which shifts absolute times but hits paired variants alike.
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def machine() -> dict:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "isa": _isa_flags(),
    }
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "unknown"


def _isa_flags() -> list[str]:
    """The vector-ISA flags this CPU reports (what the kernels can use), read at run time."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4", "f16c", "vnni")))
    except OSError:  # pragma: no cover
        pass
    return []


def sync(device: torch.device | str | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timings:
    """Seconds per call for each variant, one entry per round (rounds are paired across variants)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, num: str, den: str) -> float:
        """Median over rounds of t[num]/t[den] (paired within each round)."""
        return statistics.median(a / b for a, b in zip(self.seconds[num], self.seconds[den]))

    def speedup(self, fast: str, slow: str) -> float:
        """Throughput of `fast` relative to `slow`: median of t[slow]/t[fast] per round."""
        return statistics.median(b / a for a, b in zip(self.seconds[fast], self.seconds[slow]))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device=None, progress=None) -> Timings:
    """Time each variant once per round, alternating their order between rounds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
            sync(device)
    out = Timings({k: [] for k in fns})
    names = list(fns)
    for r in range(repeats):
        for k in names if r % 2 == 0 else reversed(names):
            sync(device)
            t = time.perf_counter()
            fns[k]()
            sync(device)
            out.seconds[k].append(time.perf_counter() - t)
        if progress is not None:
            progress.update(1)
    return out


def sample_images(n: int, size: int = 320) -> list[bytes]:
    """`n` JPEG photos from scikit-image's bundled sample data (no download), cycled and cropped."""
    import numpy as np
    from PIL import Image

    try:
        from skimage import data
    except ImportError:  # scikit-image is a dev extra: fall back to synthetic photos-sized JPEGs
        from clients.cli import synthetic_images

        return synthetic_images(n, size)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    out = []
    for i in range(n):
        a = np.asarray(photos[i % len(photos)])
        h, w = a.shape[:2]
        s = min(h, w, size + 4 * (i // len(photos)) % 64)
        y, x = (h - s) // 2, (w - s) // 2
        buf = io.BytesIO()
        Image.fromarray(a[y : y + s, x : x + s]).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def check(value: float, op: str, target: float) -> dict:
    """A target check that is reported whatever the outcome."""
    ok = {"<=": value <= target, ">=": value >= target, ">": value > target}[op]
    return {"value": round(value, 4), "target": f"{op} {target}", "pass": bool(ok)}
