"""A throwaway model store of randomized adapters for a real `metalora serve` (used by the HTTP
benchmarks and the client tests); the server launcher itself lives in `service.launch`."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from service.launch import ServerProcess, free_port  # noqa: F401  (re-exported for bench and tests)

ROOT = Path(__file__).resolve().parent.parent


def build_store(root: Path, adapters: dict[str, tuple[str, tuple[int, ...], int]], gallery: dict[str, int] | None = None, seed: int = 0, backbone=None, progress=None) -> Path:
    """Write `{name: (format, ranks, n_classes)}` as randomized bundles (version 1) next to the
    shipped backbone manifest; `gallery` gives some of them a k-NN gallery of that many items."""
    from metalora.backbones import create_backbone
    from metalora.bundle import Gallery, save_bundle

    from .kernels import randomized_adapter

    root = Path(root)
    if not (root / "backbones").exists():
        shutil.copytree(ROOT / "model_store" / "backbones", root / "backbones")
    bb = backbone or create_backbone("efficientnet_lite0")
    gallery = gallery or {}
    for i, (name, (fmt, ranks, n_classes)) in enumerate(adapters.items()):
        ad = randomized_adapter(bb, fmt, n_classes=n_classes, seed=seed + i, ranks=ranks)
        gal = None
        if gallery.get(name):
            g = torch.Generator().manual_seed(seed + 1000 + i)
            n = gallery[name]
            emb = torch.nn.functional.normalize(torch.randn(n, bb.embed_dim, generator=g), dim=1)
            gal = Gallery(emb, torch.arange(n) % n_classes, [f"item{j}" for j in range(n)])
        save_bundle(root / "adapters" / name / "1", ad, bb, name=name, version="1", gallery=gal)
        if progress is not None:
            progress.update(1)
    return root
