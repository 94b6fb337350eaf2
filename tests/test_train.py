"""Training: data specs, matched budgets, determinism, resume, bundles written and loadable."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from metalora.bundle import load_bundle, load_gallery, read_manifest
from metalora.data import DataSpec, list_items, load_features
from metalora.train import TrainConfig, count_params, ranks_for_budget, train

TRAIN = "sklearn:digits?split=train,per_class=2"
TEST = "sklearn:digits?split=test,per_class=1"


@pytest.fixture(scope="module")
def backbone():
    from metalora.backbones import create_backbone

    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, backbone):
    d = tmp_path_factory.mktemp("cache")
    load_features([TRAIN], backbone, cache_dir=d, progress=False)  # computed once for the module
    load_features([TEST], backbone, cache_dir=d, progress=False)
    return d


def test_spec_parsing_and_errors():
    s = DataSpec.parse("digits=sklearn:digits?split=train,per_class=5,split_seed=3")
    assert (s.task, s.source, s.split, s.per_class, s.split_seed) == ("digits", "sklearn:digits", "train", 5, 3)
    assert DataSpec.parse("../shared/data/cifar10/train.zip?per_class=10").name == "cifar10"
    for bad in ("sklearn:digits", "sklearn:digits?split=val", "sklearn:iris?split=train", "x.zip?colour=red", "x.zip?split=train"):
        with pytest.raises(ValueError):
            DataSpec.parse(bad)


def test_digits_split_is_disjoint_stratified_and_seeded():
    tr = list_items(DataSpec.parse("sklearn:digits?split=train"))
    te = list_items(DataSpec.parse("sklearn:digits?split=test"))
    assert not {i.id for i in tr} & {i.id for i in te}
    assert len(tr) + len(te) == 1797
    for c in "0123456789":  # stratified: each class split about in half
        a, b = sum(i.label == c for i in tr), sum(i.label == c for i in te)
        assert abs(a - b) <= 1
    again = list_items(DataSpec.parse("sklearn:digits?split=test"))
    other = list_items(DataSpec.parse("sklearn:digits?split=test,split_seed=1"))
    assert [i.id for i in again] == [i.id for i in te] and [i.id for i in other] != [i.id for i in te]
    sub = list_items(DataSpec.parse("sklearn:digits?split=train,per_class=4"))
    assert len(sub) == 40 and {i.id for i in sub} <= {i.id for i in tr}


def test_joint_label_space_needs_task_prefixes(backbone, cache):
    with pytest.raises(ValueError, match="task="):
        load_features([TRAIN, TEST], backbone, cache_dir=cache, progress=False)
    fs = load_features([f"a={TRAIN}", f"b={TEST}"], backbone, cache_dir=cache, progress=False)
    assert fs.classes[:2] == ["a/0", "a/1"] and "b/9" in fs.classes and len(fs.classes) == 20
    assert set(fs.tasks) == {"a", "b"} and fs.ids[0].startswith("a/digits/")


@pytest.mark.parametrize("budget", [30_000, 70_000, 150_000])
def test_budget_gives_matched_counts(backbone, budget):
    targets = ["blocks.6.0.conv_pw", "blocks.6.0.conv_pwl", "conv_head"]
    counts = {}
    for fmt in ("lora", "cp", "tr"):
        ranks, n = ranks_for_budget(backbone, fmt, budget, targets)
        assert n == count_params(backbone, fmt, ranks, targets)  # the predicted count is the real one
        counts[fmt] = n
        assert abs(n - budget) <= 0.1 * budget, (fmt, ranks, n)
    assert max(counts.values()) <= 1.1 * min(counts.values())


def _weights(summary) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in summary["adapter"].state_dict().items()}


@pytest.mark.parametrize("fmt", ["lora", "cp", "tr"])
def test_train_writes_a_loadable_bundle(backbone, cache, tmp_path, fmt):
    cfg = TrainConfig(data=[TRAIN], format=fmt, budget=30_000, epochs=1, batch_size=8, seed=0)
    out = tmp_path / "digits" / "1"
    res = train(cfg, backbone, out=out, eval_data=[TEST], cache_dir=cache, progress=False, thumbnails=fmt == "lora")
    adapter, manifest = load_bundle(out, backbone)
    assert manifest["adapter"]["format"] == fmt and manifest["trainable_params"] == res["training"]["trainable_params"]
    assert abs(manifest["trainable_params"] - 30_000) <= 3_000
    assert manifest["training"]["data"] == [TRAIN] and manifest["preprocess"]["input_size"] == 224
    m = manifest["metrics"]
    assert m["n"] == 10 and m["k"] == 10 and 0.0 <= m["knn_top1"] <= 1.0 and 0.0 <= m["head_top1"] <= 1.0
    g = load_gallery(out, manifest)
    assert g.embeddings.shape == (20, 1280) and g.ids[0].startswith("digits/") and len(set(g.labels.tolist())) == 10
    # Asked for: one thumbnail per item, made from the item's own source image (8×8 digits: kept at
    # 8×8, never enlarged). By default the gallery holds no copies of the training images.
    src = {it.id: it.read() for it in list_items(DataSpec.parse(TRAIN))}
    assert (g.thumbnails is not None) == (fmt == "lora")
    for item_id, thumb in zip(g.ids, g.thumbnails or []):
        small = np.asarray(Image.open(io.BytesIO(thumb)).convert("L"), dtype=float)
        want = np.asarray(Image.open(io.BytesIO(src[item_id])).convert("L"), dtype=float)
        assert small.shape == want.shape == (8, 8) and np.abs(small - want).mean() < 20, item_id
    # The bundle's adapter gives the training run's weights back exactly.
    for k, v in _weights(res).items():
        assert torch.equal(adapter.state_dict()[k], v), k
    assert any(float(b.B.abs().sum()) > 0 for b in adapter.branches.values())  # it did learn


def test_same_seed_same_weights_other_seed_differs(backbone, cache):
    runs = [train(TrainConfig(data=[TRAIN], format="cp", budget=30_000, epochs=1, batch_size=8, seed=s), backbone,
                  cache_dir=cache, progress=False) for s in (3, 3, 4)]
    a, b, c = (_weights(r) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_equals_uninterrupted(backbone, cache, tmp_path):
    cfg = lambda: TrainConfig(data=[TRAIN], format="tr", budget=30_000, epochs=2, batch_size=8, seed=1)  # noqa: E731
    full = _weights(train(cfg(), backbone, cache_dir=cache, progress=False))
    ck = tmp_path / "ckpt"
    half = train(cfg(), backbone, ckpt_dir=ck, cache_dir=cache, progress=False, stop_after_epoch=1)
    assert json.loads((ck / "state.json").read_text())["epoch"] == 1
    assert len(half["training"]["history"]) == 1
    resumed = train(cfg(), backbone, ckpt_dir=ck, cache_dir=cache, progress=False)
    assert [h["epoch"] for h in resumed["training"]["history"]] == [1, 2]
    r = _weights(resumed)
    assert all(torch.equal(full[k], r[k]) for k in full)
    # A finished run asked for another gallery size resumes after its last epoch (no retraining):
    # the gallery is built after training. Another learning rate is another run: it starts over.
    regallery = train(replace(cfg(), gallery_per_class=1), backbone, ckpt_dir=ck, cache_dir=cache, progress=False)
    assert [h["epoch"] for h in regallery["training"]["history"]] == [1, 2] and len(regallery["gallery"].ids) == 10
    assert all(torch.equal(full[k], v) for k, v in _weights(regallery).items())
    other = train(replace(cfg(), lr=1e-2), backbone, ckpt_dir=ck, cache_dir=cache, progress=False, stop_after_epoch=1)
    assert not all(torch.equal(full[k], v) for k, v in _weights(other).items())


def test_cli_train_then_eval_json(backbone, cache, tmp_path):
    from metalora.cli import app

    out = tmp_path / "store" / "adapters" / "tiny" / "1"
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--data", TRAIN, "--eval-data", TEST, "--format", "lora", "--rank", "4", "--epochs", "1",
                            "--batch-size", "8", "--out", str(out), "--checkpoint", str(tmp_path / "ck"), "--cache-dir", str(cache), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # --json: stdout is the summary alone (epoch lines and bars go to stderr)
    assert summary["training"]["ranks"] == [4] and read_manifest(out)["name"] == "tiny"
    r = runner.invoke(app, ["eval", "--adapter", "tiny", "--store", str(tmp_path / "store"), "--data", TEST,
                            "--cache-dir", str(cache), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    for key in ("adapter", "knn_top1", "head_top1", "n", "k", "vote", "per_class", "gallery_items"):
        assert key in res
    assert res["adapter"] == "tiny@1" and res["n"] == 10 and set(res["per_class"]) == set("0123456789")
    # The same bundle through the CLI reproduces the figure the training run wrote into its manifest.
    assert res["knn_top1"] == pytest.approx(summary["metrics"]["knn_top1"], abs=1e-9)
    r = runner.invoke(app, ["train", "--data", "sklearn:digits", "--out", str(tmp_path / "x" / "1")])
    assert r.exit_code != 0 and "split" in r.output
    # A bundle already at --out is not replaced unless asked: refused before any training, files untouched.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    small = ["train", "--data", TRAIN, "--format", "lora", "--rank", "2", "--epochs", "1", "--batch-size", "8", "--cache-dir", str(cache), "--no-baseline"]
    again = [*small, "--out", str(out), "--checkpoint", str(tmp_path / "ck2")]
    r = runner.invoke(app, again)
    assert r.exit_code == 2 and "--overwrite" in r.output and not (tmp_path / "ck2").exists()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    r = runner.invoke(app, [*again, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert read_manifest(out)["training"]["ranks"] == [2]
    # What writing the bundle would destroy, or could not name, is refused even with --overwrite, before training.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "afile.txt").write_text("mine")
    for target, words in ((tmp_path / "notes", "no bundle"), (tmp_path / "afile.txt", "is a file"), (tmp_path / "store" / "adapters" / "tiny", "no bundle"),
                          (tmp_path / "Bad Name" / "1", "bundle name")):
        r = runner.invoke(app, [*small, "--out", str(target), "--checkpoint", str(tmp_path / "ck3"), "--overwrite"])
        said = " ".join(re.sub("[│╭╮╰╯─]", " ", r.output).split())  # rich's error box wraps lines
        assert r.exit_code == 2 and words in said, (target, said)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine" and (tmp_path / "afile.txt").read_text() == "mine"
    assert read_manifest(out)["training"]["ranks"] == [2] and not (tmp_path / "ck3").exists()


def test_a_checkpoint_of_another_prefix_cut_is_not_resumed(tmp_path):
    """Same settings, other `--split`: the layers and shapes differ, so the run starts over."""
    import json as _json

    from metalora.train import TrainConfig, _load_ckpt

    cfg = TrainConfig(data=["sklearn:digits?split=train"])
    (tmp_path / "state.json").write_text(_json.dumps({"epoch": 1, "run_hash": cfg.run_hash(), "backbone_cut": "blocks[:5]"}))
    assert _load_ckpt(tmp_path, None, None, cfg, cut=None) is None
    assert _load_ckpt(tmp_path, None, None, cfg, cut="blocks[:4]") is None


def test_hflip_view_is_the_mirrored_photo(backbone, cache):
    """`hflip=1` caches the features of each image mirrored left to right: the reference is the prefix
    run on the photo mirrored by PIL before any preprocessing; ids and labels are the set's own."""
    from PIL import ImageOps

    from metalora.data import cache_path
    from metalora.images import Preprocessor

    spec = DataSpec.parse(TRAIN)
    flipped = spec.flipped()
    assert flipped.hflip and flipped.text == TRAIN + ",hflip=1" and DataSpec.parse(flipped.text) == flipped
    assert cache_path(flipped, backbone, cache) != cache_path(spec, backbone, cache)
    with pytest.raises(ValueError, match="hflip"):
        DataSpec.parse("x.zip?hflip=yes")
    plain = load_features([TRAIN], backbone, cache_dir=cache, progress=False)
    mirror = load_features([flipped.text], backbone, cache_dir=cache, progress=False)
    assert mirror.ids == plain.ids and mirror.labels == plain.labels
    pre = Preprocessor(backbone.preprocess)
    items = list_items(spec)
    with torch.no_grad():
        for i in (0, 7):
            img = ImageOps.mirror(Image.open(io.BytesIO(items[i].read())).convert("RGB"))
            want = backbone.prefix(pre(img)[None]).float()[0]
            got = mirror.h[i].float()
            assert torch.allclose(got, want, atol=2e-2, rtol=2e-2), float((got - want).abs().max())
            assert not torch.allclose(plain.h[i].float(), want, atol=2e-2, rtol=2e-2)  # a digit is not its own mirror


