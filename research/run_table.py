"""Run the comparison table of research/NOTES.md: every (task, format, seed) at one matched budget.

Each run is exactly `metalora train ... --eval-data ...` (the same `metalora.train.train` call),
driven from one process so the backbone and the prefix cache are loaded once. A run whose JSON
already exists under research/raw/ is skipped, so an interrupted table resumes where it stopped.

    .venv/bin/python -m research.run_table            # then: .venv/bin/python -m research.make_table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from metalora.backbones import create_backbone
from metalora.bundle import Gallery
from metalora.data import load_features
from metalora.evaluate import evaluate_features
from metalora.train import TrainConfig, embed_features, model_for, train

ROOT = Path(__file__).resolve().parent.parent
D = "../shared/data"
# Seeded per-class subsets (see research/NOTES.md): train / test images per class.
SINGLE = {
    "cifar10": ([f"{D}/cifar10/train.zip?per_class=100"], [f"{D}/cifar10/test.zip?per_class=50"]),
    "mnist": ([f"{D}/mnist/train.zip?per_class=50"], [f"{D}/mnist/test.zip?per_class=30"]),
    "digits": (["sklearn:digits?split=train,per_class=50"], ["sklearn:digits?split=test,per_class=30"]),
}
TASKS = {
    **SINGLE,
    "mixed": ([f"{t}={s[0][0]}" for t, s in SINGLE.items()], [f"{t}={s[1][0]}" for t, s in SINGLE.items()]),
}
FORMATS = ("lora", "cp", "tr")
BUDGET = 70_000
EPOCHS = 2
LR = 3e-3
BATCH = 32


def frozen_baseline(bb, task: str) -> dict:
    train_specs, test_specs = TASKS[task]
    model = model_for(bb)
    tr = load_features(train_specs, bb)
    te = load_features(test_specs, bb)
    labels = tr.classes
    emb, _, _ = embed_features(model, None, tr)
    g = Gallery(emb, torch.tensor([labels.index(lab) for lab in tr.labels]), tr.ids)
    return evaluate_features(model, None, labels, te, g, k=10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--budget", type=int, default=BUDGET)
    ap.add_argument("--raw", type=Path, default=ROOT / "research" / "raw")
    args = ap.parse_args()
    args.raw.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bb = create_backbone("efficientnet_lite0")

    for task in args.tasks:
        f = args.raw / f"{task}-frozen.json"
        if not f.exists():
            res = frozen_baseline(bb, task)
            f.write_text(json.dumps({"task": task, "row": "frozen", "data": TASKS[task], **res}, indent=1) + "\n")
            print(f"{task} frozen: k-NN {res['knn_top1']:.4f}", flush=True)

    for seed in args.seeds:
        for task in args.tasks:
            for fmt in args.formats:
                f = args.raw / f"{task}-{fmt}-s{seed}.json"
                if f.exists():
                    continue
                train_specs, test_specs = TASKS[task]
                cfg = TrainConfig(data=train_specs, format=fmt, budget=args.budget, epochs=args.epochs, lr=LR, batch_size=BATCH, seed=seed)
                name = f"{task}-{fmt}-s{seed}"
                t0 = time.time()
                res = train(cfg, bb, out=ROOT / "runs" / "table" / name / "1", name=name, version="1", eval_data=test_specs,
                            ckpt_dir=ROOT / "runs" / "ckpt" / f"table-{name}", progress=False)
                res.pop("adapter")
                res.pop("gallery")
                res["seconds"] = round(time.time() - t0, 1)
                res.update(task=task, row=fmt, seed=seed)
                res["command"] = (
                    "metalora train " + " ".join(f"--data '{s}'" for s in train_specs) + " "
                    + " ".join(f"--eval-data '{s}'" for s in test_specs)
                    + f" --format {fmt} --budget {args.budget} --epochs {args.epochs} --lr {LR} --batch-size {BATCH} --seed {seed}"
                    + f" --no-baseline --out runs/table/{name}/1"
                )
                f.write_text(json.dumps(res, indent=1) + "\n")
                m = res["metrics"]
                print(f"{name}: k-NN {m['knn_top1']:.4f} head {m['head_top1']:.4f} "
                      f"params {res['training']['trainable_params']} ranks {res['training']['ranks']} ({res['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
