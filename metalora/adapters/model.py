"""A frozen backbone serving many adapters at once, with mixed-adapter batches.

The frozen path of every layer runs once for the whole batch; each adapted layer then adds its
low-rank update per *segment* (a contiguous run of samples sharing an adapter).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone
from .adapter import Adapter, MappingNet
from .formats import gathered_update, reference_forward


@dataclass
class Segment:
    """Samples [start, end) of a batch that share one adapter (None = the bare backbone)."""

    adapter: Adapter | None
    start: int
    end: int
    seeds: dict[str, torch.Tensor]  # {layer: (end - start, seed_dim)}


class _Context:
    """Per-forward state shared by all wrapped layers; set and cleared by the model."""

    def __init__(self):
        self.segments: list[Segment] | None = None
        self.reference = False
        self.gather = True  # False: the plain per-segment loop (kept for tests and benchmarks)


class AdaptedLayer(nn.Module):
    """Wraps one frozen target layer: `y = base(x)`, plus each segment's low-rank update."""

    wraps_target = True

    def __init__(self, name: str, base: nn.Module, ctx: _Context):
        super().__init__()
        self.name = name
        self.base = base
        self._ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segs = self._ctx.segments
        if self._ctx.reference:
            return self._reference(x, segs)
        y = self.base(x)  # frozen path: once for the whole batch
        if not segs:
            return y
        if self._ctx.gather:
            return self._gathered(x, y, segs)
        return self._looped(x, y, segs)

    def _looped(self, x, y, segs):
        """One branch call per segment (gather -> branch -> concatenate)."""
        parts, touched = [], False
        for s in segs:
            br = s.adapter.branch(self.name) if s.adapter is not None else None
            if br is None:
                parts.append(y[s.start : s.end])
            else:
                touched = True
                parts.append(y[s.start : s.end] + br(x[s.start : s.end], s.seeds.get(self.name)))
        if not touched:
            return y
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _gathered(self, x, y, segs):
        """Per-token branches (1x1 convs, Linear) run as matmuls on the tokens, and segments whose
        branches share a signature as one batched matmul (S-LoRA/Punica); a spatial (k x k) branch
        runs as its own conv per segment."""
        groups: dict[tuple, list[tuple[Segment, object]]] = {}
        for s in segs:
            br = s.adapter.branch(self.name) if s.adapter is not None else None
            if br is not None:
                key = br.signature() if br.per_token else ("alone", id(s))
                groups.setdefault(key, []).append((s, br))
        if not groups:
            return y
        n = x.shape[0]
        for members in groups.values():
            contiguous = all(a[0].end == b[0].start for a, b in zip(members, members[1:]))
            start, end = members[0][0].start, members[-1][0].end
            rows = None if contiguous else torch.cat([torch.arange(s.start, s.end) for s, _ in members]).to(x.device)  # (N_g,)
            xs = x[start:end] if contiguous else x[rows]
            if len(members) == 1 and not members[0][1].per_token:
                s, br = members[0]
                d = br(xs, s.seeds.get(self.name))
            else:
                brs = [br for _, br in members]
                seed = None
                if brs[0].seed_dim:
                    seed = torch.cat([s.seeds[self.name] for s, _ in members])  # (N_g, seed_dim)
                d = gathered_update(brs, [s.end - s.start for s, _ in members], xs, seed)
            if contiguous and start == 0 and end == n:
                y = y + d
            elif contiguous:
                y = torch.cat([y[:start], y[start:end] + d, y[end:]])
            else:
                y = y.index_add(0, rows, d)
        return y

    def _reference(self, x, segs):
        (s,) = segs  # the reference path runs one sample (one segment) at a time
        br = s.adapter.branch(self.name) if s.adapter is not None else None
        return reference_forward(self.base, br, x, s.seeds.get(self.name))


@dataclass
class Output:
    embeddings: torch.Tensor  # (N, D), in the order of the request
    logits: list[torch.Tensor]  # per sample: (num_classes of its adapter,)
    seeds: list[torch.Tensor | None]  # per sample: the concatenated seed c(x), or None
    # Seconds per stage of the forward ('prefix': the shared frozen prefix, 'adapters': the adapted
    # rest), as the backend measured them; empty when the backend cannot split its work cheaply.
    stages: dict[str, float] = field(default_factory=dict)


