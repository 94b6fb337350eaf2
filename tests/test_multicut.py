"""One store, bundles of two prefix cuts: the shared prefix runs to the earliest cut, and each
adapter reads its seed at its own cut (torch `MetaLoRAModel`, ONNX Runtime `OrtRunner`).

The reference for every adapter is the same bundle loaded on a backbone cut where it was trained
(its own store), the configuration every other test checks; the mixed batch must give its answers.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from metalora.adapters import Adapter, AdapterConfig
from metalora.backbones import create_backbone
from metalora.bundle import BundleError, save_bundle
from metalora.runtime import Runtime
from metalora.store import DEFAULT_STORE
from tests.conftest import randomize

TOL = 1e-4


def _store(root, split: int):
    bdir = root / "backbones" / "efficientnet_lite0"
    shutil.copytree(DEFAULT_STORE / "backbones" / "efficientnet_lite0", bdir)
    man = json.loads((bdir / "manifest.json").read_text())
    bb = create_backbone("efficientnet_lite0", pretrained=False, split=split)
    man.update(kwargs={"split": split}, seed_in_dim=bb.seed_in_dim, targetable=sorted(bb.targetable()))
    (bdir / "manifest.json").write_text(json.dumps(man))
    (root / "adapters").mkdir()
    return root


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A blocks[:5] store holding a cut-6 bundle (tr, all of block 6) and a cut-5 bundle (cp, blocks
    5 and 6); a blocks[:4] store holding those two and a cut-4 bundle (lora, blocks 4-6); and each
    bundle alone in a store of its own cut (the references)."""
    own6 = _store(tmp_path_factory.mktemp("own6"), 6)
    own5 = _store(tmp_path_factory.mktemp("own5"), 5)
    own4 = _store(tmp_path_factory.mktemp("own4"), 4)
    mixed = _store(tmp_path_factory.mktemp("mixed"), 5)
    mixed4 = _store(tmp_path_factory.mktemp("mixed4"), 4)
    torch.manual_seed(0)
    for root, name, fmt, ranks in ((own6, "late", "tr", (2, 3, 2)), (own5, "early", "cp", (4,)), (own4, "earliest", "lora", (4,))):
        bb = Runtime(root).backbone
        ad = randomize(Adapter(bb, AdapterConfig(fmt, ranks, ["blocks.*.conv_pw*", "conv_head"], [f"c{i}" for i in range(7)])), std=0.05)
        for dest in (root, mixed, mixed4) if name != "earliest" else (root, mixed4):
            save_bundle(dest / "adapters" / name / "1", ad, bb, name=name, version="1")
    return {"own6": own6, "own5": own5, "own4": own4, "mixed": mixed, "mixed4": mixed4}


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 224, 224, generator=g) * 2 - 1  # (n, 3, 224, 224), the backbone's [-1, 1] range


def _reference(stores, x, keys):
    """Each sample through its bundle on a runtime of the bundle's own cut."""
    rts = {"late@1": Runtime(stores["own6"]), "early@1": Runtime(stores["own5"]), "earliest@1": Runtime(stores["own4"])}
    for k, rt in rts.items():
        if k in keys:
            rt.load(k)
    outs = [rts[k].run(x[i : i + 1], [k]) for i, k in enumerate(keys)]
    return torch.cat([o.embeddings for o in outs]), [o.logits[0] for o in outs], [o.seeds[0] for o in outs]


def _diff(a, b) -> float:
    """Largest elementwise difference of two lists of tensors; None (a LoRA's seed) only against None."""
    assert [x is None for x in a] == [y is None for y in b]
    return max(((x.float() - y.float()).abs().max().item() for x, y in zip(a, b) if x is not None), default=0.0)


@pytest.mark.slow
def test_a_mixed_batch_of_two_cuts_answers_as_each_bundle_on_its_own_cut(stores):
    rt = Runtime(stores["mixed"])
    assert rt.backbone.split == 5
    for k in ("late", "early"):
        rt.load(k)
    assert rt.model.adapters["late@1"].split == 6 and rt.model.adapters["early@1"].split == 5
    keys = ["late@1", "early@1", "late@1", "late@1", "early@1"]
    x = _images(len(keys), 1)
    emb, logits, seeds = _reference(stores, x, keys)
    for gather in (True, False):
        rt.model.gather = gather
        out = rt.run(x, keys)
        assert (out.embeddings - emb).abs().max().item() <= TOL
        assert _diff(out.logits, logits) <= TOL and _diff(out.seeds, seeds) <= TOL
    ref = rt.model.forward_reference(x, keys)  # W0 + ΔW(c) explicitly, one sample at a time
    assert (ref.embeddings - emb).abs().max().item() <= TOL and _diff(ref.seeds, seeds) <= TOL


