"""Train one adapter bundle on cached frozen-prefix features (`metalora train`).

Only the tail is adapted, so every step runs `forward_from_prefix` on cached fp16 prefix
features: the expensive frozen part of the network runs once per image, ever. Runs are
deterministic under a seed (init, data order, schedule) and resume from their last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .adapters import Adapter, AdapterConfig
from .backbones.base import Backbone
from .bundle import Gallery, save_bundle
from .data import FeatureSet, load_features
from .evaluate import _accuracy_table, evaluate_features
from .features import embed_features, model_for
from .thumbnails import thumbnails_for

DEFAULT_TARGETS = ["blocks.6.0.conv_pw", "blocks.6.0.conv_pwl", "conv_head"]
# Every 1x1 conv of the tail's blocks and conv_head: what `metalora train` adapts at an earlier cut
# than the default (at the default cut, the same three layers as DEFAULT_TARGETS). The target-layer
# sweep (docs/results.md) measured it at the same trainable budget.
TAIL_TARGETS = ["blocks.*.conv_pw", "blocks.*.conv_pwl", "conv_head"]


def default_targets(backbone) -> list[str]:
    """DEFAULT_TARGETS at a backbone's default cut; TAIL_TARGETS where its prefix ends earlier."""
    early = backbone.split is not None and backbone.default_split is not None and backbone.split < backbone.default_split
    return list(TAIL_TARGETS if early else DEFAULT_TARGETS)
DEFAULT_RANKS = {"lora": (16,), "cp": (16,), "tr": (4, 4, 4)}


# TrainConfig fields added after checkpoints were first written, with the value that means "as before":
# neither in the run hash nor, saved without one (or with that value), in a checkpoint's config: the same run as a config that has the default.
LATER_FIELDS = {"seed_mode": "input", "augment": None, "sampling": None, "gallery_pq": None, "cosine_loss": 0.0}
# The scale s of the auxiliary cosine-softmax loss. NormFace (Wang et al., ACM MM 2017) bounds it from
# below: s >= (C-1)/C * ln((C-1) p / (1-p)) is needed for a C-class softmax to reach p at all, 6.1 for
# 10 classes at p = 0.99, 8.1 for GTSRB's 43, 8.9 for the mixture's 83; 16 leaves room for each.
COSINE_SCALE = 16.0


@dataclass
class TrainConfig:
    """Everything that determines a run; recorded verbatim in the bundle manifest."""

    data: list[str]
    format: str = "cp"
    ranks: tuple[int, ...] | None = None  # None: from `budget`, else DEFAULT_RANKS
    budget: int | None = None  # trainable parameters (mapping net + branches, head excluded)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    epochs: int = 2
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.1
    batch_size: int = 32
    seed: int = 0
    alpha: float = 8.0
    mapping_hidden: int = 64
    seed_mode: str = "input"  # input: c(x) from the mapping network; frozen: c(x) = c0 (the ablation, metalora.adapters.FrozenSeed)
    gallery_per_class: int | None = None  # None: every training image goes into the gallery
    holdout_frac: float = 0.0  # seeded stratified share of the training images kept out to calibrate
    false_reject_rate: float = 0.05  # of the held-out images, for the k-NN "unknown" threshold
    gallery_pq: int | None = None  # store the gallery product-quantised with this many sub-quantizers (bytes an item); None: fp16
    sampling: str | None = None  # "task-balanced": each epoch draws every task (spec) equally often; None: every image once
    augment: str | None = None  # "hflip": each step sees each image or its mirror (p = 0.5, seeded); None: as is
    cosine_loss: float = 0.0  # weight of an auxiliary cosine-softmax loss on the L2-normalised embedding (k-NN's space); 0: off

    def run_hash(self) -> str:
        d = asdict(self)
        if not self.holdout_frac:  # runs without calibration hash as they did before these fields
            d.pop("holdout_frac")
            d.pop("false_reject_rate")
        for k, default in LATER_FIELDS.items():  # likewise for fields added later, at their defaults
            if d[k] == default:
                d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


