"""The seed ablation (`seed_mode="frozen"`): c(x) is the format's start value for every input.

Adapter-level checks run on the tiny backbone; the training/serving checks train a real
efficientnet_lite0 adapter for one epoch on 20 sklearn digits and load it the way the service does.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from metalora.adapters import Adapter, AdapterConfig, FrozenSeed, MappingNet, MetaLoRAModel
from metalora.train import TrainConfig, count_params, ranks_for_budget
from tests.conftest import randomize

RANKS = {"cp": (3,), "tr": (2, 3, 2)}
START = {"cp": torch.ones(3), "tr": torch.eye(2).flatten()}  # DESIGN.md §2: c = 1 (CP), C = I (TR)


def _features(backbone, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, backbone.seed_in_dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("fmt", ["cp", "tr"])
def test_frozen_seed_is_the_start_value_for_any_input(tiny_backbone, fmt):
    ad = randomize(Adapter(tiny_backbone, AdapterConfig(fmt, RANKS[fmt], ["*"], ["a", "b"], seed_mode="frozen")).double())
    assert isinstance(ad.mapping, FrozenSeed)
    f = _features(tiny_backbone, 2, 0)
    assert not torch.equal(f[0], f[1])
    for layer, s in ad.seeds(f).items():  # (2, seed_dim) per layer
        assert torch.equal(s[0], s[1]), layer
        assert torch.equal(s[0], START[fmt].double()), layer
    # Nothing of the seed trains: the buffer is no parameter.
    assert not any(n.startswith("mapping.") for n, _ in ad.named_parameters())
    assert "mapping.seed0" in ad.state_dict()


@pytest.mark.parametrize("fmt", ["cp", "tr"])
def test_input_seed_differs_between_inputs(tiny_backbone, fmt):
    ad = randomize(Adapter(tiny_backbone, AdapterConfig(fmt, RANKS[fmt], ["*"], ["a", "b"])).double())
    assert isinstance(ad.mapping, MappingNet)
    f = _features(tiny_backbone, 2, 0)
    for layer, s in ad.seeds(f).items():
        assert not torch.allclose(s[0], s[1]), layer


@pytest.mark.parametrize("fmt", ["cp", "tr"])
def test_frozen_saves_exactly_the_mapping_network(tiny_backbone, fmt):
    """The trainable count drops by the mapping net's size, counted by hand from its layers."""
    fin, hid = tiny_backbone.seed_in_dim, 64
    seed_dim = Adapter(tiny_backbone, AdapterConfig(fmt, RANKS[fmt], ["*"], ["a"])).seed_dim
    mapping = 2 * fin + (fin * hid + hid) + (hid * seed_dim + seed_dim) + seed_dim  # LayerNorm, Linear, Linear, seed0
    on = count_params(tiny_backbone, fmt, RANKS[fmt], ["*"])
    off = count_params(tiny_backbone, fmt, RANKS[fmt], ["*"], seed_mode="frozen")
    assert on - off == mapping


def test_mixed_batch_with_a_frozen_adapter_equals_reference(tiny_backbone):
    torch.manual_seed(1)
    model = MetaLoRAModel(tiny_backbone)
    model.add_adapter("tr-off", randomize(Adapter(tiny_backbone, AdapterConfig("tr", (2, 3, 2), ["*"], list("ab"), seed_mode="frozen")).double()))
    model.add_adapter("tr-on", randomize(Adapter(tiny_backbone, AdapterConfig("tr", (2, 3, 2), ["*"], list("ab"))).double()))
    model.add_adapter("cp-off", randomize(Adapter(tiny_backbone, AdapterConfig("cp", (3,), ["*"], list("abc"), seed_mode="frozen")).double()))
    names = ["tr-off", "tr-on", None, "cp-off", "tr-off", "tr-on"]
    x = torch.randn(len(names), 3, 16, 16, dtype=torch.float64)
    ref = model.forward_reference(x, names)
    for gather in (True, False):
        model.gather = gather
        out = model.forward(x, names)
        torch.testing.assert_close(out.embeddings, ref.embeddings, rtol=0, atol=1e-10)
        for a, b in zip(out.logits, ref.logits):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    model.gather = True
    assert torch.equal(out.seeds[0], START["tr"].double().repeat(len(tiny_backbone.targetable())))


