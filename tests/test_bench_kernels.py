"""The batched (gathered) mixed-adapter path that the benchmarks time equals the per-segment loop
and the per-sample reference."""

from __future__ import annotations

import pytest
import torch

from metalora.adapters import Adapter, AdapterConfig, MetaLoRAModel
from metalora.adapters.formats import create_branch, gathered_update
from torch import nn

from .conftest import randomize

RANKS = {"lora": (3,), "cp": (3,), "tr": (2, 3, 2)}


@pytest.mark.parametrize("fmt", ["lora", "cp", "tr"])
@pytest.mark.parametrize("kind", ["conv1x1", "linear"])
def test_gathered_update_equals_each_branch_on_its_rows(fmt, kind):
    torch.manual_seed(0)
    base = (nn.Conv2d(5, 7, 1) if kind == "conv1x1" else nn.Linear(5, 7)).double()
    brs = [create_branch(fmt, base, RANKS[fmt], alpha=1.0 + i).double() for i in range(3)]
    for b in brs:
        nn.init.normal_(b.B, std=0.5)
        assert b.per_token
    counts = [2, 1, 3]
    x = torch.randn(6, 5, 4, 4, dtype=torch.float64) if kind == "conv1x1" else torch.randn(6, 2, 5, dtype=torch.float64)
    seed = torch.randn(6, brs[0].seed_dim, dtype=torch.float64) if brs[0].seed_dim else None
    got = gathered_update(brs, counts, x, seed)
    want, s = [], 0
    for b, c in zip(brs, counts):
        want.append(b(x[s : s + c], seed[s : s + c] if seed is not None else None))
        s += c
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-10, atol=1e-10)


def test_spatial_conv_is_not_per_token():
    assert not create_branch("lora", nn.Conv2d(4, 4, 3, padding=1), (2,), 1.0).per_token
    assert not create_branch("cp", nn.Conv2d(4, 4, 1, stride=2), (2,), 1.0).per_token


def test_many_adapters_mixed_batch_gathered_equals_loop_and_reference(tiny_backbone):
    """Several adapters per format, interleaved, so groups have several segments and some are not contiguous."""
    torch.manual_seed(3)
    model = MetaLoRAModel(tiny_backbone)
    names = []
    for fmt in ["lora", "cp", "tr"]:
        for j in range(3):
            cfg = AdapterConfig(fmt, RANKS[fmt], ["*"], labels=list("abc"), alpha=2.0 + j)
            model.add_adapter(f"{fmt}{j}", randomize(Adapter(tiny_backbone, cfg).double()))
            names.append(f"{fmt}{j}")
    order = [names[i % len(names)] for i in (0, 4, 8, 1, 5, 2, 6, 3, 7, 0, 8)] + [None]
    x = torch.randn(len(order), 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        model.gather = True
        fast = model(x, order)
        model.gather = False
        loop = model(x, order)
        ref = model.forward_reference(x, order)
    model.gather = True
    torch.testing.assert_close(fast.embeddings, loop.embeddings, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast.embeddings, ref.embeddings, rtol=1e-10, atol=1e-10)
    for a, b in zip(fast.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gathered_path_trains(tiny_backbone):
    model = MetaLoRAModel(tiny_backbone)
    ads = [randomize(Adapter(tiny_backbone, AdapterConfig("cp", (2,), ["*"], labels=list("ab"))).double()) for _ in range(2)]
    for i, a in enumerate(ads):
        model.add_adapter(f"a{i}", a)
    out = model(torch.randn(4, 3, 8, 8, dtype=torch.float64), ["a0", "a1", "a0", "a1"])
    torch.stack(out.logits).sum().backward()
    assert all(p.grad is not None for a in ads for p in a.parameters())
