"""Sections (a) adapter overhead and (b) heterogeneous batching vs HF peft, in-process.

(a) is measured from images (the full model), (b) from cached prefix features: the frozen
prefix is identical work in every variant of (b) (it runs once per batch whatever the adapter
mix), so timing the tail isolates what mixing adapters costs instead of diluting it in the
prefix. (b) also reports the from-images ratio when `images_b` is on.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from metalora.adapters import Adapter, AdapterConfig, MetaLoRAModel
from metalora.backbones import create_backbone

from .common import interleaved

RANKS = {"lora": (8,), "cp": (8,), "tr": (4, 4, 4)}
TARGETS = ["*"]  # every adaptable tail layer: blocks.6.0.conv_pw, blocks.6.0.conv_pwl, conv_head


def randomized_adapter(bb, fmt: str, n_classes: int = 10, seed: int = 0, ranks=None, alpha: float = 8.0) -> Adapter:
    """An adapter moved off its zero start (B and the mapping net's last layer random), as after training."""
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(bb, AdapterConfig(fmt, ranks or RANKS[fmt], TARGETS, labels=[f"c{i}" for i in range(n_classes)], alpha=alpha))
    return ad.perturb_(0.05, g).eval()


def _images(n: int, bb, device) -> torch.Tensor:
    from metalora.images import Preprocessor

    from .common import sample_images

    pre = Preprocessor(bb.preprocess)
    x = torch.stack([pre(b) for b in sample_images(n)])  # (N, 3, 224, 224)
    return x.to(device).contiguous(memory_format=torch.channels_last)


def adapter_overhead(batch: int, repeats: int, device="cpu", progress=None) -> dict:
    """(a) Full forward from images: frozen backbone alone vs one LoRA / CP / TR adapter, same batch."""
    bb = create_backbone("efficientnet_lite0").to(device).to(memory_format=torch.channels_last)
    model = MetaLoRAModel(bb)
    for i, fmt in enumerate(RANKS):
        model.add_adapter(fmt, randomized_adapter(bb, fmt, seed=i).to(device))
    x = _images(batch, bb, device)
    h = model.forward_prefix(x)

    def frozen():
        return bb.head(bb.tail(bb.prefix(x)))

    fns = {"frozen": frozen} | {fmt: (lambda f=fmt: model(x, [f] * batch)) for fmt in RANKS}
    tail_fns = {"frozen": lambda: bb.head(bb.tail(h))} | {
        fmt: (lambda f=fmt: model.forward_from_prefix(h, [model.adapters[f]] * batch)) for fmt in RANKS
    }
    with torch.inference_mode():
        t = interleaved(fns, repeats, device=device, progress=progress)
        tt = interleaved(tail_fns, repeats, device=device)
    ratios = {fmt: t.ratio(fmt, "frozen") for fmt in RANKS}
    tail_ratios = {fmt: tt.ratio(fmt, "frozen") for fmt in RANKS}
    return {
        "what": "time per batch with one adapter / frozen backbone alone, full model from preprocessed images (decode excluded)",
        "batch": batch,
        "repeats": repeats,
        "ranks": {k: list(v) for k, v in RANKS.items()},
        "targets": list(bb.targetable()),
        "ratio": ratios,
        "worst": max(ratios, key=ratios.get),
        "frozen_images_per_s": batch / t.median("frozen"),
        "tail_only_ratio": tail_ratios,
        "adapter_params": {fmt: model.adapters[fmt].num_trainable() for fmt in RANKS},
    }


# ----------------------------------------------------------------------------- (b)


class _TailHolder(nn.Module):
    """Exposes only the backbone's tail to peft: the prefix is shared and never adapted."""

    def __init__(self, bb):
        super().__init__()
        self.tail = bb.tail_module()

    def forward(self, h):  # pragma: no cover - peft needs a forward; the benchmark calls bb.tail
        raise NotImplementedError


def _peft_backbone(our: list[Adapter], device):
    """A second copy of the backbone with HF peft LoRA adapters on the same tail convs, holding
    exactly our LoRA factors (so both sides compute the same function), plus a head per adapter."""
    from peft import LoraConfig, get_peft_model

    bb = create_backbone("efficientnet_lite0")
    targets = list(bb.targetable())
    holder = _TailHolder(bb)  # peft edits the tail's own modules in place, so `bb.tail` uses its LoRA layers
    (r,) = our[0].config.ranks
    cfg = LoraConfig(r=r, lora_alpha=our[0].config.alpha, target_modules=[f"tail.{t}" for t in targets], lora_dropout=0.0)
    pm = get_peft_model(holder, cfg, adapter_name="a0")
    for i in range(1, len(our)):
        pm.add_adapter(f"a{i}", cfg)
    mods = dict(holder.named_modules())
    with torch.no_grad():
        for i, ad in enumerate(our):
            for t in targets:
                layer = mods[f"tail.{t}"]
                br = ad.branch(t)
                layer.lora_A[f"a{i}"].weight.copy_(br.A)  # (R, I, 1, 1)
                layer.lora_B[f"a{i}"].weight.copy_(br.B[:, :, None, None])  # (O, R, 1, 1)
    heads = [ad.head for ad in our]
    bb.to(device).to(memory_format=torch.channels_last)
    return pm, bb, heads


def peft_grouped(pm, bb, heads, h: torch.Tensor, assign: list[int]):
    """What a peft user does today for a mixed batch: group by adapter, `set_adapter`, one forward
    per group, then put results back in request order."""
    n = h.shape[0]
    emb = torch.empty(n, bb.embed_dim, device=h.device, dtype=h.dtype)
    logits: list[torch.Tensor | None] = [None] * n
    groups: dict[int, list[int]] = {}
    for i, a in enumerate(assign):
        groups.setdefault(a, []).append(i)
    for a, rows in groups.items():
        pm.set_adapter(f"a{a}")
        idx = torch.tensor(rows, device=h.device)
        e = bb.tail(h[idx])  # (n_a, D)
        lo = heads[a](e)
        emb[idx] = e
        for j, r in enumerate(rows):
            logits[r] = lo[j]
    return emb, logits


def hetero(batch: int, repeats: int, mixes=(1, 4, 16, 64), device="cpu", with_images: bool = False, loop_mixes=(4, 16, 64), progress=None) -> dict:
    """(b) Mixed batches of k distinct adapters vs one adapter, and vs peft grouped per adapter."""
    kmax = max(mixes)
    if batch < kmax:
        raise ValueError(f"batch {batch} cannot hold {kmax} distinct adapters")
    bb = create_backbone("efficientnet_lite0").to(device).to(memory_format=torch.channels_last)
    model = MetaLoRAModel(bb)
    cp = [randomized_adapter(bb, "cp", seed=100 + i).to(device) for i in range(kmax)]
    lora = [randomized_adapter(bb, "lora", seed=200 + i) for i in range(kmax)]
    pm, pbb, pheads = _peft_backbone(lora, device)
    lora = [a.to(device) for a in lora]
    x = _images(batch, bb, device)
    with torch.inference_mode():
        h = model.forward_prefix(x)  # (N, 192, 7, 7) cached prefix features
    rng = random.Random(0)

    def assignment(k):
        a = [i % k for i in range(batch)]
        rng.shuffle(a)  # requests arrive interleaved, not grouped
        return a

    assigns = {k: assignment(k) for k in mixes}
    fns, peft_fns = {}, {}
    for k in mixes:
        a = assigns[k]
        fns[f"cp_k{k}"] = lambda a=a: model.forward_from_prefix(h, [cp[i] for i in a])
        fns[f"lora_k{k}"] = lambda a=a: model.forward_from_prefix(h, [lora[i] for i in a])
        peft_fns[f"peft_k{k}"] = lambda a=a: peft_grouped(pm, pbb, pheads, h, a)

    def loop(fn):
        def run():
            model.gather = False
            try:
                return fn()
            finally:
                model.gather = True

        return run

    for k in mixes:
        if k > 1 and k in loop_mixes:
            fns[f"cp_loop_k{k}"] = loop(fns[f"cp_k{k}"])
    # the two sides compute the same function: check before timing anything
    with torch.inference_mode():
        a = assigns[min(16, kmax)]
        ours = model.forward_from_prefix(h, [lora[i] for i in a]).embeddings
        theirs, _ = peft_grouped(pm, pbb, pheads, h, a)
        peft_max_abs_diff = float((ours - theirs).abs().max())
        # Two paired groups: ours against ours (cheap, so twice the rounds), and ours against peft
        # (peft's many small forwards are slow); each ratio pairs variants of the same round.
        t = interleaved(fns, 2 * repeats, device=device, progress=progress)
        vs = {k: fns[k] for k in fns if not k.startswith("cp_loop")} | peft_fns
        tp = interleaved(vs, repeats, device=device, progress=progress)
    per_s = {k: batch / t.median(k) for k in fns}
    per_s_vs = {k: batch / tp.median(k) for k in vs}
    out = {
        "what": "from cached prefix features (the tail: every adapted layer, seeds, heads); batch of mixed requests, adapters assigned round-robin then shuffled",
        "batch": batch,
        "repeats": repeats,
        "mixes": list(mixes),
        "hetero_ratio_cp": {k: t.speedup(f"cp_k{k}", "cp_k1") for k in mixes},
        "hetero_ratio_lora": {k: t.speedup(f"lora_k{k}", "lora_k1") for k in mixes},
        "vs_peft_lora": {k: tp.speedup(f"lora_k{k}", f"peft_k{k}") for k in mixes},
        "vs_peft_cp": {k: tp.speedup(f"cp_k{k}", f"peft_k{k}") for k in mixes},
        "gather_vs_loop_cp": {k: t.speedup(f"cp_k{k}", f"cp_loop_k{k}") for k in mixes if f"cp_loop_k{k}" in fns},
        "samples_per_s": per_s,
        "samples_per_s_vs_peft_rounds": per_s_vs,
        "repeats_ours": 2 * repeats,
        "peft_equivalence_max_abs_diff": peft_max_abs_diff,
        "peft_version": __import__("peft").__version__,
    }
    if with_images:
        k = 16 if 16 in mixes else kmax
        a16 = assigns[k]
        img = {
            "cp_k1": lambda: model.forward_from_prefix(model.forward_prefix(x), [cp[0]] * batch),
            f"cp_k{k}": lambda: model.forward_from_prefix(model.forward_prefix(x), [cp[i] for i in a16]),
            f"peft_k{k}": lambda: peft_grouped(pm, pbb, pheads, pbb.prefix(x), a16),
            f"lora_k{k}": lambda: model.forward_from_prefix(model.forward_prefix(x), [lora[i] for i in a16]),
        }
        with torch.inference_mode():
            ti = interleaved(img, max(2, repeats // 2), device=device)
        out["from_images"] = {
            "k": k,
            "hetero_ratio_cp": ti.speedup(f"cp_k{k}", "cp_k1"),
            "vs_peft_lora": ti.speedup(f"lora_k{k}", f"peft_k{k}"),
        }
    return out
