"""Low-rank branches for one frozen layer: Conv-LoRA, MetaLoRA-CP and MetaLoRA-TR (DESIGN.md §2).

Each branch computes the factored update `Δy = ΔW(c) ∗ x` without materialising ΔW, and has one
`delta_weight(seed)` that builds ΔW explicitly: the single source of truth the tests check the
factored forward against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

from ..registry import Registry

FORMATS: Registry[type["Branch"]] = Registry("adapter format")


class Geometry:
    """How a target layer applies its weight: linear, conv, or conv with TF 'SAME' padding."""

    def __init__(self, base: nn.Module):
        self.linear = isinstance(base, nn.Linear)
        self.same = isinstance(base, Conv2dSame)
        if not self.linear:
            self.kernel_size, self.stride = tuple(base.kernel_size), tuple(base.stride)
            self.padding, self.dilation = base.padding, tuple(base.dilation)

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.linear:
            return F.linear(x, weight, bias)
        if self.same:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, 1)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, 1)


def layer_dims(base: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(in, out, kernel) of a target layer; a Linear is a conv with an empty kernel."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, ()
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise ValueError(f"only groups=1 convolutions can be adapted, got groups={base.groups}")
        return base.in_channels, base.out_channels, tuple(base.kernel_size)
    raise TypeError(f"cannot adapt a {type(base).__name__}; only Conv2d and Linear")


def _seed_view(seed: torch.Tensor, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Broadcast a per-sample seed (N, R) against a branch activation `y`."""
    n, r = seed.shape
    shape = [n] + [1] * (y.dim() - 1)
    shape[channel_dim] = r
    return seed.reshape(shape)