def test_config_rules_and_backward_compatible_records():
    with pytest.raises(ValueError, match="seed_mode"):
        AdapterConfig("cp", (2,), ["*"], ["a"], seed_mode="learned")
    with pytest.raises(ValueError, match="no seed"):
        AdapterConfig("lora", (2,), ["*"], ["a"], seed_mode="frozen")
    on = AdapterConfig("tr", (2, 3, 2), ["*"], ["a"])
    assert "seed_mode" not in on.to_dict()  # manifests and ONNX graph digests of MetaLoRA adapters stay as before
    assert AdapterConfig.from_dict(on.to_dict()).seed_mode == "input"  # an old manifest
    off = AdapterConfig("tr", (2, 3, 2), ["*"], ["a"], seed_mode="frozen")
    assert AdapterConfig.from_dict(off.to_dict()).seed_mode == "frozen"
    # Run hashes of existing configurations are unchanged (values computed by main before the field).
    assert TrainConfig(data=["x"]).run_hash() == "7092941bc4ba7c37"
    assert TrainConfig(data=["a", "b"], format="tr", ranks=(4, 3, 4), epochs=3, holdout_frac=0.1).run_hash() == "2e5e89d3d3d1ef79"
    assert TrainConfig(data=["x"], seed_mode="frozen").run_hash() != "7092941bc4ba7c37"


# ---------------------------------------------------------------- trained on the real backbone
TRAIN = "sklearn:digits?split=train,per_class=2"
TEST = "sklearn:digits?split=test,per_class=1"


@pytest.fixture(scope="module")
def backbone():
    from metalora.backbones import create_backbone

    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def trained(backbone, tmp_path_factory):
    """Two TR bundles trained on the same 20 digits, seed frozen and seed from the input, in a store."""
    from metalora.store import DEFAULT_STORE
    from metalora.train import train

    root = tmp_path_factory.mktemp("store")
    shutil.copytree(DEFAULT_STORE / "backbones", root / "backbones")
    cache = tmp_path_factory.mktemp("cache")
    out = {}
    for mode in ("frozen", "input"):
        cfg = TrainConfig(data=[TRAIN], format="tr", budget=30_000, epochs=1, batch_size=8, seed=0, seed_mode=mode)
        out[mode] = train(cfg, backbone, out=root / "adapters" / f"tr-{mode}" / "1", eval_data=[TEST], cache_dir=cache,
                          progress=False, thumbnails=False, device="cpu")
    return root, cache, out


def test_training_keeps_the_frozen_seed_at_its_start(backbone, trained):
    from metalora.data import load_features
    from metalora.features import embed_features, model_for

    _, cache, out = trained
    fs = load_features([TEST], backbone, cache_dir=cache, progress=False)
    for mode, res in out.items():
        ad = res["adapter"]
        _, _, seeds = embed_features(model_for(backbone), ad, fs.take([0, 5]))  # two different digits
        c0 = torch.eye(ad.config.ranks[2], ad.config.ranks[0]).flatten().repeat(len(ad.targets))  # the start value
        if mode == "frozen":
            assert torch.equal(ad.mapping.seed0, c0)
            assert torch.equal(seeds[0], seeds[1]) and torch.equal(seeds[0], c0)
            assert res["training"]["trainable_params"] == count_params(backbone, "tr", res["training"]["ranks"], res["training"]["targets"], seed_mode="frozen")
        else:  # after training the mapping network answers each input differently
            assert (seeds[0] - seeds[1]).abs().max() > 1e-6
    # At a matched budget the frozen ablation spends the mapping net's share on larger ring ranks.
    ranks, n = ranks_for_budget(backbone, "tr", 30_000, out["frozen"]["training"]["targets"], seed_mode="frozen")
    assert out["frozen"]["training"]["ranks"] == list(ranks) and abs(n - 30_000) <= 0.05 * 30_000


