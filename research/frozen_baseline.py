"""The frozen backbone's figures on a task: k-NN@10 (500-a-class gallery and the full training set
as gallery) and a logistic-regression probe on the pooled embedding, same images and preprocessing
as the adapters (the cached prefix features, `metalora cache-features`).

    python -m research.frozen_baseline --train ../shared/data/cifar10/train.zip --test ../shared/data/cifar10/test.zip \
        --out research/full_scale/cifar10-frozen.json [--partial]

`--partial` uses the training chunks finished so far (a class-balanced sample) while the cache
still runs. The probe: scikit-learn `LogisticRegression` (lbfgs, C=1, max_iter 300) on the
standardised L2-normalised 1280-d embedding.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from metalora.backbones import create_backbone
from metalora.data import DataSpec, load_features, partial_features
from metalora.evaluate import knn_predict
from metalora.features import embed_features, model_for


def per_class_first(labels: list[str], n: int) -> list[int]:
    seen: dict[str, int] = {}
    keep = []
    for i, lab in enumerate(labels):
        if seen.get(lab, 0) < n:
            seen[lab] = seen.get(lab, 0) + 1
            keep.append(i)
    return keep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--partial", action="store_true")
    ap.add_argument("--gallery-per-class", type=int, default=500)
    a = ap.parse_args()
    torch.set_num_threads(2)
    bb = create_backbone("efficientnet_lite0")
    model = model_for(bb)
    tr = partial_features(DataSpec.parse(a.train), bb) if a.partial else load_features([a.train], bb)
    te = load_features([a.test], bb)
    classes = list(dict.fromkeys(sorted(set(tr.labels), key=tr.labels.index)))
    t0 = time.perf_counter()
    g_emb, _, _ = embed_features(model, None, tr)
    q_emb, _, _ = embed_features(model, None, te)
    y_tr = torch.tensor([classes.index(c) for c in tr.labels])
    y_te = np.array([classes.index(c) for c in te.labels])
    res = {"train": a.train, "test": a.test, "n_train": len(tr), "n_test": len(te), "partial": a.partial,
           "embed_seconds": time.perf_counter() - t0}
    sub = per_class_first(tr.labels, a.gallery_per_class)
    res[f"knn10_gallery_{a.gallery_per_class}_per_class"] = float((knn_predict(g_emb[sub], y_tr[sub], q_emb, 10, len(classes)).numpy() == y_te).mean())
    res["knn10_gallery_full"] = float((knn_predict(g_emb, y_tr, q_emb, 10, len(classes)).numpy() == y_te).mean())
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=300))
    probe.fit(g_emb.numpy(), y_tr.numpy())
    res["probe_top1"] = float((probe.predict(q_emb.numpy()) == y_te).mean())
    res["probe_seconds"] = time.perf_counter() - t0
    res["probe"] = "sklearn LogisticRegression(C=1, lbfgs, max_iter=300) on StandardScaler(L2-normalised pooled embedding)"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
