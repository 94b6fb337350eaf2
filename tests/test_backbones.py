"""Backbones by name: the shipped EfficientNet-Lite0 weights, torchvision/timm variants, ImageNet check."""

from __future__ import annotations

import pytest
import timm
import torch

from metalora.adapters import Adapter, AdapterConfig, MetaLoRAModel
from metalora.backbones import BACKBONES, create_backbone, efficientnet_lite0_key_map, efficientnet_lite0_weights_path

from .conftest import DATA, needs_shared, randomize, run_metalora


def test_key_map_covers_every_tensor_of_the_weights_file():
    raw = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    mapping = efficientnet_lite0_key_map(list(raw))
    model_keys = set(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    assert set(mapping) == set(raw), "every key of the file is mapped"
    assert set(mapping.values()) == model_keys, "every model tensor comes from the file"
    assert len(set(mapping.values())) == len(mapping), "no two file keys map to one model key"


def test_key_map_fails_loudly_on_unknown_keys():
    with pytest.raises(KeyError, match="unmapped"):
        efficientnet_lite0_key_map(["_conv_stem.weight", "_mystery.weight"])
    with pytest.raises(KeyError, match="out of range"):
        efficientnet_lite0_key_map(["_blocks.99._bn1.weight"])


def test_efficientnet_uses_tf_recipe():
    bb = create_backbone("efficientnet_lite0")
    assert bb.preprocess.mean == (0.5, 0.5, 0.5) and bb.preprocess.std == (0.5, 0.5, 0.5)
    assert bb.identity.weights_sha256.startswith("579344248a93")
    assert bb.net.bn1.eps == pytest.approx(1e-3)
    assert all(not p.requires_grad for p in bb.parameters())


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        create_backbone("vgg99")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mixer_s16_224"])
def test_registered_backbones_random_init(name):
    torch.manual_seed(0)
    bb = create_backbone(name, pretrained=False)
    assert name in BACKBONES
    x = torch.randn(2, 3, 224, 224)
    model = MetaLoRAModel(bb)
    targets = list(bb.targetable())
    assert targets, "a backbone exposes layers to adapt"
    model.add_adapter("cp", randomize(Adapter(bb, AdapterConfig("cp", (2,), [targets[0], targets[-1]], ["a", "b"])), 0.05))
    with torch.no_grad():
        out = model(x, ["cp", None])
        emb = bb.tail(bb.prefix(x))
    assert out.embeddings.shape == (2, bb.embed_dim)
    assert torch.isfinite(out.embeddings).all()
    assert out.logits[0].shape == (2,) and out.logits[1].shape == (bb.num_classes,)
    torch.testing.assert_close(out.embeddings[1], emb[1], rtol=1e-4, atol=1e-4)


def test_user_supplied_weights_file_loads(tmp_path):
    src = create_backbone("resnet18")
    f = tmp_path / "r18.pth"
    torch.save(src.net.state_dict(), f)
    bb = create_backbone("resnet18", weights=str(f))
    assert bb.identity.weights_sha256 is not None
    torch.testing.assert_close(bb.net.conv1.weight, src.net.conv1.weight)
    bad = {k: v for k, v in src.net.state_dict().items() if not k.startswith("fc.")}
    torch.save(bad, f)
    with pytest.raises(ValueError, match="missing"):
        create_backbone("resnet18", weights=str(f))


@needs_shared("imagenet-sample", "val.zip")
@pytest.mark.slow
def test_imagenet_sample_top1_at_least_85():
    from metalora.imagenet import evaluate_imagenet_sample

    bb = create_backbone("efficientnet_lite0").to(memory_format=torch.channels_last)
    res = evaluate_imagenet_sample(bb, DATA / "imagenet-sample" / "val.zip", DATA / "imagenet-sample" / "classes.tsv", progress=False)
    assert res["n"] == 1000
    assert res["top1"] >= 0.85, res


def test_a_non_default_prefix_cut_gets_its_own_cache_keys_and_bundles(tmp_path):
    """Features and graphs of blocks[:6] must never be read for a backbone cut at blocks[:5]."""
    from metalora.bundle import BundleError, check_backbone
    from metalora.data import DataSpec, cache_path
    from metalora.backends.export import graph_digest

    default, cut5 = create_backbone("efficientnet_lite0", pretrained=False), create_backbone("efficientnet_lite0", pretrained=False, split=5)
    cut5.net.load_state_dict(default.net.state_dict())  # same weights: only the cut differs
    assert default.identity.cut is None and "cut" not in default.identity.to_dict()  # old keys unchanged
    assert cut5.identity.to_dict()["cut"] == "blocks[:5]"
    spec = DataSpec.parse("sklearn:digits?split=train")
    assert cache_path(spec, default, tmp_path) != cache_path(spec, cut5, tmp_path)
    for part in ("prefix", "full"):
        assert graph_digest(default, None, 224, part) != graph_digest(cut5, None, 224, part)
    x = torch.randn(1, 3, 224, 224)
    assert default.prefix(x).shape[1:] == (192, 7, 7) and cut5.prefix(x).shape[1:] == (112, 14, 14)
    manifest = {"backbone": {**default.identity.to_dict(), "embed_dim": 1280, "seed_in_dim": 192}}
    assert check_backbone(manifest, default) is default
    # A default-cut bundle loads where the shared prefix ends earlier: on that backbone's view at its own cut.
    view = check_backbone(manifest, cut5)
    assert view.split == 6 and view.identity.cut is None and view.seed_in_dim == 192 and view.net is cut5.net
    # A bundle cut earlier than the serving prefix cannot: its first adapted layers are inside it.
    manifest5 = {"backbone": {**cut5.identity.to_dict(), "embed_dim": 1280, "seed_in_dim": 112}}
    with pytest.raises(BundleError, match=r"prefix ending at blocks\[:5\].*ends later, at blocks\[:6\]"):
        check_backbone(manifest5, default)
    with pytest.raises(BundleError, match="cut"):
        check_backbone({"backbone": {**manifest5["backbone"], "cut": "layer[:3]"}}, cut5)
    with pytest.raises(ValueError, match="split"):
        create_backbone("efficientnet_lite0", pretrained=False, split=7)
    with pytest.raises(ValueError, match="split"):
        create_backbone("efficientnet_lite0", pretrained=False, split=1)


@pytest.mark.slow
def test_cli_caches_features_at_the_cut_it_is_given(tmp_path):
    """`--split` reaches the backbone: blocks[:5] features are 112 x 14 x 14, the default's 192 x 7 x 7,
    and an impossible cut is one line, not a traceback."""
    spec = "sklearn:digits?split=train,per_class=1"
    r5 = run_metalora("cache-features", "--data", spec, "--split", "5", "--cache-dir", str(tmp_path))
    r6 = run_metalora("cache-features", "--data", spec, "--split", "6", "--cache-dir", str(tmp_path))
    rd = run_metalora("cache-features", "--data", spec, "--cache-dir", str(tmp_path))  # the shipped store's cut: blocks[:4]
    assert r5.returncode == 0 and r6.returncode == 0 and rd.returncode == 0, r5.stderr + r6.stderr + rd.stderr
    assert "(112, 14, 14)" in r5.stdout and "(192, 7, 7)" in r6.stdout and "(80, 14, 14)" in rd.stdout
    assert len(list((tmp_path / "prefix").glob("*.safetensors"))) == 3  # one entry a cut, none overwritten
    bad = run_metalora("cache-features", "--data", spec, "--split", "9", "--cache-dir", str(tmp_path), env={"COLUMNS": "300"})
    assert bad.returncode == 2 and "split must be 2..6" in bad.stderr and "Traceback" not in bad.stderr


def test_a_store_manifest_whose_kwargs_contradict_its_cut_is_refused(tmp_path):
    """Editing `"split"` in the store's backbone manifest without its seed_in_dim/targetable is caught at start."""
    import json
    import shutil

    from metalora.bundle import BundleError
    from metalora.runtime import Runtime
    from metalora.store import DEFAULT_STORE

    bdir = tmp_path / "backbones" / "efficientnet_lite0"
    shutil.copytree(DEFAULT_STORE / "backbones" / "efficientnet_lite0", bdir)
    (tmp_path / "adapters").mkdir()
    man = json.loads((bdir / "manifest.json").read_text())
    assert man["kwargs"] == {"split": 4} and man["seed_in_dim"] == 80  # the shipped store's cut
    man["kwargs"] = {"split": 6}
    (bdir / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match=r"seed_in_dim 80 \(they build 192\) and targetable"):  # every field to fix, in one message
        Runtime(tmp_path)
    man.update(seed_in_dim=192, targetable=None)
    (bdir / "manifest.json").write_text(json.dumps(man))
    assert Runtime(tmp_path).backbone.identity.cut is None
