"""ONNX export: the frozen backbone, and each adapter with it, as static graphs.

`export_onnx(part="full")` (what `metalora export-onnx` writes) maps `image (N, 3, S, S)` to
`embedding (N, D)` and `logits (N, C)`, plus `seed (N, S_c)` for adapters with a mapping network:
the seed `c(x)` is computed inside the graph from the pooled prefix features, exactly as the
torch path does. The batch axis is dynamic, the image size fixed to the backbone's input size.

Serving splits that graph in two, as the torch path does (`onnx.OrtRunner`): one shared `prefix`
graph (image -> frozen prefix features) and one `tail` graph per adapter (features -> embedding,
logits, seed); `bridge` graphs take features from one cut to a later one. The low-precision path
(`lowp.LowpRunner`) exports its prefix and bridges with TF "SAME" padding made static
(`static_pad_copy`): timm's `Conv2dSame` pads from the runtime shape, and the traced graph then
keeps Shape/Ceil/Pad chains that ORT can neither fold nor fuse into the Conv.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..adapters import Adapter
from ..backbones.base import Backbone
from .base import BASE

OPSET = 17
PARTS = ("full", "prefix", "tail")  # plus "bridge:START:STOP" (`export_bridge`)
OUTPUTS = ("embedding", "logits", "seed")


class _FusedLayer(nn.Module):
    """A target layer with one adapter's branch folded in: `base(x) + branch(x, seed)`."""

    def __init__(self, name: str, base: nn.Module, branch: nn.Module, seeds: dict):
        super().__init__()
        self.name, self.base, self.branch = name, base, branch
        self._seeds = seeds  # filled by the graph's forward before the tail runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.branch(x, self._seeds.get(self.name))


class ExportGraph(nn.Module):
    """What gets exported, for the bare backbone or one adapter:
    `full`: image -> (embedding, logits[, seed]); `prefix`: image -> features;
    `tail`: features -> (embedding, logits[, seed])."""

    def __init__(self, backbone: Backbone, adapter: Adapter | None = None, part: str = "full"):
        super().__init__()
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.part = part
        backbone = own_cut(backbone, adapter)  # a tail graph starts at its adapter's cut
        # A private copy: the live backbone is shared with the torch path (and may be wrapped by
        # MetaLoRAModel); its wrapped layers behave as the frozen layer when no segment is set.
        self.backbone = copy.deepcopy(backbone).eval()
        self.adapter = adapter
        self._seeds: dict[str, torch.Tensor] = {}
        if adapter is not None:
            tail = self.backbone.tail_module()
            for name in adapter.targets:
                parent_name, _, attr = name.rpartition(".")
                parent = tail.get_submodule(parent_name) if parent_name else tail
                setattr(parent, attr, _FusedLayer(name, getattr(parent, attr), adapter.branch(name), self._seeds))

    @property
    def has_seed(self) -> bool:
        return self.adapter is not None and self.adapter.mapping is not None

    def forward(self, x: torch.Tensor):
        bb = self.backbone
        if self.part == "prefix":
            return bb.prefix(x)  # (N, C_p, H_p, W_p)
        h = x if self.part == "tail" else bb.prefix(x)  # (N, C_p, H_p, W_p)
        self._seeds.clear()
        seeds = self.adapter.seeds(bb.pool_prefix(h)) if self.adapter is not None else {}  # {layer: (N, s_l)}
        self._seeds.update(seeds)
        emb = bb.tail(h)  # (N, D)
        logits = (self.adapter.head if self.adapter is not None else bb.head)(emb)  # (N, C)
        if self.has_seed:
            return emb, logits, torch.cat(list(seeds.values()), dim=1)  # (N, S_c)
        return emb, logits


def own_cut(backbone: Backbone, adapter: Adapter | None) -> Backbone:
    """The backbone cut where `adapter` reads its seed: `backbone`, or its `at_cut` view for an
    adapter cut later than the serving prefix (its graphs are the ones a store cut there builds)."""
    split = getattr(adapter, "split", None)
    return backbone if adapter is None or split is None or split == backbone.split else backbone.at_cut(split)


class _Bridge(nn.Module):
    """The frozen blocks[start:stop] as a graph: features at one cut -> features at a later one."""

    def __init__(self, backbone: Backbone, start: int, stop: int):
        super().__init__()
        self.backbone, self.start, self.stop = copy.deepcopy(backbone).eval(), start, stop

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.backbone.bridge(h, self.start, self.stop)


