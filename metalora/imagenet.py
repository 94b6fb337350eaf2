"""ImageNet-1k class names (shipped with timm) and the sample-set accuracy check."""

from __future__ import annotations

import zipfile
from functools import lru_cache
from pathlib import Path

import torch
from tqdm import tqdm

from .backbones.base import Backbone
from .images import Preprocessor


@lru_cache(maxsize=1)
def imagenet_labels() -> list[str]:
    """Short human names in the standard 1000-class order (first synonym of each WordNet id)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]


def read_classes_tsv(path: str | Path) -> list[str]:
    """`index  wnid  name` rows (with a header) -> wnids in index order."""
    rows = [r.split("\t") for r in Path(path).read_text().splitlines() if r.strip()]
    if rows and not rows[0][0].isdigit():
        rows = rows[1:]
    rows.sort(key=lambda r: int(r[0]))
    return [r[1] for r in rows]


@torch.inference_mode()
def evaluate_imagenet_sample(
    backbone: Backbone, zip_path: str | Path, classes_tsv: str | Path, batch_size: int = 50, progress: bool = True, shrink: bool = True
) -> dict:
    """Top-1/top-5 of the backbone's own head on an ImageFolder zip named by WordNet id.

    `shrink=False` decodes every photo at full resolution (the reference path of metalora.images).
    """
    wnids = read_classes_tsv(classes_tsv)
    index = {w: i for i, w in enumerate(wnids)}
    pre = Preprocessor(backbone.preprocess, shrink=shrink)
    device = next(backbone.parameters()).device
    top1 = top5 = n = 0
    with zipfile.ZipFile(zip_path) as z:
        members = sorted(m for m in z.namelist() if not m.endswith("/"))
        for i in tqdm(range(0, len(members), batch_size), desc="imagenet-sample", disable=not progress, unit="batch"):
            chunk = members[i : i + batch_size]
            x = torch.stack([pre(z.read(m)) for m in chunk]).to(device)  # (B, 3, S, S)
            y = torch.tensor([index[Path(m).parent.name] for m in chunk], device=device)
            t5 = backbone(x.contiguous(memory_format=torch.channels_last)).topk(5, dim=1).indices  # (B, 5)
            top1 += int((t5[:, 0] == y).sum())
            top5 += int((t5 == y[:, None]).any(dim=1).sum())
            n += len(chunk)
    return {"top1": top1 / n, "top5": top5 / n, "n": n}