def test_hflip_augment_is_seeded_resumable_and_recorded(backbone, cache, tmp_path):
    from metalora.data import cache_path

    cfg = lambda **kw: TrainConfig(data=[TRAIN], format="tr", budget=30_000, epochs=2, batch_size=8, seed=1, **kw)  # noqa: E731
    full = _weights(train(cfg(augment="hflip"), backbone, cache_dir=cache, progress=False))
    assert cache_path(DataSpec.parse(TRAIN).flipped(), backbone, cache).is_file()  # the mirrored view is cached once
    plain = _weights(train(cfg(), backbone, cache_dir=cache, progress=False))
    assert not all(torch.equal(full[k], plain[k]) for k in full)  # it did see other inputs
    ck = tmp_path / "ckpt"
    train(cfg(augment="hflip"), backbone, ckpt_dir=ck, cache_dir=cache, progress=False, stop_after_epoch=1)
    out = tmp_path / "digits" / "2"
    resumed = train(cfg(augment="hflip"), backbone, out=out, ckpt_dir=ck, cache_dir=cache, progress=False)
    assert all(torch.equal(full[k], v) for k, v in _weights(resumed).items())
    assert read_manifest(out)["training"]["augment"] == "hflip"
    assert cfg().run_hash() != cfg(augment="hflip").run_hash()
    with pytest.raises(ValueError, match="augment"):
        train(cfg(augment="rotate"), backbone, cache_dir=cache, progress=False)


