"""What the CPU offers, read at run time from /proc/cpuinfo: nothing here assumes a CPU feature."""

from __future__ import annotations

import os
from pathlib import Path

# The ISA extensions that decide low-precision speed (Linux /proc/cpuinfo names).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The `flags` of the first CPU in /proc/cpuinfo (empty where the file is absent)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_info(path: str | Path = "/proc/cpuinfo") -> dict:
    """CPU model name, logical CPUs and which of `ISA_FLAGS` it reports (read at run time)."""
    model = "unknown"
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags(path)
    return {"model": model, "logical_cpus": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags]}
