"""Evaluation: the k-NN vote, the frozen-backbone baseline, and the shipped bundles' manifests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metalora.bundle import load_bundle, load_gallery, read_manifest
from metalora.evaluate import evaluate, knn_predict
from metalora.store import DEFAULT_STORE, ModelStore

SHIPPED = ["cifar10", "mnist", "digits", "mixed"]


def test_knn_vote_is_similarity_weighted():
    # Query e0. Neighbours: one class-0 item at cos 1.0, two class-1 items at cos 0.3.
    g = F.normalize(torch.tensor([[1.0, 0.0], [0.3, 0.954], [0.3, -0.954], [-1.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[1.0, 0.0]])
    assert knn_predict(g, labels, q, k=3, n_classes=3).tolist() == [0]  # a majority vote would say 1
    q2 = F.normalize(torch.tensor([[0.0, 1.0]]), dim=1)
    assert knn_predict(g, labels, q2, k=1, n_classes=3).tolist() == [1]
    assert knn_predict(g, labels, q, k=50, n_classes=3).shape == (1,)  # k beyond the gallery is clamped


def test_base_needs_a_gallery_and_evaluates_with_one(tmp_path):
    from metalora.backbones import create_backbone

    bb = create_backbone("efficientnet_lite0")
    with pytest.raises(ValueError, match="gallery"):
        evaluate("base", ["sklearn:digits?split=test,per_class=1"], bb, cache_dir=tmp_path, progress=False)
    res = evaluate("base", ["sklearn:digits?split=test,per_class=1"], bb, gallery_data=["sklearn:digits?split=train,per_class=2"],
                   cache_dir=tmp_path, progress=False)
    assert res["adapter"] == "base" and res["head_top1"] is None and res["n"] == 10 and res["gallery_items"] == 20
    assert 0.0 <= res["knn_top1"] <= 1.0


def _shipped():
    store = ModelStore(DEFAULT_STORE)
    return [n for n in SHIPPED if n in store.adapter_names()]


@pytest.mark.skipif(not _shipped(), reason="no shipped adapter bundles in model_store/ yet")
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_bundles_load_and_carry_metrics(name):
    from metalora.backbones import create_backbone

    store = ModelStore(DEFAULT_STORE)
    if name not in store.adapter_names():
        pytest.skip(f"{name} is not in the store")
    _, _, path = store.resolve(name)
    m = read_manifest(path)
    for key in ("knn_top1", "head_top1", "n", "data", "baseline_knn_top1"):
        assert key in m["metrics"], key
    assert m["metrics"]["knn_top1"] > m["metrics"]["baseline_knn_top1"]  # beats the frozen backbone
    assert m["preprocess"]["input_size"] == 224
    # On the store's backbone (cut at blocks[:4]): bundles of that cut and of the later ones both load.
    adapter, manifest = load_bundle(path, create_backbone("efficientnet_lite0", **store.backbone_manifest("efficientnet_lite0")["kwargs"]))
    g = load_gallery(path, manifest)
    assert g is not None and g.embeddings.shape[1] == 1280 and len(g.ids) == len(g.labels) > 0
    assert manifest["trainable_params"] == adapter.num_trainable()


@pytest.mark.slow
def test_a_multi_task_adapter_asks_for_task_named_test_data(tmp_path):
    """`mixed`'s labels are task/class: test data given without its task is refused, and the error
    says how to name it (a new user's first try, `--data cifar10/test.zip`, used to get "use ood")."""
    from metalora.backbones import create_backbone

    store = ModelStore(DEFAULT_STORE)
    if "mixed" not in store.adapter_names():
        pytest.skip("no mixed bundle in the store")
    _, _, path = store.resolve("mixed")
    bb = create_backbone("efficientnet_lite0", split=int(read_manifest(path)["backbone"].get("cut", "blocks[:6]")[-2]))
    with pytest.raises(ValueError, match=r"task/class: name each test set's task, e\.g\. --data cifar10=SPEC"):
        evaluate("mixed", ["sklearn:digits?split=test,per_class=1"], bb, cache_dir=tmp_path, progress=False)