def test_gallery_form_is_not_a_new_training_run():
    """`gallery_pq` (like the gallery size) shapes only what is built after the last epoch: a finished
    checkpoint resumes with it, and runs without it keep the hashes they had before it existed."""
    from dataclasses import asdict

    from metalora.train import _same_training

    cfg = TrainConfig(data=[TRAIN], format="tr", budget=30_000)
    assert "gallery_pq" not in json.dumps(cfg.run_hash()) and cfg.run_hash() == TrainConfig(data=[TRAIN], format="tr", budget=30_000).run_hash()
    assert _same_training(asdict(cfg), replace(cfg, gallery_pq=160, gallery_per_class=1000))
    assert not _same_training(asdict(cfg), replace(cfg, augment="hflip"))
    assert replace(cfg, gallery_pq=160).run_hash() != cfg.run_hash()


def test_task_balanced_order_draws_each_task_equally():
    from collections import Counter

    from metalora.train import epoch_order, task_balanced_order

    tasks = ["big"] * 900 + ["mid"] * 250 + ["tiny"] * 50  # 1,200 images: 400 places a task
    order = task_balanced_order(tasks, seed=0, epoch=3)
    assert order.shape == (1200,) and torch.equal(order, task_balanced_order(tasks, seed=0, epoch=3))
    assert not torch.equal(order, task_balanced_order(tasks, seed=0, epoch=4))
    counts = Counter(tasks[i] for i in order.tolist())
    assert counts == {"big": 400, "mid": 400, "tiny": 400}
    big = [i for i in order.tolist() if tasks[i] == "big"]
    assert len(set(big)) == 400  # a large task is subsampled without repeats
    tiny = Counter(i for i in order.tolist() if tasks[i] == "tiny")
    assert set(tiny) == set(range(1150, 1200)) and set(tiny.values()) == {8}  # a small one: 8 whole passes
    assert torch.equal(task_balanced_order(["a"] * 7, 2, 1), epoch_order(7, 2, 1))
    with pytest.raises(ValueError, match="sampling"):
        train(TrainConfig(data=[TRAIN], sampling="uniform"), None)


