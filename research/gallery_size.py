"""k-NN@10 against gallery size and storage form: how many items a class, fp16 or product-quantised.

For each bundle: embed every training image the bundle could have put in its gallery (its training
data less the images held out to calibrate, rebuilt from its manifest), then measure k-NN@10 on its
test set with galleries of the first N images a class (the rule `metalora train --gallery-per-class`
uses), each stored as fp16 or product-quantised (`Gallery.compress`: M bytes an item plus a
655 KB codebook at D = 1280). The bytes are those of the gallery.safetensors file it would write.

    python -m research.gallery_size --adapter mnist@3   # -> research/gallery_size.json, research/gallery_size.png

It embeds the bundle's whole training set through its adapter and trains 15 PQ codebooks: 23 min
for MNIST's 54,001 images on 2 busy cores. The recorded run is keyed `mnist@2`: the weights that
`mnist@3` ships (the same run, resumed after its last epoch with another gallery). Resumable:
bundles already in the JSON are skipped (`--force` measures them again).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save

from metalora.backbones import create_backbone
from metalora.bundle import BundleError, Gallery, load_bundle, read_manifest
from metalora.data import load_features
from metalora.evaluate import knn_predict
from metalora.features import embed_features, model_for
from metalora.store import DEFAULT_STORE, ModelStore
from metalora.train import holdout_split

from bench.common import machine

OUT = Path("research/gallery_size.json")
PLOT = Path("research/gallery_size.png")
PER_CLASS = [100, 300, 1000, 2000, None]  # None: every image the gallery may hold
CODECS = [None, 320, 160, 64]  # None: fp16; else PQ sub-quantizers (bytes an item)


def bundle_backbone(manifest: dict):
    """The backbone `metalora eval` builds for a store bundle: cut where the bundle was trained,
    else as the store's backbone manifest says (a copy of metalora.cli's private helper, for a
    bundle of the repository's store)."""
    name = manifest["backbone"]["name"]
    kw = dict((ModelStore(DEFAULT_STORE).backbone_manifest(name) or {}).get("kwargs", {}))
    bb = create_backbone(name, **kw)
    own = bb.split_of(manifest["backbone"].get("cut"))
    return bb if own is None or own == bb.split else create_backbone(name, split=own)


def gallery_subset(labels: list[str], per_class: int | None) -> list[int]:
    """The first `per_class` training images of each class: the rule of `metalora train
    --gallery-per-class` (metalora.train's private helper, copied; the images are already a seeded
    sample)."""
    if per_class is None:
        return list(range(len(labels)))
    counts: dict[str, int] = {}
    keep = []
    for i, lab in enumerate(labels):
        if counts.get(lab, 0) < per_class:
            counts[lab] = counts.get(lab, 0) + 1
            keep.append(i)
    return keep


def measure(ref: str, per_class: list[int | None], codecs: list[int | None]) -> dict:
    path = ModelStore(DEFAULT_STORE).resolve(ref)[2]
    manifest = read_manifest(path)
    bb = bundle_backbone(manifest)
    adapter, manifest = load_bundle(path, bb)
    model = model_for(bb)
    tr = manifest["training"]
    labels = manifest["adapter"]["labels"]
    train_fs = load_features(tr["data"], bb)
    fit, _ = holdout_split(train_fs.labels, tr.get("holdout_frac") or 0.0, tr["seed"])
    train_fs = train_fs.take(fit)
    t0 = time.perf_counter()
    emb, _, _ = embed_features(model, adapter, train_fs)
    test = load_features(manifest["metrics"]["data"], bb)
    q, _, _ = embed_features(model, adapter, test)
    y = torch.tensor([labels.index(lab) for lab in train_fs.labels])
    truth = torch.tensor([labels.index(lab) for lab in test.labels])
    rows = []
    for pc in per_class:
        keep = gallery_subset(train_fs.labels, pc)
        if pc is not None and len(keep) == len(train_fs) and any(r["per_class"] is None for r in rows):
            continue
        base = Gallery(emb[keep], y[keep], [train_fs.ids[i] for i in keep])
        for m in codecs:
            g = base.compress(m, seed=tr["seed"]) if m else base
            pred = knn_predict(g.embeddings, g.labels, q, 10, len(labels))
            row = {"per_class": pc, "items": len(keep), "codec": f"pq{m}" if m else "fp16",
                   "bytes": len(save(g.to_tensors())), "knn_top1": float((pred == truth).float().mean())}
            rows.append(row)
            print(f"{ref}: {row}", flush=True)
    return {"adapter": ref, "n_test": len(test), "fit_items": len(train_fs), "cut": manifest["backbone"].get("cut"),
            "shipped": {"items": manifest["metrics"]["gallery_items"], "knn_top1": manifest["metrics"]["knn_top1"]},
            "rows": rows, "seconds": time.perf_counter() - t0}


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = list(results["bundles"])
    fig, axes = plt.subplots(1, len(refs), figsize=(5 * len(refs), 4), squeeze=False)
    for ax, ref in zip(axes[0], refs):
        rows = results["bundles"][ref]["rows"]
        for codec in dict.fromkeys(r["codec"] for r in rows):
            rs = sorted((r for r in rows if r["codec"] == codec), key=lambda r: r["bytes"])
            ax.plot([r["bytes"] / 2**20 for r in rs], [100 * r["knn_top1"] for r in rs], marker="o", label=codec)
        ax.set_xscale("log")
        ax.set_xlabel("gallery.safetensors (MiB, log)")
        ax.set_ylabel("k-NN@10 top-1 (%)")
        ax.set_title(f"{ref}: items a class 100 … all")
        ax.grid(alpha=0.3)
        ax.legend(title="stored as")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", action="append", required=True, help="store ref (name[@version]), repeatable")
    ap.add_argument("--out", type=Path, default=OUT, help=f"JSON of the results, read first to skip bundles done (default {OUT})")
    ap.add_argument("--plot", type=Path, default=PLOT, help=f"the chart (default {PLOT})")
    ap.add_argument("--force", action="store_true", help="measure bundles that are already in --out again")
    args = ap.parse_args()
    for ref in args.adapter:  # a bad reference is an error message, not a traceback after minutes of work
        try:
            ModelStore(DEFAULT_STORE).resolve(ref)
        except (BundleError, ValueError) as e:
            ap.error(str(e))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"bundles": {}}
    results["machine"] = machine()
    results["command"] = "python -m research.gallery_size " + " ".join(f"--adapter {a}" for a in args.adapter)
    for ref in args.adapter:
        if ref in results["bundles"] and not args.force:
            continue
        results["bundles"][ref] = measure(ref, PER_CLASS, CODECS)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
