"""The frozen backbone interface every registered architecture implements."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Preprocess:
    """How images are turned into the backbone's input tensor (the weights' own training recipe)."""

    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    def to_dict(self) -> dict:
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }


@dataclass
class BackboneIdentity:
    """What a bundle records so it is only ever loaded onto the backbone it was trained on."""

    name: str
    weights_sha256: str | None  # None: random init (tests only)
    weights_source: str = "random-init"
    extra: dict = field(default_factory=dict)
    # Where the shared prefix ends when it is not the backbone's default (e.g. "blocks[:5]").
    # Part of every cache key (prefix features, ONNX graphs) and checked when a bundle loads:
    # features or graphs of one cut must never be read for another. None keeps the default
    # cut's keys exactly as they were, so existing caches and bundles stay valid.
    cut: str | None = None

    def to_dict(self) -> dict:
        d = {"name": self.name, "weights_sha256": self.weights_sha256, "weights_source": self.weights_source}
        if self.cut is not None:
            d["cut"] = self.cut
        return d


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Backbone(nn.Module):
    """A frozen vision model split into a shared prefix and an adaptable tail.

    `prefix` runs once per batch for every adapter; adapters may only target layers in the tail
    (`targetable()`), so training can cache prefix features and serving can share them.
    """

    embed_dim: int
    seed_in_dim: int  # channels of the prefix output, pooled into the mapping network's input
    num_classes: int
    preprocess: Preprocess
    identity: BackboneIdentity
    labels: list[str] | None = None
    # Where the shared prefix ends, as a block index (`blocks[:split]`); None for a backbone with
    # one fixed cut. Backbones with several possible cuts (EfficientNet-Lite) serve adapters of
    # any later cut beside their own: see `at_cut` and `tail(on_cut=...)`.
    split: int | None = None

    def split_of(self, cut: str | None) -> int | None:
        """The block index of a recorded cut (`BackboneIdentity.cut`: "blocks[:5]", None = this
        architecture's default); None for a backbone with one fixed cut. Raises ValueError on a
        string that names no cut."""
        if self.split is None:
            if cut is not None:
                raise ValueError(f"{self.identity.name} has one fixed cut; got {cut!r}")
            return None
        if cut is None:
            return self.default_split
        m = re.fullmatch(r"blocks\[:(\d+)\]", cut)
        if not m:
            raise ValueError(f"a cut reads 'blocks[:N]', got {cut!r}")
        return int(m.group(1))

    # The split of the architecture's default cut (whose identity records no `cut`).
    default_split: int | None = None

    def at_cut(self, split: int | None) -> "Backbone":
        """This backbone with its prefix ending at `blocks[:split]`: the same modules and weights
        (no copy), another prefix/tail boundary. An adapter trained at a later cut than the
        serving one is built on its own cut's view (its mapping network reads the features there,
        its targets are in that view's tail). Returns self for its own split; raises ValueError for
        a cut this backbone cannot take."""
        if split == self.split:
            return self
        raise ValueError(f"{self.identity.name} cannot be cut at blocks[:{split}]")

    def bridge(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The frozen blocks[start:stop]: features at cut `start` -> features at cut `stop`
        (start < stop, both within the tail's blocks)."""
        raise NotImplementedError(f"{self.identity.name} has one fixed cut")

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool_prefix(self, h: torch.Tensor) -> torch.Tensor:
        """Pooled prefix features `f` (B, seed_in_dim): the mapping network's input."""
        return h.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)

    def tail(self, h: torch.Tensor, on_cut=None) -> torch.Tensor:
        """Adaptable part of the trunk: prefix features -> pooled embedding (B, embed_dim).

        `on_cut(split, h)`, where the backbone has later cuts, is called with the features at each
        later cut the tail passes (the output of blocks[:split]) before it goes on: adapters cut
        there pool their seeds from it (`MetaLoRAModel.forward_from_prefix`)."""
        raise NotImplementedError

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tail_module(self) -> nn.Module:
        """The module whose layers adapters may target (names are relative to it)."""
        raise NotImplementedError

    def targetable(self) -> dict[str, nn.Module]:
        """Conv2d (groups=1) and Linear layers of the tail, by dotted name."""
        out: dict[str, nn.Module] = {}
        for name, mod in self.tail_module().named_modules():
            if getattr(mod, "wraps_target", False):  # already wrapped for adapters: report the base
                out[name] = mod.base
            elif name.endswith(".base") and name[: -len(".base")] in out:
                continue
            elif isinstance(mod, nn.Conv2d) and mod.groups == 1:
                out[name] = mod
            elif isinstance(mod, nn.Linear):
                out[name] = mod
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(self.prefix(x)))

    def freeze(self) -> "Backbone":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen: BatchNorm statistics and dropout never change, whatever the caller asks.
        return super().train(False)