def holdout_split(labels: list[str], frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit indices, held-out indices): `frac` of each class (rounded, at least one when frac > 0), seeded."""
    import random

    if not 0.0 <= frac < 1.0:
        raise ValueError(f"holdout_frac must be in [0, 1), got {frac}")
    if frac == 0:
        return list(range(len(labels))), []
    by: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by.setdefault(lab, []).append(i)
    rng = random.Random(seed * 7919 + 17)
    hold: list[int] = []
    for lab in sorted(by):
        members = by[lab]
        n = max(1, round(len(members) * frac)) if len(members) > 1 else 0
        hold += rng.sample(members, n)
    held = set(hold)
    return [i for i in range(len(labels)) if i not in held], sorted(hold)


def count_params(backbone: Backbone, fmt: str, ranks, targets, alpha: float = 8.0, mapping_hidden: int = 64,
                 seed_mode: str = "input") -> int:
    """Trainable parameters of an adapter (head excluded), without keeping it."""
    return Adapter(backbone, AdapterConfig(fmt, tuple(ranks), targets, ["x"], alpha, mapping_hidden, seed_mode)).num_trainable()


def ranks_for_budget(backbone: Backbone, fmt: str, budget: int, targets, mapping_hidden: int = 64,
                     seed_mode: str = "input") -> tuple[tuple[int, ...], int]:
    """Ranks whose trainable count (mapping net + branches) is closest to `budget`; (ranks, count).

    With `seed_mode="frozen"` there is no mapping network, so the branches get its share.

    lora/cp: one rank, counts are affine in it. tr: R1 = R3 (the seed core is square) and R2 free;
    among the choices within 5 % of the budget the most balanced ring (largest min rank) wins.
    """
    if fmt in ("lora", "cp"):
        c1 = count_params(backbone, fmt, (1,), targets, mapping_hidden=mapping_hidden, seed_mode=seed_mode)
        c2 = count_params(backbone, fmt, (2,), targets, mapping_hidden=mapping_hidden, seed_mode=seed_mode)
        per, fixed = c2 - c1, c1 - (c2 - c1)
        r = max(1, round((budget - fixed) / per))
        return (r,), fixed + per * r
    if fmt != "tr":
        raise ValueError(f"unknown format {fmt!r}")
    cands = []
    for r in range(1, 9):
        base = count_params(backbone, fmt, (r, 1, r), targets, mapping_hidden=mapping_hidden, seed_mode=seed_mode)
        per = count_params(backbone, fmt, (r, 2, r), targets, mapping_hidden=mapping_hidden, seed_mode=seed_mode) - base
        r2 = max(1, round((budget - base) / per) + 1)
        n = base + per * (r2 - 1)
        cands.append(((r, r2, r), n))
    near = [c for c in cands if abs(c[1] - budget) <= 0.05 * budget]
    if near:
        return max(near, key=lambda c: (min(c[0]), -abs(c[1] - budget)))
    return min(cands, key=lambda c: abs(c[1] - budget))


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero; a pure function of the step so resumes match."""
    warm = max(1, int(cfg.warmup_frac * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def epoch_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """(n,) bool: which training images an epoch sees mirrored (`augment="hflip"`), a pure function
    of (seed, epoch) like `epoch_order`, so a resumed run sees what an uninterrupted one does."""
    g = torch.Generator().manual_seed(seed * 100_019 + epoch + 7)
    return torch.rand(n, generator=g) < 0.5


AUGMENTS = ("hflip",)
SAMPLINGS = ("task-balanced",)


def task_balanced_order(tasks: list[str], seed: int, epoch: int) -> torch.Tensor:
    """(N,) indices for one epoch in which each of the T tasks fills N // T places (the remainder
    goes to the first tasks): a large task is subsampled without replacement, a small one is
    repeated (whole shuffled passes, then a partial one), and the union is shuffled. Seeded by
    (seed, epoch) like `epoch_order`; one task gives `epoch_order`'s permutation of it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    names = list(dict.fromkeys(tasks))
    n = len(tasks)
    if len(names) == 1:
        return torch.randperm(n, generator=g)
    by = {t: torch.tensor([i for i, x in enumerate(tasks) if x == t]) for t in names}
    picks = []
    for j, t in enumerate(names):
        want = n // len(names) + (j < n % len(names))
        idx, parts = by[t], []
        while want > 0:
            take = min(want, len(idx))
            parts.append(idx[torch.randperm(len(idx), generator=g)[:take]])
            want -= take
        picks.append(torch.cat(parts))
    order = torch.cat(picks)
    return order[torch.randperm(n, generator=g)]


def cosine_softmax_loss(emb: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, scale: float = COSINE_SCALE) -> torch.Tensor:
    """Cross-entropy of `scale` x cosine(embedding, class row): NormFace (Wang et al., ACM MM 2017).

    emb (B, D) pooled embeddings, weight (classes, D) the head's rows used as class directions,
    y (B,) class indices -> a scalar. It trains the L2-normalised space the k-NN gallery searches
    (cosine similarity) to separate classes by angle; the head itself stays a plain linear layer.
    """
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T  # (B, classes)
    return F.cross_entropy(scale * cos, y)


def _mirrored_features(cfg: "TrainConfig", train_fs: FeatureSet, backbone: Backbone, **kw) -> FeatureSet:
    """The features of `cfg.data` mirrored left to right (`hflip=1` specs: cached once like the rest),
    row for row the same images as `train_fs`."""
    from .data import DataSpec

    parsed = [DataSpec.parse(t) for t in cfg.data]
    if any(p.hflip for p in parsed):
        raise ValueError("--augment hflip mirrors the training images itself: give the data specs without hflip=1")
    specs = [p.flipped().text for p in parsed]
    alt = load_features(specs, backbone, **kw)
    if alt.ids != train_fs.ids or alt.labels != train_fs.labels:
        raise ValueError("the mirrored features do not list the same images as the training data")
    return alt


def _save_ckpt(ckpt: Path, adapter: Adapter, opt: torch.optim.Optimizer, state: dict) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(ckpt / "adapter.tmp"))
    opt_t = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            opt_t[f"{i}.{k}"] = torch.as_tensor(v).contiguous()
    save_file(opt_t, str(ckpt / "optim.tmp"))
    (ckpt / "state.tmp").write_text(json.dumps(state))
    # Tensors first, the JSON that points at them last: a crash mid-save leaves the old checkpoint.
    os.replace(ckpt / "adapter.tmp", ckpt / "adapter.safetensors")
    os.replace(ckpt / "optim.tmp", ckpt / "optim.safetensors")
    os.replace(ckpt / "state.tmp", ckpt / "state.json")


# TrainConfig fields that shape only what is built after the last epoch (the gallery, the k-NN
# threshold): a checkpoint that differs in these alone is the same training run and resumes.
POST_TRAINING = ("gallery_per_class", "false_reject_rate", "gallery_pq")


def _same_training(saved: dict | None, cfg: "TrainConfig") -> bool:
    def norm(d: dict) -> str:
        return json.dumps({k: v for k, v in d.items() if k not in POST_TRAINING and not (k in LATER_FIELDS and v == LATER_FIELDS[k])},
                          sort_keys=True, default=list)

    return bool(saved) and norm(saved) == norm(asdict(cfg))


def _load_ckpt(ckpt: Path, adapter: Adapter, opt: torch.optim.Optimizer, cfg: "TrainConfig", cut: str | None = None) -> dict | None:
    f = ckpt / "state.json"
    if not f.is_file():
        return None
    state = json.loads(f.read_text())
    if state.get("run_hash") != cfg.run_hash() and not _same_training(state.get("config"), cfg):
        return None  # a checkpoint of a different run: start over rather than mix them
    if state.get("backbone_cut") != cut:
        return None  # the same settings at another prefix cut (`--split`): other layers, other shapes
    adapter.load_state_dict(load_file(str(ckpt / "adapter.safetensors")), strict=True)
    opt_t = load_file(str(ckpt / "optim.safetensors"))
    sd = opt.state_dict()
    for key, v in opt_t.items():
        i, k = key.split(".", 1)
        sd["state"].setdefault(int(i), {})[k] = v
    opt.load_state_dict(sd)
    return state


def train(
    cfg: TrainConfig,
    backbone: Backbone,
    out: str | Path | None = None,
    name: str | None = None,
    version: str = "1",
    eval_data: list[str] | None = None,
    ckpt_dir: str | Path | None = None,
    resume: bool = True,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    baseline: bool = False,
    thumbnails: bool = False,
    ood_data: list[str] | None = None,
    train_features: FeatureSet | None = None,
    eval_features: FeatureSet | None = None,
) -> dict:
    """Train, evaluate (when `eval_data` is given) and write a bundle to `out`; returns a summary.

    `baseline` also measures the frozen backbone's k-NN accuracy with a gallery of the same
    training images, so the manifest shows what the adapter adds. `stop_after_epoch` ends the run early after that many epochs (checkpoint written): how the
    tests interrupt a run to check that resuming matches an uninterrupted one. `thumbnails`
    stores a small picture of each gallery item's source image inside the gallery (a self-contained
    bundle; off by default: the pictures are copies of the training images, and the service can make
    them beside the galleries instead with `metalora thumbnails`).
    `train_features` / `eval_features`: the features of `cfg.data` / `eval_data`, already loaded
    (a driver running many configurations loads them once); they must be what those specs give.
    The summary holds the trained `adapter` and its `gallery` besides the manifest's sections.
    """
    from tqdm.auto import tqdm


    if cfg.sampling is not None and cfg.sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS} or None, got {cfg.sampling!r}")
    if not 0.0 <= cfg.cosine_loss <= 10.0:
        raise ValueError(f"cosine_loss must be a weight in [0, 10], got {cfg.cosine_loss!r}")
    if cfg.augment is not None and cfg.augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS} or None, got {cfg.augment!r}")
    dev = pick_device(device)
    torch.manual_seed(cfg.seed)
    backbone = backbone.to(dev)
    train_fs = train_features if train_features is not None else load_features(cfg.data, backbone, cache_dir=cache_dir, device=dev, progress=progress)
    labels = train_fs.classes
    if cfg.sampling == "task-balanced" and len(set(train_fs.tasks)) < 2:
        raise ValueError("sampling task-balanced needs several tasks (one --data task=SPEC each)")
    mirror_fs = _mirrored_features(cfg, train_fs, backbone, cache_dir=cache_dir, device=dev, progress=progress) if cfg.augment == "hflip" else None
    fit_idx, hold_idx = holdout_split(train_fs.labels, cfg.holdout_frac, cfg.seed)
    hold_fs = train_fs.take(hold_idx) if hold_idx else None
    if hold_idx:
        train_fs = train_fs.take(fit_idx)
        mirror_fs = mirror_fs.take(fit_idx) if mirror_fs is not None else None  # held-out images stay out in both views
    if cfg.gallery_pq:  # checked before training, not after the last epoch
        n_gallery = len(_gallery_subset(train_fs, cfg.gallery_per_class))
        Gallery.check_pq(cfg.gallery_pq, backbone.embed_dim, n_gallery)
    y = torch.tensor([labels.index(lab) for lab in train_fs.labels])  # (N,)
    y_hold = torch.tensor([labels.index(lab) for lab in hold_fs.labels]) if hold_fs is not None else None

    if cfg.ranks is None:
        if cfg.budget is not None:
            cfg.ranks, _ = ranks_for_budget(backbone, cfg.format, cfg.budget, cfg.targets, cfg.mapping_hidden, cfg.seed_mode)
        else:
            cfg.ranks = DEFAULT_RANKS[cfg.format]
    cfg.ranks = tuple(cfg.ranks)
    torch.manual_seed(cfg.seed)  # the adapter's init depends on the seed alone
    adapter = Adapter(backbone, AdapterConfig(cfg.format, cfg.ranks, cfg.targets, labels, cfg.alpha, cfg.mapping_hidden, cfg.seed_mode)).to(dev)
    model = model_for(backbone)
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps_per_epoch = math.ceil(len(train_fs) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    run_hash = cfg.run_hash()
    ckpt = Path(ckpt_dir) if ckpt_dir is not None else None
    start_epoch, history = 0, []
    if ckpt is not None and resume:
        st = _load_ckpt(ckpt, adapter, opt, cfg, backbone.identity.cut)
        if st is not None:
            start_epoch, history = st["epoch"], st["history"]
            if progress:  # stderr: stdout stays the --json summary
                print(f"resuming from {ckpt} after epoch {start_epoch}/{cfg.epochs} (--no-resume starts over)", file=sys.stderr, flush=True)

    for epoch in range(start_epoch, cfg.epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        adapter.train()
        order = task_balanced_order(train_fs.tasks, cfg.seed, epoch) if cfg.sampling == "task-balanced" else epoch_order(len(train_fs), cfg.seed, epoch)
        flips = epoch_flips(len(train_fs), cfg.seed, epoch) if mirror_fs is not None else None
        bar = tqdm(range(steps_per_epoch), desc=f"{cfg.format} epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        seen = correct = 0
        loss_sum = ce_sum = 0.0
        for i in bar:
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            h = train_fs.h[idx]  # (B, C, H, W) fp16
            if flips is not None:
                h = torch.where(flips[idx, None, None, None], mirror_fs.h[idx], h)
            h = h.to(dev, torch.float32)
            yb = y[idx].to(dev)
            fwd = model.forward_from_prefix(h, [adapter] * h.shape[0])
            logits = torch.stack(fwd.logits)  # (B, classes)
            loss = ce = F.cross_entropy(logits, yb)
            if cfg.cosine_loss:
                loss = ce + cfg.cosine_loss * cosine_softmax_loss(fwd.embeddings, adapter.head.weight, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += float(loss.detach()) * len(idx)
            ce_sum += float(ce.detach()) * len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        row = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen}
        if cfg.cosine_loss:  # `loss` is the objective (cross-entropy + W x cosine loss); this, the head's part, compares with heldout_loss
            row["ce_loss"] = ce_sum / seen
        if hold_fs is not None:  # the learning curve on held-out training images
            adapter.eval()
            _, hl, _ = embed_features(model, adapter, hold_fs, device=dev)
            row["heldout_head_top1"] = float((hl.argmax(1) == y_hold).float().mean())
            row["heldout_loss"] = float(F.cross_entropy(hl.float(), y_hold))
            if len(set(hold_fs.tasks)) > 1:  # a mixture's learning curve per task: where one task lags the others
                pred = [labels[i] for i in hl.argmax(1).tolist()]
                per = _accuracy_table(hold_fs.tasks, hold_fs.labels, pred, None)
                row["heldout_head_top1_per_task"] = {t: d["knn_top1"] for t, d in per.items()}  # the table's first column: here the head's
        history.append(row)
        if progress:
            held = f"  held-out top-1 {row['heldout_head_top1']:.4f}" if "heldout_head_top1" in row else ""
            if "heldout_head_top1_per_task" in row:
                held += " (" + ", ".join(f"{t} {a:.4f}" for t, a in row["heldout_head_top1_per_task"].items()) + ")"
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f}  train acc {row['train_acc']:.4f}{held}", file=sys.stderr, flush=True)
        if ckpt is not None:
            _save_ckpt(ckpt, adapter, opt, {"epoch": epoch + 1, "run_hash": run_hash, "history": history, "config": asdict(cfg),
                                             "backbone_cut": backbone.identity.cut})

    del mirror_fs
    adapter.eval()
    emb, _, _ = embed_features(model, adapter, train_fs, device=dev)  # the gallery holds the images as they are
    keep = _gallery_subset(train_fs, cfg.gallery_per_class)
    gallery = Gallery(emb[keep], y[keep], [train_fs.ids[i] for i in keep])
    if cfg.gallery_pq:  # the threshold and the metrics below then see the vectors a reader decodes
        gallery = gallery.compress(cfg.gallery_pq, seed=cfg.seed)
    if thumbnails and out is not None:
        gallery.thumbnails = thumbnails_for(cfg.data, gallery.ids)
    calibration = None
    if hold_fs is not None:
        from .calibration import ece, fit_temperature, knn_threshold, nearest_similarity, softmax_t

        h_emb, h_logits, _ = embed_features(model, adapter, hold_fs, device=dev)
        temp = fit_temperature(h_logits, y_hold)
        near = nearest_similarity(gallery.embeddings, h_emb)
        calibration = {
            "temperature": temp,
            "knn_threshold": knn_threshold(near, cfg.false_reject_rate),
            "knn_score": "cosine similarity of the nearest gallery item; below the threshold the result is unknown",
            "false_reject_rate": cfg.false_reject_rate,
            "fitted_on": f"{len(hold_fs)} held-out training images ({cfg.holdout_frac:g} of each class, seed {cfg.seed}), not in the gallery or training",
            "heldout_ece": ece(softmax_t(h_logits), y_hold),
            "heldout_ece_calibrated": ece(softmax_t(h_logits, temp), y_hold),
            "method": "temperature scaling (Guo et al., ICML 2017), ECE with 15 equal-width bins",
        }

    metrics = {}
    if eval_data:
        test_fs = eval_features if eval_features is not None else load_features(eval_data, backbone, cache_dir=cache_dir, device=dev, progress=progress)
        res = evaluate_features(model, adapter, labels, test_fs, gallery, k=10, device=dev, calibration=calibration)
        metrics = {
            "knn_top1": res["knn_top1"],
            "head_top1": res["head_top1"],
            "n": res["n"],
            "k": res["k"],
            "vote": res["vote"],
            "data": eval_data,
            "gallery_items": len(gallery.ids),
            "per_task": res.get("per_task"),
        }
        for key in ("ece", "ece_calibrated", "unknown_rate"):
            if key in res:
                metrics[key if key != "unknown_rate" else "test_false_reject_rate"] = res[key]
        for spec in ood_data or []:
            ood_fs = load_features([spec], backbone, cache_dir=cache_dir, device=dev, progress=progress)
            r = evaluate_features(model, adapter, labels, ood_fs, gallery, device=dev, calibration=calibration, ood=True)
            metrics.setdefault("ood_rejection", {})[spec] = r["unknown_rate"]
            del ood_fs
        if baseline:
            b_emb, _, _ = embed_features(model, None, train_fs, device=dev)
            b_res = evaluate_features(model, None, labels, test_fs, Gallery(b_emb[keep], y[keep], gallery.ids), k=10, device=dev)
            metrics["baseline_knn_top1"] = b_res["knn_top1"]
            metrics["baseline"] = "frozen backbone (base), same gallery images and test set"
    n_params = adapter.num_trainable()
    training = {
        **asdict(cfg),
        "ranks": list(cfg.ranks),
        "trainable_params": n_params,
        "trainable_params_note": "mapping network + low-rank branches; the classification head is excluded",
        "head_params": sum(p.numel() for p in adapter.head.parameters()),
        "n_train": len(train_fs),
        "gallery_items": len(gallery.ids),
        "history": history,
        "device": str(dev),
        "objective": "cross-entropy on the adapter's head"
        + (f" + {cfg.cosine_loss:g} x cosine-softmax (scale {COSINE_SCALE:g}) on the normalised embedding against the head's normalised rows" if cfg.cosine_loss else "")
        + "; k-NN on the L2-normalised pooled tail embedding",
        "run_hash": run_hash,
    }
    summary = {"training": training, "metrics": metrics, "calibration": calibration, "out": str(out) if out else None}
    if out is not None:
        out = Path(out)
        name = name or out.parent.name
        version = out.name if version is None else version
        save_bundle(out, adapter.cpu(), backbone.cpu(), name=name, version=version, training=training, metrics=metrics, gallery=gallery,
                    calibration=calibration)
        adapter.to(dev)
        backbone.to(dev)
    summary["adapter"] = adapter
    summary["gallery"] = gallery
    return summary


def _gallery_subset(fs: FeatureSet, per_class: int | None) -> list[int]:
    """The first `per_class` training images of each class (they are already a seeded sample)."""
    if per_class is None:
        return list(range(len(fs)))
    counts: dict[str, int] = {}
    keep = []
    for i, lab in enumerate(fs.labels):
        if counts.get(lab, 0) < per_class:
            counts[lab] = counts.get(lab, 0) + 1
            keep.append(i)
    return keep