def graph_digest(backbone: Backbone, adapter: Adapter | None, input_size: int, part: str = "full") -> str:
    """Content hash naming a cached graph: backbone weights, adapter tensors and config, input size, part."""
    backbone = own_cut(backbone, adapter)
    h = hashlib.sha256(f"{backbone.identity.name}|{backbone.identity.weights_sha256}|{input_size}|{OPSET}|{torch.__version__}|{part}".encode())
    if backbone.identity.cut is not None:  # a non-default prefix/tail cut is another graph
        h.update(f"|cut={backbone.identity.cut}".encode())
    if backbone.identity.weights_sha256 is None:  # random-init backbones (tests): hash the weights
        for k, v in backbone.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    if adapter is not None:
        h.update(repr(adapter.config.to_dict()).encode())
        for k, v in adapter.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def export_onnx(backbone: Backbone, adapter: Adapter | None, path: str | Path, input_size: int | None = None, part: str = "full") -> Path:
    """Export the bare backbone (adapter=None) or backbone + adapter to `path` (fp32, dynamic batch).

    `part` = full (image in), prefix (image -> features) or tail (features in); see ExportGraph.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = input_size or backbone.preprocess.input_size
    graph = ExportGraph(backbone, None if part == "prefix" else adapter, part).float().cpu()
    names = ["features"] if part == "prefix" else list(OUTPUTS if graph.has_seed else OUTPUTS[:2])
    x = torch.zeros(2, 3, size, size)  # (2, 3, S, S)
    if part == "tail":
        with torch.no_grad():
            x = graph.backbone.prefix(x).contiguous()  # (2, C_p, H_p, W_p)
    inp = "features" if part == "tail" else "image"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its successor
        # The TorchScript-based exporter: the model is plain tensor code, so a trace is exact
        # and needs no onnxscript; the batch axis stays symbolic.
        torch.onnx.export(
            graph,
            (x,),
            str(tmp),
            input_names=[inp],
            output_names=names,
            dynamic_axes={n: {0: "batch"} for n in [inp, *names]},
            opset_version=OPSET,
            dynamo=False,
        )
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return path


def export_bridge(backbone: Backbone, start: int, stop: int, path: str | Path, input_size: int | None = None) -> Path:
    """Export the frozen blocks[start:stop] (`features` at cut start (N, C, H, W) -> `features`
    at cut stop), FP32, dynamic batch: how a runtime whose prefix ends at `start` brings the rows of
    adapters cut at `stop` to their own cut, once for all of them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = input_size or backbone.preprocess.input_size
    graph = _Bridge(backbone.at_cut(start), start, stop).float().cpu()
    with torch.no_grad():
        x = graph.backbone.prefix(torch.zeros(2, 3, size, size)).contiguous()  # (2, C, H, W) at cut start
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(graph, (x,), str(tmp), input_names=["features"], output_names=["features_out"],
                          dynamic_axes={"features": {0: "batch"}, "features_out": {0: "batch"}}, opset_version=OPSET, dynamo=False)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------ static padding
def static_pad_copy(backbone, input_size: int):
    """A copy of the backbone whose TF-"SAME" convs (timm `Conv2dSame`) pad by constants.

    The pads are timm's own `pad_same_arg` for the input each conv sees at `input_size`, so the
    result is exact at that size (and only there, which is all a fixed-size export needs).
    """
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    bb = copy.deepcopy(backbone).float().cpu().eval()
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, name=n: sizes.__setitem__(name, tuple(a[0].shape[-2:])))
        for n, m in bb.named_modules()
        if isinstance(m, Conv2dSame)
    ]
    with torch.no_grad():
        bb.prefix(torch.zeros(1, 3, input_size, input_size))  # (1, 3, S, S)
        bb.tail(bb.prefix(torch.zeros(1, 3, input_size, input_size)))
    for h in hooks:
        h.remove()
    for name, hw in sizes.items():
        m = bb.get_submodule(name)
        conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups, m.bias is not None)
        conv.load_state_dict(m.state_dict())
        pad = pad_same_arg(list(hw), list(m.kernel_size), list(m.stride), list(m.dilation))  # [left, right, top, bottom]
        parent, _, attr = name.rpartition(".")
        setattr(bb.get_submodule(parent) if parent else bb, attr, nn.Sequential(nn.ZeroPad2d(pad), conv))
    return bb


class _Prefix(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone.prefix(x)  # (N, C_p, H_p, W_p)


def export_static_prefix(backbone, path: str | Path, input_size: int) -> Path:
    """The prefix graph (image (N, 3, S, S) -> features) with static pads, FP32, dynamic batch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Prefix(static_pad_copy(backbone, input_size)),
            (torch.zeros(2, 3, input_size, input_size),),
            str(tmp),
            input_names=["image"],
            output_names=["features"],
            dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    os.replace(tmp, path)
    return path


def export_static_bridge(backbone, start: int, stop: int, path: str | Path, input_size: int) -> Path:
    """`export_bridge`'s graph (frozen blocks[start:stop]) with static pads, as
    `export_static_prefix` makes the prefix (block 5 of efficientnet_lite0 opens with a stride-2
    TF-"SAME" conv)."""
    return export_bridge(static_pad_copy(backbone.at_cut(start), input_size), start, stop, path, input_size)


def export_from_store(store, ref: str, out: str | Path | None = None, check: bool = True) -> dict:
    """`metalora export-onnx`: export `base` or an adapter from the store; report the torch parity."""
    from ..runtime import Runtime

    rt = Runtime(store, device="cpu")
    key = rt.load(ref)
    adapter = None if key == BASE else rt.model.adapters[key]
    path = Path(out) if out else Path(f"{key.replace('@', '-')}.onnx")
    export_onnx(rt.backbone, adapter, path, rt.preprocess_cfg.input_size)
    res = {"adapter": key, "path": str(path), "bytes": path.stat().st_size, "outputs": list(OUTPUTS if adapter is not None and adapter.mapping is not None else OUTPUTS[:2])}
    if check:
        import onnxruntime as ort

        size = rt.preprocess_cfg.input_size
        x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (4, 3, S, S)
        ref_out = rt.run(x, [key] * 4)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
        res["max_abs_diff"] = {
            "embedding": float(np.abs(got[0] - ref_out.embeddings.float().numpy()).max()),
            "logits": float(np.abs(got[1] - torch.stack(ref_out.logits).float().numpy()).max()),
        }
        if len(got) > 2:
            res["max_abs_diff"]["seed"] = float(np.abs(got[2] - torch.stack(ref_out.seeds).float().numpy()).max())
    return res
