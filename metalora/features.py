"""The adapted tail over cached frozen-prefix features: what training and evaluation share.

`metalora.train` and `metalora.evaluate` both build on this module (and training reports its
accuracy through evaluation), so it sits below them both.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .adapters import Adapter, MetaLoRAModel
from .backbones.base import Backbone
from .data import FeatureSet

_MODELS: "weakref.WeakKeyDictionary[Backbone, MetaLoRAModel]" = weakref.WeakKeyDictionary()


def model_for(backbone: Backbone) -> MetaLoRAModel:
    """The one MetaLoRAModel wrapping `backbone` (wrapping its layers twice would nest them)."""
    if backbone not in _MODELS:
        _MODELS[backbone] = MetaLoRAModel(backbone)
    return _MODELS[backbone]



@torch.no_grad()
def embed_features(model: MetaLoRAModel, adapter: Adapter | None, fs: FeatureSet, batch_size: int = 256, device="cpu"):
    """(L2-normalised embeddings (N, D) float32, head logits (N, C) or None, seeds (N, S) or None)."""
    embs, logits, seeds = [], [], []
    for s in range(0, len(fs), batch_size):
        h = fs.h[s : s + batch_size].to(device, torch.float32)  # (B, C, H, W)
        out = model.forward_from_prefix(h, [adapter] * h.shape[0])
        embs.append(F.normalize(out.embeddings.float(), dim=-1).cpu())
        if adapter is not None:
            logits.append(torch.stack(out.logits).float().cpu())
            if out.seeds[0] is not None:
                seeds.append(torch.stack(out.seeds).float().cpu())
    return torch.cat(embs), (torch.cat(logits) if logits else None), (torch.cat(seeds) if seeds else None)