class MetaLoRAModel(nn.Module):
    """One frozen backbone + a dict of adapters by name; forward over batches that mix them."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self._ctx = _Context()
        tail = backbone.tail_module()
        for name in list(backbone.targetable()):
            parent_name, _, attr = name.rpartition(".")
            parent = tail.get_submodule(parent_name) if parent_name else tail
            setattr(parent, attr, AdaptedLayer(name, getattr(parent, attr), self._ctx))
        self.adapters: dict[str, Adapter] = {}  # not submodules: loaded and dropped at run time

    @property
    def gather(self) -> bool:
        """Whether same-shape branches of different adapters run as one batched matmul (default)
        or as the plain loop over segments; both give the same result."""
        return self._ctx.gather

    @gather.setter
    def gather(self, on: bool) -> None:
        self._ctx.gather = bool(on)

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        """Register `adapter` under `name`. It may be cut at this backbone's split or later (built
        on `backbone.at_cut(split)`), never earlier: its first layers would be in the shared prefix."""
        own, base = getattr(adapter, "split", None), self.backbone.split
        if own is not None and base is not None and own < base:
            raise ValueError(f"adapter {name!r} is cut at blocks[:{own}], before this backbone's shared prefix ends (blocks[:{base}])")
        self.adapters[name] = adapter

    def _later_cut(self, adapter: Adapter) -> bool:
        """Whether `adapter` reads its seed at a cut after this backbone's (see `add_adapter`)."""
        own = getattr(adapter, "split", None)
        return own is not None and self.backbone.split is not None and own > self.backbone.split

    def _fill_seeds(self, segments: list[Segment], runs, js: list[int], f: torch.Tensor) -> None:
        """Seeds of runs `js` from pooled features `f` (N, F) of the whole (grouped) batch, into their segments."""
        if not js:
            return
        sub = [runs[j] for j in js]
        if self._ctx.gather:
            got = _batched_seeds(sub, f)
        else:
            got = [ad.seeds(f[start:end]) if ad is not None else {} for start, end, ad in sub]
        for j, sd in zip(js, got):
            segments[j].seeds.update(sd)

    def remove_adapter(self, name: str) -> Adapter | None:
        return self.adapters.pop(name, None)

    @contextmanager
    def _segments(self, segments: list[Segment], reference: bool = False):
        self._ctx.segments, self._ctx.reference = segments, reference
        try:
            yield
        finally:
            self._ctx.segments, self._ctx.reference = None, False

    def _resolve(self, names: list[str | None]) -> list[Adapter | None]:
        out = []
        for n in names:
            if n is None:
                out.append(None)
            elif n in self.adapters:
                out.append(self.adapters[n])
            else:
                raise KeyError(f"adapter {n!r} is not loaded; loaded: {sorted(self.adapters)}")
        return out

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix (B, C, H, W) — cacheable, and shared by every adapter."""
        return self.backbone.prefix(x)

    def forward_from_prefix(self, h: torch.Tensor, adapters: list[Adapter | None]) -> Output:
        """Prefix features + one adapter (or None) per sample -> embeddings, logits and seeds.

        Samples are grouped by adapter (stable sort), run as contiguous segments and put back in
        order, so callers may pass any interleaving.
        """
        n = h.shape[0]
        if len(adapters) != n:
            raise ValueError(f"{n} samples but {len(adapters)} adapters")
        order = _group_order(adapters)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(n, device=order.device)
        identity = bool((order == torch.arange(n)).all())
        hs = h if identity else h[order.to(h.device)]
        runs = list(_runs([adapters[i] for i in order.tolist()]))
        # Adapters cut later than this backbone's prefix read their seed where the tail passes
        # their cut (their layers before it are not adapted): the rest read it now.
        later: dict[int, list[int]] = {}
        for j, (_, _, ad) in enumerate(runs):
            if ad is not None and ad.mapping is not None and self._later_cut(ad):
                later.setdefault(ad.split, []).append(j)
        segments = [Segment(ad, start, end, {}) for start, end, ad in runs]
        now = [j for j in range(len(runs)) if not any(j in js for js in later.values())]
        self._fill_seeds(segments, runs, now, self.backbone.pool_prefix(hs))  # pooled (N, F)

        def on_cut(split: int, h: torch.Tensor) -> None:  # h: (N, C, H, W), the features at `split`
            if split in later:
                self._fill_seeds(segments, runs, later[split], self.backbone.pool_prefix(h))

        with self._segments(segments):
            emb = self.backbone.tail(hs, on_cut=on_cut) if later else self.backbone.tail(hs)  # (N, D)
        if self._ctx.gather:
            run_logits = _batched_heads(runs, emb, self.backbone.head)
        else:
            run_logits = [(ad.head if ad is not None else self.backbone.head)(emb[start:end]) for start, end, ad in runs]
        logits, seeds = [], []
        for s, lo in zip(segments, run_logits):  # lo: (n_s, classes)
            cat = torch.cat(list(s.seeds.values()), dim=1) if s.seeds else None  # (n_s, S)
            for i in range(s.end - s.start):
                logits.append(lo[i])
                seeds.append(cat[i] if cat is not None else None)
        inv_l = inv.tolist()
        return Output(
            embeddings=emb if identity else emb[inv.to(emb.device)],
            logits=[logits[j] for j in inv_l],
            seeds=[seeds[j] for j in inv_l],
        )

    def forward(self, x: torch.Tensor, names: list[str | None]) -> Output:
        """Images (N, 3, S, S) + adapter name per sample (None = bare backbone)."""
        return self.forward_from_prefix(self.forward_prefix(x), self._resolve(names))

    def forward_reference(self, x: torch.Tensor, names: list[str | None]) -> Output:
        """Slow, obvious path: each sample alone, every adapted layer as `W0 + ΔW(c)` explicitly."""
        embs, logits, seeds = [], [], []
        for i, ad in enumerate(self._resolve(names)):
            h = self.backbone.prefix(x[i : i + 1])
            sd: dict[str, torch.Tensor] = {}
            at = ad.split if ad is not None and self._later_cut(ad) else None  # its seed is read later, at its own cut

            def on_cut(split, h, ad=ad, sd=sd, at=at):
                if split == at:
                    sd.update(ad.seeds(self.backbone.pool_prefix(h)))

            if ad is not None and at is None:
                sd.update(ad.seeds(self.backbone.pool_prefix(h)))
            with self._segments([Segment(ad, 0, 1, sd)], reference=True):
                e = self.backbone.tail(h, on_cut=on_cut) if at is not None else self.backbone.tail(h)  # (1, D)
            embs.append(e)
            logits.append((ad.head if ad is not None else self.backbone.head)(e)[0])
            seeds.append(torch.cat(list(sd.values()), dim=1)[0] if sd else None)
        return Output(torch.cat(embs), logits, seeds)


def _take_rows(t: torch.Tensor, runs: list[tuple[int, int, Adapter | None]]) -> torch.Tensor:
    """The rows of `t` covered by `runs`: a slice when they are contiguous, else one gather."""
    if all(a[1] == b[0] for a, b in zip(runs, runs[1:])):
        return t[runs[0][0] : runs[-1][1]]
    return t[torch.cat([torch.arange(s, e) for s, e, _ in runs]).to(t.device)]


def _per_sample(runs: list[tuple[int, int, Adapter | None]], get) -> torch.Tensor:
    """`get(adapter)` stacked once per sample of `runs` (R_g, ...): one copy op, no index ops."""
    return torch.stack([get(ad) for s, e, ad in runs for _ in range(e - s)])


def _batched_seeds(runs: list[tuple[int, int, Adapter | None]], f: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Every run's seeds; mapping nets of equal shape run as batched matmuls over per-sample
    weights (MappingNet: `c = seed0 + Linear(GELU(Linear(LayerNorm(f))))`, the same ops)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in runs]
    groups: dict[tuple, list[int]] = {}
    for j, (_, _, ad) in enumerate(runs):
        if ad is None or ad.mapping is None:
            continue
        if not isinstance(ad.mapping, MappingNet):  # a frozen seed: a constant, nothing to batch
            start, end, _ = runs[j]
            out[j] = ad.seeds(f[start:end])
            continue
        ln, l1, act, l2 = ad.mapping.net
        key = (tuple(l1.weight.shape), tuple(l2.weight.shape), ln.eps, getattr(act, "approximate", None), l1.weight.dtype, l1.weight.device)
        groups.setdefault(key, []).append(j)
    for js in groups.values():
        if len(js) == 1:
            start, end, ad = runs[js[0]]
            out[js[0]] = ad.seeds(f[start:end])
            continue
        sub = [runs[j] for j in js]

        def stack(get):
            return _per_sample(sub, lambda ad: get(ad.mapping.net))

        ln, _, act, _ = sub[0][2].mapping.net
        z = F.layer_norm(_take_rows(f, sub), ln.normalized_shape, eps=ln.eps)  # (R_g, F)
        z = torch.addcmul(stack(lambda n: n[0].bias), z, stack(lambda n: n[0].weight))
        z = torch.baddbmm(stack(lambda n: n[1].bias).unsqueeze(1), z.unsqueeze(1), stack(lambda n: n[1].weight).transpose(1, 2))  # (R_g, 1, H)
        z = act(z)
        c = torch.baddbmm(stack(lambda n: n[3].bias).unsqueeze(1), z, stack(lambda n: n[3].weight).transpose(1, 2)).squeeze(1)  # (R_g, S)
        c = _per_sample(sub, lambda ad: ad.mapping.seed0) + c
        pos = 0
        for j, (start, end, ad) in zip(js, sub):
            part = torch.split(c[pos : pos + end - start], list(ad.seed_dims.values()), dim=1)
            out[j] = dict(zip(ad.seed_dims, part))
            pos += end - start
    return out


def _batched_heads(runs: list[tuple[int, int, Adapter | None]], emb: torch.Tensor, base_head) -> list[torch.Tensor]:
    """Every run's logits (n_s, classes); adapter heads of equal shape run as one batched matmul."""
    out: list[torch.Tensor | None] = [None] * len(runs)
    groups: dict[tuple, list[int]] = {}
    for j, (start, end, ad) in enumerate(runs):
        if ad is None or ad.head.bias is None:
            out[j] = (ad.head if ad is not None else base_head)(emb[start:end])
        else:
            groups.setdefault((tuple(ad.head.weight.shape), ad.head.weight.dtype, ad.head.weight.device), []).append(j)
    for js in groups.values():
        sub = [runs[j] for j in js]
        if len(js) == 1:
            start, end, ad = sub[0]
            out[js[0]] = ad.head(emb[start:end])
            continue
        w = _per_sample(sub, lambda ad: ad.head.weight)  # (R_g, C, D)
        b = _per_sample(sub, lambda ad: ad.head.bias)  # (R_g, C)
        lo = torch.baddbmm(b.unsqueeze(1), _take_rows(emb, sub).unsqueeze(1), w.transpose(1, 2)).squeeze(1)  # (R_g, C)
        pos = 0
        for j, (start, end, _) in zip(js, sub):
            out[j] = lo[pos : pos + end - start]
            pos += end - start
    return out


def _group_order(adapters: list[Adapter | None]) -> torch.Tensor:
    """A stable permutation putting equal adapters next to each other, first-seen order."""
    first: dict[int, int] = {}
    for a in adapters:
        first.setdefault(id(a), len(first))
    keys = [first[id(a)] for a in adapters]
    return torch.tensor(sorted(range(len(adapters)), key=lambda i: keys[i]), dtype=torch.long)


def _runs(seq: list[Adapter | None]):
    """(start, end, adapter) for each maximal run of the same adapter."""
    start = 0
    for i in range(1, len(seq) + 1):
        if i == len(seq) or seq[i] is not seq[start]:
            yield start, i, seq[start]
            start = i
