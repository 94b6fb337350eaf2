"""One MetaLoRA adapter: mapping network (seed generator), low-rank branches and a head."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..backbones.base import Backbone
from .formats import FORMATS, Branch, create_branch

RANKS_PER_FORMAT = {"lora": 1, "cp": 1, "tr": 3}
# How an adapter gets its seed c(x): `input` — the mapping network reads the input's pooled
# features (MetaLoRA); `frozen` — the ablation with the mapping network off, c(x) = c0 for every
# input (see FrozenSeed).
SEED_MODES = ("input", "frozen")


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter's modules; stored verbatim in the bundle manifest."""

    format: str  # lora | cp | tr
    ranks: tuple[int, ...]  # (R,) for lora/cp, (R1, R2, R3) for tr
    targets: list[str]  # fnmatch patterns over the backbone's targetable layer names
    labels: list[str]
    alpha: float = 8.0
    mapping_hidden: int = 64
    seed_mode: str = "input"  # input | frozen (SEED_MODES); bundles without the field are `input`

    def __post_init__(self):
        FORMATS.get(self.format)  # fails loudly on an unknown format
        if self.seed_mode not in SEED_MODES:
            raise ValueError(f"seed_mode must be one of {SEED_MODES}, got {self.seed_mode!r}")
        self.ranks = tuple(int(r) for r in self.ranks)
        want = RANKS_PER_FORMAT[self.format]
        if len(self.ranks) != want or min(self.ranks) < 1:
            raise ValueError(f"format {self.format!r} takes {want} positive rank(s), got {self.ranks}")
        if self.seed_mode != "input" and not FORMATS.get(self.format).default_seed(self.ranks).numel():
            raise ValueError(f"seed_mode {self.seed_mode!r} needs a seeded format (cp, tr); {self.format!r} has no seed")
        if not self.targets:
            raise ValueError("an adapter needs at least one target pattern")
        if len(self.labels) < 1:
            raise ValueError("an adapter needs at least one label")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ranks"] = list(self.ranks)
        if d["seed_mode"] == "input":  # the default is left out: older manifests and graph digests stay as they were
            d.pop("seed_mode")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        return cls(**{k: d[k] for k in ("format", "ranks", "targets", "labels", "alpha", "mapping_hidden")},
                   seed_mode=d.get("seed_mode", "input"))


def resolve_targets(backbone: Backbone, patterns: list[str]) -> list[str]:
    """Targetable layer names matching any pattern, in model order; a pattern matching nothing fails."""
    names = list(backbone.targetable())
    out = []
    for p in patterns:
        hit = [n for n in names if fnmatch.fnmatchcase(n, p)]
        if not hit:
            raise ValueError(f"target pattern {p!r} matches no adaptable layer; choices: {names}")
        out += [n for n in hit if n not in out]
    return [n for n in names if n in out]


def _key(layer: str) -> str:
    return layer.replace(".", "__")  # ModuleDict keys cannot hold dots


class MappingNet(nn.Module):
    """`c = c0 + g(f)`: pooled frozen features -> all seeds of one adapter. g's last layer starts at 0."""

    def __init__(self, in_dim: int, hidden: int, seed0: torch.Tensor):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, seed0.numel()))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.seed0 = nn.Parameter(seed0.clone())  # (S,)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.seed0 + self.net(f)  # (N, S)


class FrozenSeed(nn.Module):
    """`c(x) = c0` for every input: the mapping network switched off (the seed ablation).

    c0 is the format's start value (`Branch.default_seed`: ones for CP, the identity core for
    TR), which is exactly what `MappingNet` emits for *any* input at initialisation (its last
    layer starts at zero). It is a buffer, not a parameter: it never trains. A trainable constant
    would add nothing, since a constant c rescales CP's B columns (and multiplies TR's B core),
    which B can learn by itself; the start value is therefore the static control for the same
    branch, differing from MetaLoRA only in having no input conditioning.
    """

    def __init__(self, seed0: torch.Tensor):
        super().__init__()
        self.register_buffer("seed0", seed0.clone())  # (S,); saved in the bundle's weights

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.seed0.expand(f.shape[0], -1)  # (N, S)


class Adapter(nn.Module):
    """An adapter for one backbone: branches per target layer, optional mapping net, its head."""

    def __init__(self, backbone: Backbone, config: AdapterConfig):
        super().__init__()
        self.config = config
        # The cut its mapping network reads (the backbone's `split`; None for a one-cut backbone):
        # a runtime whose shared prefix ends earlier pools this adapter's seed later, at this cut.
        self.split = backbone.split
        self.targets = resolve_targets(backbone, config.targets)
        layers = backbone.targetable()
        self.branches = nn.ModuleDict(
            {_key(t): create_branch(config.format, layers[t], config.ranks, config.alpha) for t in self.targets}
        )
        self.seed_dims = {t: self.branches[_key(t)].seed_dim for t in self.targets}
        total = sum(self.seed_dims.values())
        if total:
            seed0 = torch.cat([FORMATS.get(config.format).default_seed(config.ranks) for _ in self.targets])
            if config.seed_mode == "frozen":
                self.mapping: MappingNet | FrozenSeed | None = FrozenSeed(seed0)
            else:
                self.mapping = MappingNet(backbone.seed_in_dim, config.mapping_hidden, seed0)
        else:
            self.mapping = None
        self.head = nn.Linear(backbone.embed_dim, config.num_classes)

    @property
    def seed_dim(self) -> int:
        return sum(self.seed_dims.values())

    def branch(self, layer: str) -> Branch | None:
        return self.branches[_key(layer)] if _key(layer) in self.branches else None

    def seeds(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled prefix features (N, F) -> per-layer seeds {layer: (N, seed_dim_layer)}."""
        if self.mapping is None:
            return {}
        c = self.mapping(f)  # (N, S)
        parts = torch.split(c, list(self.seed_dims.values()), dim=1)
        return dict(zip(self.seed_dims, parts))

    @torch.no_grad()
    def perturb_(self, std: float = 0.05, generator: torch.Generator | None = None) -> "Adapter":
        """Move the adapter off its zero start (random B factors and mapping-net output layer), as
        training would: tests, benchmarks and demo stores need adapters that do real low-rank work."""

        def fill(t: torch.Tensor) -> None:
            t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * std)

        for br in self.branches.values():
            fill(br.B)
        if isinstance(self.mapping, MappingNet):
            fill(self.mapping.net[-1].weight)
            fill(self.mapping.net[-1].bias)
        return self

    def num_trainable(self, include_head: bool = False) -> int:
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("head."))
        return n + (sum(p.numel() for p in self.head.parameters()) if include_head else 0)
