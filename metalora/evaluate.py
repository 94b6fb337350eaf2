"""k-NN and head accuracy of an adapter (or the frozen backbone) on a test set (`metalora eval`).

k-NN follows the paper's protocol: K = 10 nearest gallery items by cosine similarity (exact inner
product on L2-normalised embeddings, FAISS `IndexFlatIP`), **similarity-weighted vote**: each
neighbour adds its cosine similarity to its class, the largest sum wins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .adapters import Adapter, MetaLoRAModel
from .backbones.base import Backbone
from .bundle import Gallery, load_bundle, load_gallery
from .data import FeatureSet, load_features
from .features import embed_features, model_for

VOTE = "similarity-weighted"


def knn_predict(gallery_emb: torch.Tensor, gallery_labels: torch.Tensor, query: torch.Tensor, k: int, n_classes: int) -> torch.Tensor:
    """Predicted class per query (Q,) from a similarity-weighted vote of the k nearest items."""
    return knn_search(gallery_emb, gallery_labels, query, k, n_classes)[0]


def knn_search(gallery_emb: torch.Tensor, gallery_labels: torch.Tensor, query: torch.Tensor, k: int, n_classes: int) -> tuple[torch.Tensor, np.ndarray]:
    """(predicted class per query (Q,), cosine similarity of each query's nearest item (Q,))."""
    import faiss

    g = np.ascontiguousarray(gallery_emb.float().numpy())  # (N, D), L2-normalised
    q = np.ascontiguousarray(query.float().numpy())  # (Q, D), L2-normalised
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    k = min(k, g.shape[0])
    sims, idx = index.search(q, k)  # (Q, k) each
    votes = torch.zeros(q.shape[0], n_classes, dtype=torch.float64)  # (Q, classes)
    votes.scatter_add_(1, gallery_labels[torch.from_numpy(idx)].long(), torch.from_numpy(sims).double())
    return votes.argmax(1), sims[:, 0]


def _accuracy_table(names: list[str], truth: list[str], knn: list[str], head: list[str] | None) -> dict:
    out: dict[str, dict] = {}
    for i, name in enumerate(names):
        d = out.setdefault(name, {"n": 0, "knn_correct": 0, "head_correct": 0})
        d["n"] += 1
        d["knn_correct"] += truth[i] == knn[i]
        if head is not None:
            d["head_correct"] += truth[i] == head[i]
    return {
        k: {"n": v["n"], "knn_top1": v["knn_correct"] / v["n"], "head_top1": (v["head_correct"] / v["n"]) if head is not None else None}
        for k, v in out.items()
    }


def evaluate_features(
    model: MetaLoRAModel,
    adapter: Adapter | None,
    gallery_labels: list[str],
    test: FeatureSet,
    gallery: Gallery,
    k: int = 10,
    device="cpu",
    calibration: dict | None = None,
    ood: bool = False,
) -> dict:
    """k-NN top-1 (and the head's top-1 for an adapter) on cached test features.

    With a bundle's `calibration` (metalora.calibration): also the head's ECE before and after
    the temperature and `unknown_rate`, the fraction of test images whose nearest gallery item is
    below the k-NN threshold. `ood`: the test images belong to none of the adapter's classes, so
    only `unknown_rate` (the out-of-domain rejection rate) is measured.
    """
    from .calibration import ece, softmax_t, unknown_rate

    if ood:
        if not calibration or calibration.get("knn_threshold") is None:
            raise ValueError("out-of-domain evaluation needs a bundle with a k-NN threshold (calibration.knn_threshold)")
        emb, _, _ = embed_features(model, adapter, test, device=device)
        _, near = knn_search(gallery.embeddings, gallery.labels, emb, 1, len(gallery_labels))
        return {"n": len(test), "ood": True, "unknown_rate": unknown_rate(near, calibration["knn_threshold"]),
                "knn_threshold": calibration["knn_threshold"]}
    unknown = sorted(set(test.labels) - set(gallery_labels))
    if unknown:
        hint = "out-of-domain data: use ood"
        if any("/" in g for g in gallery_labels) and not any("/" in t for t in test.labels):
            hint = "this adapter's labels are task/class: name each test set's task, e.g. --data cifar10=SPEC; out-of-domain data: use ood"
        raise ValueError(f"test labels {unknown[:5]} are not in the adapter's/gallery's labels {gallery_labels[:5]}… ({hint})")
    emb, logits, _ = embed_features(model, adapter, test, device=device)
    pred, near = knn_search(gallery.embeddings, gallery.labels, emb, k, len(gallery_labels))
    knn = [gallery_labels[i] for i in pred.tolist()]
    head = None
    if adapter is not None and logits is not None:
        head = [adapter.config.labels[i] for i in logits.argmax(1).tolist()]
    n = len(test)
    res = {
        "n": n,
        "k": k,
        "vote": VOTE,
        "metric": "cosine",
        "knn_top1": sum(a == b for a, b in zip(test.labels, knn)) / n,
        "head_top1": (sum(a == b for a, b in zip(test.labels, head)) / n) if head is not None else None,
        "gallery_items": len(gallery.ids),
        "per_class": _accuracy_table(test.labels, test.labels, knn, head),
    }
    if len(set(test.tasks)) > 1:
        res["per_task"] = _accuracy_table(test.tasks, test.labels, knn, head)
    if head is not None:
        y = np.array([adapter.config.labels.index(lab) for lab in test.labels])
        res["ece"] = ece(softmax_t(logits), y)
        if calibration and calibration.get("temperature"):
            res["ece_calibrated"] = ece(softmax_t(logits, calibration["temperature"]), y)
    if calibration and calibration.get("knn_threshold") is not None:
        res["unknown_rate"] = unknown_rate(near, calibration["knn_threshold"])
    return res


def evaluate(
    adapter_ref: str,
    data: list[str],
    backbone: Backbone,
    k: int = 10,
    gallery_data: list[str] | None = None,
    store: str | Path | None = None,
    device="cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    ood: bool = False,
) -> dict:
    """Evaluate `base`, a store ref (`name[@version]`) or a bundle directory on test data.

    The gallery is the bundle's own, unless `gallery_data` is given: then it is built by
    embedding those (training) images with the same adapter. `base` always needs `gallery_data`.
    """
    from .store import DEFAULT_STORE, ModelStore

    backbone = backbone.to(device)
    model = model_for(backbone)
    adapter, manifest, gallery, ref = None, None, None, adapter_ref
    if adapter_ref != "base":
        path = Path(adapter_ref)
        if not (path / "manifest.json").is_file():
            _, _, path = ModelStore(store or DEFAULT_STORE).resolve(adapter_ref)
        adapter, manifest = load_bundle(path, backbone, device)
        ref = f"{manifest['name']}@{manifest['version']}"
        if gallery_data is None:
            gallery = load_gallery(path, manifest)
            if gallery is None:
                raise ValueError(f"{path} has no gallery: pass --gallery-data with training images")
            labels = manifest["adapter"]["labels"]
    elif gallery_data is None:
        raise ValueError("the frozen backbone has no gallery: pass --gallery-data with training images")
    if gallery_data is not None:
        gfs = load_features(gallery_data, backbone, cache_dir=cache_dir, device=device, progress=progress)
        labels = manifest["adapter"]["labels"] if manifest else gfs.classes
        emb, _, _ = embed_features(model, adapter, gfs, device=device)
        gallery = Gallery(emb, torch.tensor([labels.index(lab) for lab in gfs.labels]), gfs.ids)
    test = load_features(data, backbone, cache_dir=cache_dir, device=device, progress=progress)
    res = evaluate_features(model, adapter, labels, test, gallery, k=k, device=device,
                            calibration=(manifest or {}).get("calibration"), ood=ood)
    return {
        "adapter": ref,
        "format": manifest["adapter"]["format"] if manifest else None,
        "trainable_params": manifest.get("trainable_params") if manifest else 0,
        "data": data,
        "gallery": "bundle" if gallery_data is None else gallery_data,
        "manifest_metrics": (manifest or {}).get("metrics") or None,
        "calibration": (manifest or {}).get("calibration") or None,
        **res,
    }