@pytest.mark.slow
def test_onnx_bridges_later_cuts_and_reuses_their_own_tail_graphs(stores, tmp_path):
    pytest.importorskip("onnxruntime")
    from metalora.backends.onnx import OrtRunner

    rt = Runtime(stores["mixed"])
    for k in ("late", "early"):
        rt.load(k)
    runner = OrtRunner(rt, cache_dir=tmp_path)
    keys = ["early@1", "late@1", "base", "late@1", "early@1", "late@1"]
    x = _images(len(keys), 2)
    got, want = runner.run(x, keys), rt.run(x, keys)
    assert (got.embeddings - want.embeddings).abs().max().item() <= TOL
    assert _diff(got.logits, want.logits) <= TOL and _diff([s for s in got.seeds if s is not None], [s for s in want.seeds if s is not None]) <= TOL
    assert len(list(tmp_path.glob("efficientnet_lite0-bridge-5-6-*.onnx"))) == 1
    # The cut-6 bundle's tail graph is the one a blocks[:6] store builds: the same cached file.
    own = Runtime(stores["own6"])
    own.load("late")
    assert OrtRunner(own, cache_dir=tmp_path).graph_path("late@1") == runner.graph_path("late@1")
    only_late = runner.run(x[:2], ["late@1"] * 2)  # every row through the bridge, none left at the prefix
    assert (only_late.embeddings - rt.run(x[:2], ["late@1"] * 2).embeddings).abs().max().item() <= TOL
    # What `metalora serve` runs on CPU by default (--precision fp32): the static-pad prefix and bridge.
    from metalora.backends.lowp import LowpRunner

    static = LowpRunner(rt, "fp32", cache_dir=tmp_path)
    got = static.run(x, keys)
    assert (got.embeddings - want.embeddings).abs().max().item() <= TOL and _diff(got.logits, want.logits) <= TOL
    assert len(list(tmp_path.glob("efficientnet_lite0-bridge-static-5-6-*.onnx"))) == 1


@pytest.mark.slow
def test_a_blocks4_store_serves_three_cuts_in_one_batch(stores, tmp_path):
    """Three cuts at once: rows of cut-5 and cut-6 bundles are bridged 4 -> 5, then the cut-6 rows
    5 -> 6, in torch, ONNX Runtime and the service's static-pad CPU runner alike."""
    pytest.importorskip("onnxruntime")
    from metalora.backends.lowp import LowpRunner
    from metalora.backends.onnx import OrtRunner

    rt = Runtime(stores["mixed4"])
    assert rt.backbone.split == 4
    for k in ("late", "early", "earliest"):
        rt.load(k)
    assert [rt.model.adapters[f"{k}@1"].split for k in ("late", "early", "earliest")] == [6, 5, 4]
    keys = ["earliest@1", "late@1", "early@1", "late@1", "earliest@1", "early@1"]
    x = _images(len(keys), 3)
    emb, logits, seeds = _reference(stores, x, keys)
    out = rt.run(x, keys)
    assert (out.embeddings - emb).abs().max().item() <= TOL
    assert _diff(out.logits, logits) <= TOL and _diff(out.seeds, seeds) <= TOL
    for runner in (OrtRunner(rt, cache_dir=tmp_path), LowpRunner(rt, "fp32", cache_dir=tmp_path)):
        got = runner.run(x, keys)
        assert (got.embeddings - emb).abs().max().item() <= TOL and _diff(got.logits, logits) <= TOL
    for kind in ("bridge", "bridge-static"):
        assert len(list(tmp_path.glob(f"efficientnet_lite0-{kind}-4-5-*.onnx"))) == 1
        assert len(list(tmp_path.glob(f"efficientnet_lite0-{kind}-5-6-*.onnx"))) == 1


def test_a_bundle_cut_before_the_serving_prefix_is_refused_with_the_fix(stores, tmp_path):
    """The cut-5 bundle in a default (blocks[:6]) store: a 4xx-able BundleError naming both cuts."""
    root = _store(tmp_path, 6)
    shutil.copytree(stores["own5"] / "adapters" / "early", root / "adapters" / "early")
    with pytest.raises(BundleError, match=r"blocks\[:5\].*later, at blocks\[:6\].*kwargs.split. and the .seed_in_dim. and .targetable.*--split 6") as e:
        Runtime(root).load("early")
    assert e.value.code == "backbone_mismatch"