def test_a_checkpoint_from_before_a_new_config_field_still_resumes():
    """A checkpoint written before `augment`/`sampling`/`gallery_pq`/`cosine_loss` existed has no such keys: with
    them at their defaults the config is the same training run (a finished run must not retrain)."""
    from dataclasses import asdict

    from metalora.train import _same_training

    cfg = TrainConfig(data=[TRAIN], format="tr", budget=30_000)
    old = {k: v for k, v in asdict(cfg).items() if k not in ("augment", "sampling", "gallery_pq", "seed_mode", "cosine_loss")}
    assert _same_training(old, replace(cfg, gallery_pq=160))
    assert not _same_training(old, replace(cfg, sampling="task-balanced"))


def test_bad_training_options_fail_before_the_first_epoch(backbone, cache, tmp_path):
    """--gallery-pq that cannot work, hflip twice, or task-balanced sampling of one task: refused
    up front (a gallery error used to come after the last epoch)."""
    from metalora.bundle import BundleError

    base = dict(data=[TRAIN], format="tr", budget=30_000, epochs=1, batch_size=8)
    ck = tmp_path / "ck"
    for cfg, match in ((TrainConfig(**base, gallery_pq=7), "multiple"), (TrainConfig(**base, gallery_pq=16), "256"),
                       (TrainConfig(**{**base, "data": [TRAIN + ",hflip=1"]}, augment="hflip"), "without hflip"),
                       (TrainConfig(**base, sampling="task-balanced"), "several tasks")):
        with pytest.raises((BundleError, ValueError), match=match):
            train(cfg, backbone, ckpt_dir=ck, cache_dir=cache, progress=False)
        assert not (ck / "state.json").exists()  # no epoch ran