@pytest.mark.slow
def test_frozen_bundle_loads_and_serves(trained):
    from metalora.bundle import read_manifest
    from metalora.runtime import Runtime

    root, _, out = trained
    mf = read_manifest(root / "adapters" / "tr-frozen" / "1")
    assert mf["adapter"]["seed_mode"] == "frozen" and mf["training"]["seed_mode"] == "frozen"
    assert "seed_mode" not in read_manifest(root / "adapters" / "tr-input" / "1")["adapter"]
    rt = Runtime(root, device="cpu")
    keys = [rt.load("tr-frozen"), rt.load("tr-input")]
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 224, 224, generator=g) * 2 - 1
    names = [keys[0], keys[1], "base", keys[0]]
    got = rt.run(x, names)
    ref = rt.model.forward_reference(x, [None if k == "base" else k for k in names])
    assert (got.embeddings - ref.embeddings).abs().max().item() < 1e-4
    assert torch.equal(got.seeds[0], got.seeds[3]) and torch.equal(got.seeds[0], rt.model.adapters[keys[0]].mapping.seed0)
    # The loaded frozen adapter answers exactly as the trained one did.
    torch.testing.assert_close(rt.model.adapters[keys[0]].state_dict()["mapping.seed0"], out["frozen"]["adapter"].state_dict()["mapping.seed0"].float())
    pytest.importorskip("onnxruntime")
    from metalora.backends.onnx import OrtRunner

    runner = OrtRunner(rt, cache_dir=root / "onnx")
    o = runner.run(x[[0, 3]], [keys[0], keys[0]])
    assert (o.embeddings - got.embeddings[[0, 3]].float()).abs().max().item() <= 1e-4
    assert torch.allclose(o.seeds[0], got.seeds[0], atol=1e-5)


def test_tr_with_a_frozen_identity_core_is_lora_of_rank_r1_r2(tiny_backbone):
    """TR (R1, R2, R1) with C = I fixed is LoRA of rank R1·R2 with B's columns permuted, and from
    the same seed it starts and trains identically: why the matched-budget ablation (TR (4, 4, 4)
    at ~70k) reproduces the LoRA row (rank 16), and the same-ranks variant exists."""
    r1, r2 = 2, 3
    torch.manual_seed(7)
    tr = Adapter(tiny_backbone, AdapterConfig("tr", (r1, r2, r1), ["*"], list("abc"), seed_mode="frozen")).double()
    torch.manual_seed(7)
    lo = Adapter(tiny_backbone, AdapterConfig("lora", (r1 * r2,), ["*"], list("abc"))).double()
    assert tr.num_trainable() == lo.num_trainable()
    perm = torch.tensor([r * r2 + q for q in range(r2) for r in range(r1)])  # TR column q·R1+r <- LoRA column r·R2+q
    for key in tr.branches:
        assert torch.equal(tr.branches[key].A, lo.branches[key].A)  # the same initial draw
    model = MetaLoRAModel(tiny_backbone)
    model.add_adapter("tr", tr)
    model.add_adapter("lora", lo)
    opts = {n: torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=0.05) for n, a in (("tr", tr), ("lora", lo))}
    g = torch.Generator().manual_seed(0)
    for _ in range(4):  # a few optimiser steps on the same batches
        x = torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=g)
        for name, opt in opts.items():
            out = model.forward(x, [name] * 6)
            loss = torch.nn.functional.cross_entropy(torch.stack(out.logits), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for key in tr.branches:
        torch.testing.assert_close(tr.branches[key].B, lo.branches[key].B[:, perm], rtol=0, atol=1e-10)
        torch.testing.assert_close(tr.branches[key].delta_weight(tr.mapping.seed0[None, : r1 * r1]), lo.branches[key].delta_weight(), rtol=0, atol=1e-10)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward(x, ["tr"] * 3).embeddings, model.forward(x, ["lora"] * 3).embeddings, rtol=0, atol=1e-10)
