"""The adapter math: factored forward vs explicit ΔW, mixed batches, zero-start."""

from __future__ import annotations

import itertools

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

from metalora.adapters import Adapter, AdapterConfig, MetaLoRAModel, create_branch, reference_forward
from metalora.adapters.formats import FORMATS

from .conftest import randomize

RANKS = {"lora": (3,), "cp": (3,), "tr": (2, 3, 2)}
FORMAT_NAMES = ["lora", "cp", "tr"]


def _seed(branch, n):
    return torch.randn(n, branch.seed_dim, dtype=torch.float64) if branch.seed_dim else None


CONV_CASES = [
    pytest.param(fmt, k, s, same, id=f"{fmt}-k{k}-s{s}{'-same' if same else ''}")
    for fmt, k, s, same in itertools.product(FORMAT_NAMES, (1, 3), (1, 2), (False, True))
    if not (same and k == 1)
]


@pytest.mark.parametrize("fmt,kernel,stride,same", CONV_CASES)
def test_factored_conv_equals_explicit_delta_weight(fmt, kernel, stride, same):
    torch.manual_seed(0)
    cls = Conv2dSame if same else nn.Conv2d
    pad = 0 if same else kernel // 2
    base = cls(5, 7, kernel, stride=stride, padding=pad, bias=True).double()
    br = create_branch(fmt, base, RANKS[fmt], alpha=4.0).double()
    nn.init.normal_(br.B, std=0.5)
    x = torch.randn(4, 5, 9, 9, dtype=torch.float64)
    seed = _seed(br, 4)
    fast = base(x) + br(x, seed)
    ref = reference_forward(base, br, x, seed)
    assert fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    assert (br(x, seed).abs().max() > 1e-3), "the update must not be trivially zero in this test"


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("lead", [(), (6,)], ids=["BxI", "BxTxI"])
def test_factored_linear_equals_explicit_delta_weight(fmt, lead):
    torch.manual_seed(1)
    base = nn.Linear(5, 7).double()
    br = create_branch(fmt, base, RANKS[fmt], alpha=2.0).double()
    nn.init.normal_(br.B, std=0.5)
    x = torch.randn(3, *lead, 5, dtype=torch.float64)
    seed = _seed(br, 3)
    torch.testing.assert_close(base(x) + br(x, seed), reference_forward(base, br, x, seed), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_delta_weight_shape_and_seed_dependence(fmt):
    base = nn.Conv2d(4, 6, 3, padding=1).double()
    br = create_branch(fmt, base, RANKS[fmt], alpha=1.0).double()
    nn.init.normal_(br.B)
    dw = br.delta_weight(_seed(br, 2))
    assert dw.shape[1:] == (6, 4, 3, 3)
    if fmt == "lora":
        assert dw.shape[0] == 1
    else:
        assert dw.shape[0] == 2 and not torch.allclose(dw[0], dw[1]), "different seeds must give different ΔW"


def _model_with_adapters(backbone):
    model = MetaLoRAModel(backbone)
    for fmt in FORMAT_NAMES:
        cfg = AdapterConfig(fmt, RANKS[fmt], ["*"], labels=list("abcd"))
        model.add_adapter(fmt, randomize(Adapter(backbone, cfg).double()))
    return model


def test_mixed_batch_equals_per_sample_reference(tiny_backbone):
    model = _model_with_adapters(tiny_backbone)
    x = torch.randn(7, 3, 10, 10, dtype=torch.float64)
    names = ["cp", None, "tr", "cp", "lora", None, "tr"]
    with torch.no_grad():
        fast = model(x, names)
        ref = model.forward_reference(x, names)
        alone = [model(x[i : i + 1], [n]) for i, n in enumerate(names)]
    torch.testing.assert_close(fast.embeddings, ref.embeddings, rtol=1e-10, atol=1e-10)
    for i in range(len(names)):
        torch.testing.assert_close(fast.logits[i], ref.logits[i], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fast.embeddings[i], alone[i].embeddings[0], rtol=1e-10, atol=1e-10)
        assert (fast.seeds[i] is None) == (names[i] in (None, "lora"))
    # the adapters really change the output: an adapted sample differs from the bare backbone
    bare = model(x, [None] * 7).embeddings
    assert (fast.embeddings[0] - bare[0]).abs().max() > 1e-4


def test_mixed_batch_on_real_efficientnet(tmp_path):
    from metalora.backbones import create_backbone

    bb = create_backbone("efficientnet_lite0").double()
    model = _model_with_adapters(bb)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    names = ["tr", "cp", None, "lora"]
    with torch.no_grad():
        fast, ref = model(x, names), model.forward_reference(x, names)
    torch.testing.assert_close(fast.embeddings, ref.embeddings, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_zero_start_equals_frozen_backbone(tiny_backbone, fmt):
    model = MetaLoRAModel(tiny_backbone)
    model.add_adapter("new", Adapter(tiny_backbone, AdapterConfig(fmt, RANKS[fmt], ["*"], labels=["x", "y"])).double())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        adapted = model(x, ["new"] * 3).embeddings
        frozen = tiny_backbone.tail(tiny_backbone.prefix(x))
    torch.testing.assert_close(adapted, frozen, rtol=0, atol=0)


def test_seed_starts_at_its_default_and_depends_on_input(tiny_backbone):
    ad = Adapter(tiny_backbone, AdapterConfig("cp", (3,), ["*"], labels=["x"])).double()
    f = torch.randn(2, tiny_backbone.seed_in_dim, dtype=torch.float64)
    for s in ad.seeds(f).values():
        torch.testing.assert_close(s, torch.ones_like(s))
    randomize(ad)
    seeds = torch.cat(list(ad.seeds(f).values()), dim=1)
    assert not torch.allclose(seeds[0], seeds[1]), "the mapping network must condition the seed on the input"


def test_only_adapters_train(tiny_backbone):
    model = MetaLoRAModel(tiny_backbone)
    ad = Adapter(tiny_backbone, AdapterConfig("tr", (2, 2, 2), ["*"], labels=list("ab"))).double()
    model.add_adapter("a", ad)
    model.train()
    assert not tiny_backbone.training, "the frozen backbone stays in eval mode"
    out = model(torch.randn(2, 3, 8, 8, dtype=torch.float64), ["a", "a"])
    torch.stack(out.logits).sum().backward()
    assert all(p.grad is None for p in tiny_backbone.parameters())
    assert all(p.grad is not None for p in ad.parameters())


def test_config_validation():
    with pytest.raises(KeyError, match="unknown adapter format"):
        AdapterConfig("svd", (2,), ["*"], ["a"])
    with pytest.raises(ValueError, match="takes 3"):
        AdapterConfig("tr", (2,), ["*"], ["a"])
    assert set(FORMATS.names()) == {"lora", "cp", "tr"}


def test_target_pattern_must_match(tiny_backbone):
    with pytest.raises(ValueError, match="matches no adaptable layer"):
        Adapter(tiny_backbone, AdapterConfig("lora", (2,), ["nope.*"], ["a"]))
    ad = Adapter(tiny_backbone, AdapterConfig("lora", (2,), ["conv_*"], ["a"]))
    assert ad.targets == ["conv_a", "conv_b"]


def test_unknown_adapter_in_batch(tiny_backbone):
    model = MetaLoRAModel(tiny_backbone)
    with pytest.raises(KeyError, match="not loaded"):
        model(torch.randn(1, 3, 8, 8, dtype=torch.float64), ["ghost"])