def test_cosine_softmax_loss_matches_its_formula():
    """NormFace's loss, written out in numpy: -log softmax(s * cos(e_i, w_c))[y_i], averaged."""
    from metalora.train import COSINE_SCALE, cosine_softmax_loss

    g = torch.Generator().manual_seed(0)
    emb, w, y = torch.randn(6, 5, generator=g) * 3, torch.randn(4, 5, generator=g), torch.tensor([0, 1, 2, 3, 1, 0])
    e, ww = emb.double().numpy(), w.double().numpy()
    cos = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (ww / np.linalg.norm(ww, axis=1, keepdims=True)).T
    z = COSINE_SCALE * cos
    ref = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(6), y.numpy()])
    assert float(cosine_softmax_loss(emb, w, y)) == pytest.approx(ref, rel=1e-5)
    assert float(cosine_softmax_loss(emb * 7.0, w * 0.1, y)) == pytest.approx(ref, rel=1e-5)  # scale-free in both


def test_cosine_loss_trains_other_weights_and_is_recorded(backbone, cache, tmp_path):
    cfg = lambda **kw: TrainConfig(data=[TRAIN], format="tr", budget=30_000, epochs=1, batch_size=8, seed=2, **kw)  # noqa: E731
    # off, the field is left out of the hash (LATER_FIELDS; the shipped bundles' own hashes are pinned in test_seed_mode)
    assert cfg(cosine_loss=0.0).run_hash() == cfg().run_hash() != cfg(cosine_loss=1.0).run_hash()
    out = tmp_path / "digits" / "3"
    with_cos = train(cfg(cosine_loss=1.0), backbone, out=out, cache_dir=cache, progress=False)
    plain = _weights(train(cfg(), backbone, cache_dir=cache, progress=False))
    assert not all(torch.equal(v, plain[k]) for k, v in _weights(with_cos).items())
    training = read_manifest(out)["training"]
    assert training["cosine_loss"] == 1.0 and "cosine-softmax (scale 16)" in training["objective"]
    row = training["history"][0]
    assert 0 < row["ce_loss"] < row["loss"]  # the objective adds the cosine part; ce_loss is the head's alone
    with pytest.raises(ValueError, match="cosine_loss"):
        train(cfg(cosine_loss=-1.0), backbone, cache_dir=cache, progress=False)


def test_a_mixture_records_its_held_out_curve_per_task(backbone, cache):
    """Several tasks: each epoch's history row splits the held-out top-1 by task, and the parts,
    weighted by each task's held-out count, give the overall figure computed over all rows."""
    cfg = TrainConfig(data=[f"a={TRAIN}", f"b={TRAIN}"], format="tr", budget=30_000, epochs=1, batch_size=8, seed=0,
                      holdout_frac=0.5, sampling="task-balanced")
    row = train(cfg, backbone, cache_dir=cache, progress=False)["training"]["history"][0]
    per = row["heldout_head_top1_per_task"]
    assert list(per) == ["a", "b"]  # 10 held-out images each: one a class
    assert all(round(v * 10, 6) == round(v * 10) for v in per.values())
    assert abs((per["a"] + per["b"]) / 2 - row["heldout_head_top1"]) < 1e-6
    single = train(replace(cfg, data=[TRAIN], sampling=None), backbone, cache_dir=cache, progress=False)["training"]["history"][0]
    assert "heldout_head_top1_per_task" not in single
