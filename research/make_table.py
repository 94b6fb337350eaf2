"""Aggregate research/raw/*.json into the comparison table, its JSON, a bar chart and the seed plot.

    .venv/bin/python -m research.make_table

Writes research/table.json, research/table.md, research/knn_top1.png, research/seeds_pca.png and
replaces the block between the table markers in research/NOTES.md.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "research" / "raw"
TASKS = ["cifar10", "mnist", "digits", "mixed"]
ROWS = [("frozen", "frozen backbone"), ("lora", "LoRA"), ("multi-lora", "Multi-LoRA (one LoRA per task)"),
        ("cp", "MetaLoRA-CP"), ("tr", "MetaLoRA-TR")]
START, END = "<!-- table:start -->", "<!-- table:end -->"


def load_raw() -> dict:
    runs: dict = {}
    for f in sorted(RAW.glob("*.json")):
        r = json.loads(f.read_text())
        runs.setdefault((r["task"], r["row"]), []).append(r)
    return runs


def knn(r: dict) -> float:
    return r["metrics"]["knn_top1"] if "metrics" in r else r["knn_top1"]


def summarise(vals: list[float]) -> dict:
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n_seeds": len(vals),
        "values": vals,
    }


def build(runs: dict) -> dict:
    table: dict = {}
    for task in TASKS:
        if (task, "frozen") in runs:
            table[("frozen", task)] = {**summarise([knn(runs[(task, "frozen")][0])]), "head": None, "params": 0,
                                       "n": runs[(task, "frozen")][0]["n"]}
        for fmt in ("lora", "cp", "tr"):
            rs = sorted(runs.get((task, fmt), []), key=lambda r: r["seed"])
            if rs:
                table[(fmt, task)] = {
                    **summarise([knn(r) for r in rs]),
                    "head": summarise([r["metrics"]["head_top1"] for r in rs]),
                    "params": rs[0]["training"]["trainable_params"],
                    "ranks": rs[0]["training"]["ranks"],
                    "n": rs[0]["metrics"]["n"],
                    "seeds": [r["seed"] for r in rs],
                    "per_task": [r["metrics"].get("per_task") for r in rs] if task == "mixed" else None,
                }
        if task != "mixed" and ("lora", task) in table:
            table[("multi-lora", task)] = {**table[("lora", task)], "per_task": None}
    # Multi-LoRA on the mixture: each test image goes to its own task's LoRA (routed by the true
    # task) and is searched in that task's gallery; the figure is the pooled accuracy over the tasks.
    singles = [{r["seed"]: r for r in runs.get((t, "lora"), [])} for t in TASKS[:3]]
    seeds = sorted(set.intersection(*(set(s) for s in singles))) if all(singles) else []
    if seeds:
        vals, heads = [], []
        for s in seeds:
            rs = [d[s] for d in singles]
            n = sum(r["metrics"]["n"] for r in rs)
            vals.append(sum(r["metrics"]["knn_top1"] * r["metrics"]["n"] for r in rs) / n)
            heads.append(sum(r["metrics"]["head_top1"] * r["metrics"]["n"] for r in rs) / n)
        table[("multi-lora", "mixed")] = {**summarise(vals), "head": summarise(heads), "n": n, "seeds": seeds,
                                          "params": sum(d[seeds[0]]["training"]["trainable_params"] for d in singles),
                                          "per_task": None}
    return table


def fmt_cell(c: dict | None, key: str = "knn") -> str:
    if c is None:
        return "–"
    if key == "head":
        c = c.get("head")
        if c is None:
            return "–"
    s = f"{100 * c['mean']:.1f}"
    return s + (f" ± {100 * c['std']:.1f}" if c["n_seeds"] > 1 else "")


def markdown(table: dict) -> str:
    best = {t: max(c["mean"] for (_, tt), c in table.items() if tt == t) for t in TASKS if any(tt == t for _, tt in table)}
    out = ["k-NN top-1 (%), K = 10, cosine, similarity-weighted vote; mean ± sample std over seeds 0, 1, 2 "
           "(the frozen backbone is deterministic: one figure). **Bold**: best row per column.", "",
           "| method | trainable params | CIFAR-10 | MNIST | digits | mixture (one adapter, 30 classes) |",
           "|---|---|---|---|---|---|"]
    for key, label in ROWS:
        cells = []
        for t in TASKS:
            c = table.get((key, t))
            s = fmt_cell(c)
            cells.append(f"**{s}**" if c is not None and c["mean"] == best.get(t) else s)
        p = {t: table[(key, t)]["params"] for t in TASKS if (key, t) in table}
        if key == "frozen":
            ptxt = "0"
        elif not p:
            ptxt = "–"
        else:
            first = next(iter(p.values()))
            ptxt = f"{first:,}" + (f" (mixture: {p['mixed']:,})" if p.get("mixed", first) != first else "")
        out.append(f"| {label} | {ptxt} | " + " | ".join(cells) + " |")
    out += ["", "Head top-1 (%) of the same runs (the adapter's own linear classifier):", "",
            "| method | CIFAR-10 | MNIST | digits | mixture |", "|---|---|---|---|---|"]
    for key, label in ROWS[1:]:
        out.append(f"| {label} | " + " | ".join(fmt_cell(table.get((key, t)), "head") for t in TASKS) + " |")
    per = [(k, table[(k, "mixed")]) for k in ("lora", "cp", "tr") if (k, "mixed") in table and table[(k, "mixed")].get("per_task")]
    if per:
        out += ["", "The mixture column per task (k-NN top-1 %, mean over seeds; one adapter, joint 30-class gallery):", "",
                "| method | cifar10 | mnist | digits |", "|---|---|---|---|"]
        for k, c in per:
            row = []
            for t in TASKS[:3]:
                v = [pt[t]["knn_top1"] for pt in c["per_task"] if pt]
                row.append(f"{100 * statistics.fmean(v):.1f}" if v else "–")
            out.append(f"| {dict(ROWS)[k]} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def bar_chart(table: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 4.8))
    w = 0.16
    x = np.arange(len(TASKS))
    for i, (key, label) in enumerate(ROWS):
        m = [100 * table[(key, t)]["mean"] if (key, t) in table else np.nan for t in TASKS]
        s = [100 * table[(key, t)]["std"] if (key, t) in table else 0 for t in TASKS]
        ax.bar(x + (i - 2) * w, m, w, yerr=s, capsize=2, label=label)
    lo = np.nanmin([100 * c["mean"] for c in table.values()])
    ax.set_ylim(max(0, lo - 8), 100)
    ax.set_xticks(x, ["CIFAR-10", "MNIST", "digits", "mixture (30 classes)"])
    ax.set_ylabel("k-NN top-1 (%), K=10")
    ax.set_title("efficientnet_lite0 tail adapters at matched budget (mean ± std, 3 seeds)")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.09), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seed_plot(path: Path) -> dict:
    """PCA of the per-sample seeds c(x) of the mixture's CP and TR adapters, coloured by task."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from metalora.backbones import create_backbone
    from metalora.bundle import load_bundle
    from metalora.data import load_features
    from metalora.train import embed_features, model_for

    from research.run_table import TASKS as SPECS

    bb = create_backbone("efficientnet_lite0")
    test = load_features(SPECS["mixed"][1], bb, progress=False)
    tasks = np.array(test.tasks)
    stats, panels = {}, []
    for fmt in ("cp", "tr"):
        p = ROOT / "runs" / "table" / f"mixed-{fmt}-s0" / "1"
        if not (p / "manifest.json").exists():
            continue
        adapter, _ = load_bundle(p, bb)
        _, _, seeds = embed_features(model_for(bb), adapter, test)
        c = seeds.numpy()  # (N, S)
        c0 = adapter.mapping.seed0.detach().numpy()
        z = PCA(n_components=2).fit(c)
        xy = z.transform(c)
        # How much of the seed is task: a cross-validated linear probe, and the between-task share of variance.
        probe = float(cross_val_score(LogisticRegression(max_iter=2000), c, tasks, cv=5).mean())
        tot = ((c - c.mean(0)) ** 2).sum()
        between = sum((tasks == t).sum() * ((c[tasks == t].mean(0) - c.mean(0)) ** 2).sum() for t in set(tasks))
        stats[fmt] = {
            "seed_dim": int(c.shape[1]),
            "task_probe_accuracy_5fold": probe,
            "between_task_variance_share": float(between / tot),
            "pca_explained_variance": [float(v) for v in z.explained_variance_ratio_],
            "mean_abs_deviation_from_init_seed": float(np.abs(c - c0).mean()),
        }
        panels.append((fmt, xy, z.explained_variance_ratio_))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
        for ax, (fmt, xy, ev) in zip(axes[0], panels):
            for t in ["cifar10", "mnist", "digits"]:
                m = tasks == t
                ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, label=t)
            ax.set_title(f"MetaLoRA-{fmt.upper()} seeds c(x), mixture adapter (seed 0)\n"
                         f"task probe {100 * stats[fmt]['task_probe_accuracy_5fold']:.1f} %, "
                         f"between-task variance {100 * stats[fmt]['between_task_variance_share']:.0f} %", fontsize=9)
            ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f} %)")
            ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f} %)")
            ax.legend(markerscale=3, fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return stats


def main() -> None:
    runs = load_raw()
    table = build(runs)
    md = markdown(table)
    seeds = seed_plot(ROOT / "research" / "seeds_pca.png")
    commands = {f"{r['task']}-{r['row']}-s{r['seed']}": r["command"] for rs in runs.values() for r in rs if "command" in r}
    out = {
        "protocol": {"k": 10, "metric": "cosine", "vote": "similarity-weighted", "std": "sample std over seeds"},
        "cells": {f"{k}/{t}": v for (k, t), v in table.items()},
        "seeds_pca": seeds,
        "commands": commands,
    }
    (ROOT / "research" / "table.json").write_text(json.dumps(out, indent=1) + "\n")
    (ROOT / "research" / "table.md").write_text(md)
    bar_chart(table, ROOT / "research" / "knn_top1.png")
    doc = ROOT / "research" / "NOTES.md"
    if doc.exists():
        text = doc.read_text()
        if START in text and END in text:
            a, rest = text.split(START, 1)
            _, b = rest.split(END, 1)
            doc.write_text(a + START + "\n" + md + END + b)
    print(md)
    print(json.dumps(seeds, indent=1))


if __name__ == "__main__":
    main()