class Branch(nn.Module):
    """The low-rank path of one adapter on one frozen layer (`base` is used for geometry only)."""

    #: numbers of seed this branch consumes per sample (0: static, no mapping network)
    seed_dim: int = 0

    def __init__(self, base: nn.Module, alpha: float):
        super().__init__()
        self.in_dim, self.out_dim, self.kernel = layer_dims(base)
        self.is_linear = isinstance(base, nn.Linear)
        # A reuses the base's kernel, stride and padding; B is always 1x1.
        self.geometry = Geometry(base)
        self.alpha = float(alpha)

    def _down(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x -> (N, R, H', W') or (N, ..., R) through A with the base's geometry."""
        return self.geometry.apply(x, weight)

    def _up(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(N, R, H, W) or (N, ..., R) -> output channels through the 1x1 B."""
        if self.is_linear:
            return F.linear(u, weight)
        return F.conv2d(u, weight[:, :, None, None])

    @property
    def channel_dim(self) -> int:
        return -1 if self.is_linear else 1

    @property
    def per_token(self) -> bool:
        """True when A acts on each position alone (Linear, or a 1x1/stride-1 conv without padding).

        Such branches are two matmuls over tokens, so a batch mixing many adapters of one shape can
        run as two batched matmuls over per-sample factors instead of a loop over segments.
        """
        if self.is_linear:
            return True
        g = self.geometry
        pad_free = g.same or g.padding in (0, (0, 0), "valid", "same")  # k=1: "same" pads nothing
        return self.kernel == (1, 1) and g.stride == (1, 1) and pad_free

    def signature(self) -> tuple:
        """Branches with equal signatures can share one batched (gathered) matmul."""
        return (type(self), tuple(self.A.shape), tuple(self.B.shape), self.A.dtype, self.A.device)

    def mix(self, u: torch.Tensor, seed: torch.Tensor | None) -> torch.Tensor:
        """The seed-dependent middle on tokens: (N, T, Ra) -> (N, T, Rb). Plain LoRA passes through."""
        return u

    def forward(self, x: torch.Tensor, seed: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, seed: torch.Tensor | None) -> torch.Tensor:
        """ΔW per sample: (N, O, I, *k) (or (1, O, I, *k) for a static branch), scale included."""
        raise NotImplementedError

    @staticmethod
    def default_seed(ranks: tuple[int, ...]) -> torch.Tensor:
        """The seed at initialisation: the mapping network starts by emitting exactly this."""
        return torch.zeros(0)


def _a_weight(out_r: int, in_dim: int, kernel: tuple[int, ...]) -> nn.Parameter:
    w = torch.empty(out_r, in_dim, *kernel)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Conv2d's own init, as peft does for lora_A
    return nn.Parameter(w)


@FORMATS.register("lora")
class LoRABranch(Branch):
    """Conv-LoRA: `Δy = (α/R)·B∗(A∗x)`; B starts at zero so the adapted model equals the frozen one."""

    def __init__(self, base: nn.Module, ranks: tuple[int, ...], alpha: float):
        super().__init__(base, alpha)
        (r,) = ranks
        self.rank = r
        self.scale = self.alpha / r
        self.A = _a_weight(r, self.in_dim, self.kernel)  # (R, I, k, k)
        self.B = nn.Parameter(torch.zeros(self.out_dim, r))  # (O, R)

    def forward(self, x, seed=None):
        return self._up(self._down(x, self.A), self.B) * self.scale

    def delta_weight(self, seed=None):
        dw = torch.einsum("or,ri...->oi...", self.B, self.A)  # (O, I, k, k)
        return (dw * self.scale).unsqueeze(0)


@FORMATS.register("cp")
class CPBranch(Branch):
    """MetaLoRA-CP: `ΔW(c) = Σ_r c_r·A_r⊗B_r`; forward `(α/R)·B∗(c ⊙ (A∗x))`."""

    def __init__(self, base: nn.Module, ranks: tuple[int, ...], alpha: float):
        super().__init__(base, alpha)
        (r,) = ranks
        self.rank = r
        self.seed_dim = r
        self.scale = self.alpha / r
        self.A = _a_weight(r, self.in_dim, self.kernel)  # (R, I, k, k)
        self.B = nn.Parameter(torch.zeros(self.out_dim, r))  # (O, R)

    @staticmethod
    def default_seed(ranks):
        return torch.ones(ranks[0])  # c = 1: CP starts as plain LoRA

    def forward(self, x, seed):
        u = self._down(x, self.A)  # (N, R, H', W') or (N, ..., R)
        u = u * _seed_view(seed, u, self.channel_dim)
        return self._up(u, self.B) * self.scale

    def mix(self, u, seed):
        return u * seed[:, None, :]  # (N, T, R) * (N, 1, R)

    def delta_weight(self, seed):
        dw = torch.einsum("or,nr,ri...->noi...", self.B, seed, self.A)  # (N, O, I, k, k)
        return dw * self.scale


@FORMATS.register("tr")
class TRBranch(Branch):
    """MetaLoRA-TR: `ΔW[o,i,u,v] = Tr(A[:,(i,u,v),:]·B[:,o,:]·C(c))` with a per-sample core C (R3×R1).

    A is a conv I -> R1·R2 (index p·R2+q), B a 1x1 conv R2·R3 -> O (index q·R3+r), C = reshape(c).
    """

    def __init__(self, base: nn.Module, ranks: tuple[int, ...], alpha: float):
        super().__init__(base, alpha)
        r1, r2, r3 = ranks
        self.ranks = (r1, r2, r3)
        self.seed_dim = r3 * r1
        self.scale = self.alpha / (r1 * r2)
        self.A = _a_weight(r1 * r2, self.in_dim, self.kernel)  # (R1·R2, I, k, k)
        self.B = nn.Parameter(torch.zeros(self.out_dim, r2 * r3))  # (O, R2·R3)

    @staticmethod
    def default_seed(ranks):
        r1, _, r3 = ranks
        return torch.eye(r3, r1).flatten()  # C = I: the ring closes as a plain bond at start

    def forward(self, x, seed):
        r1, r2, r3 = self.ranks
        n = x.shape[0]
        c = seed.reshape(n, r3, r1)  # (N, R3, R1)
        u = self._down(x, self.A)  # conv: (N, R1·R2, H', W'); linear: (N, ..., R1·R2)
        if self.is_linear:
            lead = u.shape[1:-1]
            u = u.reshape(n, -1, r1, r2)  # (N, T, R1, R2)
            v = torch.einsum("ntpq,nrp->ntqr", u, c)  # (N, T, R2, R3)
            v = v.reshape(n, *lead, r2 * r3)
        else:
            _, _, h, w = u.shape
            u = u.reshape(n, r1, r2, h, w)  # (N, R1, R2, H', W')
            v = torch.einsum("npqhw,nrp->nqrhw", u, c)  # (N, R2, R3, H', W')
            v = v.reshape(n, r2 * r3, h, w)  # (N, R2·R3, H', W')
        return self._up(v, self.B) * self.scale

    def mix(self, u, seed):
        r1, r2, r3 = self.ranks
        n, t, _ = u.shape
        c = seed.reshape(n, r3, r1)  # (N, R3, R1)
        v = torch.einsum("ntpq,nrp->ntqr", u.reshape(n, t, r1, r2), c)  # (N, T, R2, R3)
        return v.reshape(n, t, r2 * r3)

    def delta_weight(self, seed):
        r1, r2, r3 = self.ranks
        n = seed.shape[0]
        a = self.A.reshape(r1, r2, self.in_dim, *self.kernel)  # (R1, R2, I, k, k)
        b = self.B.reshape(self.out_dim, r2, r3)  # (O, R2, R3)
        c = seed.reshape(n, r3, r1)  # (N, R3, R1)
        dw = torch.einsum("pqi...,oqr,nrp->noi...", a, b, c)  # (N, O, I, k, k)
        return dw * self.scale


def gathered_update(branches: list[Branch], counts: list[int], x: torch.Tensor, seed: torch.Tensor | None) -> torch.Tensor:
    """Low-rank updates of several same-signature per-token branches over one batch (Punica's BGMV).

    Samples come grouped: the first `counts[0]` rows use `branches[0]`, and so on. Each sample's
    factors are stacked (one copy op per factor), then the update is two batched matmuls: per sample
    `Δy = scale·B·mix(A·x, c)` on every token. Equal to calling each branch on its rows.
    """
    n = x.shape[0]
    ref = branches[0]
    if ref.is_linear:
        lead = x.shape[1:-1]
        t = x.reshape(n, -1, ref.in_dim)  # (N, T, I)
    else:
        _, _, h, w = x.shape
        t = x.permute(0, 2, 3, 1).reshape(n, h * w, ref.in_dim)  # (N, H·W, I); a view when channels_last
    # mix is linear in u, so the scale goes on the small (N, T, Ra) tensor. Few, large ops on
    # purpose: on a busy CPU every extra op costs a thread hand-off, whatever its size.
    if len(branches) == 1:  # one adapter: plain matmuls on the tokens, no per-sample copies
        u = (t @ ref.A.reshape(ref.A.shape[0], -1).t()) * ref.scale  # (N, T, Ra)
        d = ref.mix(u, seed) @ ref.B.t()  # (N, T, O)
    else:
        per = [b for b, c in zip(branches, counts) for _ in range(c)]  # branch of each sample
        a = torch.stack([b.A.reshape(b.A.shape[0], -1) for b in per])  # (N, Ra, I)
        bw = torch.stack([b.B for b in per])  # (N, O, Rb)
        u = torch.bmm(t, a.transpose(1, 2))  # (N, T, Ra)
        scales = {b.scale for b in branches}
        if len(scales) == 1:
            u = u * scales.pop()
        else:
            u = u * torch.tensor([b.scale for b in per], dtype=u.dtype, device=u.device)[:, None, None]
        d = torch.bmm(ref.mix(u, seed), bw.transpose(1, 2))  # (N, T, O)
    if ref.is_linear:
        return d.reshape(n, *lead, ref.out_dim)
    return d.reshape(n, h, w, ref.out_dim).permute(0, 3, 1, 2)  # (N, O, H, W), channels_last strides


def create_branch(fmt: str, base: nn.Module, ranks: tuple[int, ...], alpha: float) -> Branch:
    return FORMATS.get(fmt)(base, tuple(ranks), alpha)


def reference_forward(base: nn.Module, branch: Branch | None, x: torch.Tensor, seed: torch.Tensor | None) -> torch.Tensor:
    """Slow, obvious path: per sample, `base_op(x_b, W0 + ΔW(c_b))`."""
    if branch is None:
        return base(x)
    dw = branch.delta_weight(seed)  # (N or 1, O, I, *k)
    outs = []
    for i in range(x.shape[0]):
        w = base.weight + dw[i if dw.shape[0] > 1 else 0]
        outs.append(Geometry(base).apply(x[i : i + 1], w, base.bias))
    return torch.cat(outs)
