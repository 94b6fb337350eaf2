"""Does `--cosine-loss` (an auxiliary cosine-softmax loss on the normalised embedding) help k-NN?

A small side-by-side pilot before the full CIFAR-10 run: CIFAR-10, 1,000 training images a class
(seeded), `blocks[:5]`, TR at the 280k budget, 3 epochs, batch 128, `--augment hflip`, every
training image in the gallery (fp16), the whole 10,000-image test set; one run per weight, the same
seed, data order and flips. About 6.5 min a run on 2 cores.

    python -m research.cosine_loss_pilot --weights 0 1   # -> research/cosine_loss_pilot.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from metalora.backbones import create_backbone
from metalora.train import TrainConfig, default_targets, train

from bench.common import machine

OUT = Path("research/cosine_loss_pilot.json")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0], help="--cosine-loss weights to compare")
    ap.add_argument("--data", default="../shared/data/cifar10", help="folder with train.zip and test.zip")
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    bb = create_backbone("efficientnet_lite0", split=5)
    rows = []
    for w in a.weights:
        t = time.time()
        cfg = TrainConfig(data=[f"{a.data}/train.zip?per_class={a.per_class}"], format="tr", budget=280000, targets=default_targets(bb),
                          epochs=3, batch_size=128, augment="hflip", cosine_loss=w)
        s = train(cfg, bb, eval_data=[f"{a.data}/test.zip"], progress=False)
        rows.append({"cosine_loss": w, "knn_top1": s["metrics"]["knn_top1"], "head_top1": s["metrics"]["head_top1"],
                     "n_test": s["metrics"]["n"], "history": s["training"]["history"], "seconds": round(time.time() - t, 1)})
        print(rows[-1] | {"history": "..."}, flush=True)
    a.out.write_text(json.dumps({"machine": machine(), "config": "cifar10 per_class=%d, blocks[:5], tr budget 280k, 3 epochs, batch 128, hflip" % a.per_class,
                                 "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
