"""Issue 12's tables, intervals and charts from research/run_paper.py's JSONs (works on partial results).

    $PY -m research.make_paper            # after (or during) research/run_paper.py

Reads `<out>/raw/{lr,main,sweep,budget2}/*.json` and `<out>/seeds/*.npz`; writes
`<out>/summary.json`, `<out>/sweep.png`, `<out>/seeds_pca.png`, `<out>/seeds_tsne.png`,
`<out>/seeds_move.png`, and replaces the block between `<!-- paper:start -->` and
`<!-- paper:end -->` in research/NOTES.md. A run not done yet shows as "—", and the block says how
many runs are done, so it can be run while the long run continues.

Statistics: mean ± sample standard deviation over seeds. Paired differences: per seed, row minus
LoRA (the same seed means the same data order and, for the shared parts, the same start), with
the 95 % Student-t interval `mean ± t(0.975, n−1)·s/√n` over the n paired seeds
(scipy.stats.t); a difference "excludes 0" when that interval does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from research.run_paper import (  # noqa: E402
    ALL_ROWS,
    BUDGET,
    BUDGET2,
    LR_GRID,
    MIXED,
    ROWS,
    SEED_ROWS,
    SUITES,
    SWEEP_RANKS,
    TRAINED,
)

ROOT = Path(__file__).resolve().parent.parent

START, END = "<!-- paper:start -->", "<!-- paper:end -->"
LABEL = {
    "frozen": "frozen backbone",
    "lora": "LoRA",
    "multi-lora": "Multi-LoRA (one LoRA per task, oracle routing)",
    "metalora-cp": "MetaLoRA-CP",
    "metalora-tr": "MetaLoRA-TR",
    "metalora-tr-frozen-seed": "MetaLoRA-TR, seed frozen (ablation)",
    "metalora-tr-frozen-seed-same-ranks": "MetaLoRA-TR, seed frozen, TR's ranks",
}
# (row, reference): the paired comparisons of the issue, and the ablation's own question.
PAIRS = [("metalora-cp", "lora"), ("metalora-tr", "lora"), ("metalora-tr-frozen-seed", "lora"),
         ("metalora-tr", "metalora-tr-frozen-seed"), ("metalora-tr", "metalora-tr-frozen-seed-same-ranks"),
         # the controls against LoRA: does the frozen-seed TR tie it, does oracle routing pay?
         ("metalora-tr-frozen-seed-same-ranks", "lora"), ("multi-lora", "lora")]
DASH = "—"


# ---------------------------------------------------------------------- loading
def load(out: Path) -> dict[str, list[dict]]:
    recs: dict[str, list[dict]] = {}
    for stage in ("lr", "main", "sweep", "budget2"):
        recs[stage] = [json.loads(f.read_text()) for f in sorted((out / "raw" / stage).glob("*.json"))]
    return recs


def expected(tasks: list[str], rows: list[str], seeds: list[int], lr_grid, sweep_ranks, sweep_rows, sweep_seeds) -> dict[str, int]:
    """How many JSONs each stage writes when it is complete (for the "N of M done" line)."""
    trained = len([r for r in rows if r in TRAINED])
    cols = len(tasks) + 1
    multi = "multi-lora" in rows
    return {
        "lr": trained * len(lr_grid),
        # frozen per column, trained rows, Multi-LoRA per seed
        "main": ("frozen" in rows) * cols + trained * cols * len(seeds) + multi * len(seeds),
        "sweep": len(sweep_rows) * len(sweep_ranks) * len(sweep_seeds),
        # mixture rows, single-task LoRAs and Multi-LoRA per seed
        "budget2": (trained + multi * len(tasks)) * len(seeds) + multi * len(seeds),
    }


def metric(rec: dict, key: str, task: str | None = None) -> float | None:
    m = rec.get("metrics") or {}
    if task is not None:
        m = (m.get("per_task") or {}).get(task) or {}
    v = m.get(key)
    return None if v is None else float(v)


def summarise(vals: list[float]) -> dict | None:
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals), "values": vals}


def cells(recs: list[dict], columns: list[str]) -> dict:
    """{(row, column, metric): summary over seeds}; metric knn or head; mixture per task as column 'mixed:<task>'."""
    by: dict[tuple, list[tuple[int, float]]] = {}
    for r in recs:
        for key, name in (("knn_top1", "knn"), ("head_top1", "head")):
            v = metric(r, key)
            if v is not None:
                by.setdefault((r["row"], r["task"], name), []).append((r.get("seed") or 0, v))
            if r["task"] == MIXED:
                for t in (r.get("metrics") or {}).get("per_task") or {}:
                    v = metric(r, key, t)
                    if v is not None:
                        by.setdefault((r["row"], f"{MIXED}:{t}", name), []).append((r.get("seed") or 0, v))
    out = {}
    for k, vs in by.items():
        s = summarise([v for _, v in sorted(vs)])
        s["seeds"] = [seed for seed, _ in sorted(vs)]
        out[k] = s
    return out


def by_seed(recs: list[dict]) -> dict[tuple, float | None]:
    """{(row, column, seed, metric key): value} of the seeded runs."""
    return {(r["row"], r["task"], r["seed"], k): metric(r, k) for r in recs if r.get("seed") is not None for k in ("knn_top1", "head_top1")}


def paired(recs: list[dict], columns: list[str]) -> list[dict]:
    """Per column, metric and (row, reference) pair: the per-seed differences (points) and their 95 % t-interval."""
    val = by_seed(recs)
    out = []
    for col in columns:
        for row, ref in PAIRS:
            for key in ("knn_top1", "head_top1"):
                seeds = sorted(s for (rw, t, s, k) in val if rw == row and t == col and k == key
                               and val.get((ref, col, s, key)) is not None and val[(rw, t, s, k)] is not None)
                if not seeds:
                    continue
                d = [100 * (val[(row, col, s, key)] - val[(ref, col, s, key)]) for s in seeds]
                out.append({"column": col, "row": row, "reference": ref, "metric": key, "seeds": seeds, **interval(d)})
    return out


def interval(d: list[float]) -> dict:
    """Mean of paired differences `d` (points) and its 95 % Student-t interval (None for one value)."""
    from scipy import stats

    n, mean = len(d), statistics.fmean(d)
    rec = {"differences_points": d, "mean_points": mean, "n": n, "ci95_points": None, "excludes_zero": None}
    if n > 1:
        sd = statistics.stdev(d)
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        rec.update(std_points=sd, ci95_points=[mean - half, mean + half], excludes_zero=bool(mean - half > 0 or mean + half < 0))
    return rec


def mixture_gap(recs: list[dict], tasks: list[str]) -> list[dict]:
    """Per row, task and metric: the mixture's figure on that task minus the same row's single-task
    adapter on it (points), seed by seed, with its 95 % interval; and the same averaged over the tasks
    ("all tasks"). Each pair has the same seed, epochs, budget and the task's same training images
    (the mixture trains on the union, so each image is seen as often in both): what sharing one adapter
    of the same size among five tasks costs, with exposure held equal."""
    val = by_seed(recs)
    mix = {(r["row"], t, r["seed"], k): metric(r, k, t) for r in recs if r["task"] == MIXED and r.get("seed") is not None
           for t in tasks for k in ("knn_top1", "head_top1")}
    out = []
    for row in [r for r in ALL_ROWS if r in TRAINED]:
        for key in ("knn_top1", "head_top1"):
            per_task: dict[str, dict[int, float]] = {}
            for t in tasks:
                seeds = sorted(s for (rw, tk, s, k), v in mix.items() if (rw, tk, k) == (row, t, key) and v is not None
                               and val.get((row, t, s, key)) is not None)
                if seeds:
                    per_task[t] = {s: 100 * (mix[(row, t, s, key)] - val[(row, t, s, key)]) for s in seeds}
                    out.append({"row": row, "task": t, "metric": key, "seeds": seeds, **interval(list(per_task[t].values()))})
            common = sorted(set.intersection(*(set(v) for v in per_task.values()))) if len(per_task) == len(tasks) else []
            if common:
                out.append({"row": row, "task": "all tasks", "metric": key, "seeds": common,
                            **interval([statistics.fmean(per_task[t][s] for t in tasks) for s in common])})
    return out


# ---------------------------------------------------------------------- markdown
def pct(s: dict | None, std: bool = True, want_n: int | None = None) -> str:
    if s is None:
        return DASH
    txt = f"{100 * s['mean']:.1f}"
    if std and s.get("std") is not None:
        txt += f" ± {100 * s['std']:.1f}"
    if want_n and s["n"] < want_n:
        txt += f" ({s['n']}/{want_n})"
    return txt


def table(c: dict, rows: list[str], columns: list[str], name: str, want_n: int, titles: dict[str, str]) -> list[str]:
    out = ["| row | " + " | ".join(titles.get(col, col) for col in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cellv = []
        for col in columns:
            s = c.get((row, col, name))
            cellv.append(pct(s, want_n=None if row == "frozen" else want_n))
        if all(v == DASH for v in cellv):
            continue
        out.append(f"| {LABEL.get(row, row)} | " + " | ".join(cellv) + " |")
    return out


def ci(p: dict) -> str:
    if p["ci95_points"] is None:
        return f"{p['mean_points']:+.2f} (one seed: no interval)"
    lo, hi = p["ci95_points"]
    return f"{p['mean_points']:+.2f} [{lo:+.2f}, {hi:+.2f}]" + (" **excludes 0**" if p["excludes_zero"] else "")


def paired_table(pairs: list[dict]) -> list[str]:
    """Markdown rows of `paired`'s records: comparison, column, metric, seeds, per-seed differences, mean [95 % CI]."""
    lines = ["| comparison | column | metric | seeds | per seed | mean [95 % CI] |", "|---|---|---|---|---|---|"]
    for p in pairs:
        per_seed = ", ".join(f"{d:+.2f}" for d in p["differences_points"])
        lines.append(f"| {LABEL[p['row']]} − {LABEL[p['reference']]} | {p['column']} | {'k-NN@10' if p['metric'] == 'knn_top1' else 'head'} "
                     f"| {p['n']} | {per_seed} | {ci(p)} |")
    return lines


def markdown(s: dict, pngs: dict[str, str]) -> str:
    prog = s["progress"]
    tasks, columns = s["tasks"], s["columns"]
    titles = {MIXED: f"mixture ({s['n_classes_mixed']} classes, one adapter)"} if s.get("n_classes_mixed") else {MIXED: "mixture"}
    want = len(s["seeds"])
    lines = [
        f"**Runs done: {prog['done']} of {prog['expected']}** "
        + "(" + ", ".join(f"{k}: {v['done']}/{v['expected']}" for k, v in prog["stages"].items()) + "); "
        + f"summed run time {prog['seconds'] / 3600:.2f} h. Generated by `research/make_paper.py` from "
        "`research/paper/raw/`; a cell with fewer seeds than planned says so, e.g. `(2/3)`; `—`: not run yet.",
        "",
        f"### k-NN@10 top-1 (%), budget ≈ {s['budget']:,} trainable parameters",
        "",
        "K = 10, cosine, similarity-weighted vote; mean ± sample std over seeds; gallery = the column's training images.",
        "",
        *table(s["cells"], ALL_ROWS, columns, "knn", want, titles),
        "",
        "### Head top-1 (%), same runs",
        "",
        *table(s["cells"], [r for r in ALL_ROWS if r != "frozen"], columns, "head", want, titles),
    ]
    per = [f"{MIXED}:{t}" for t in tasks]
    if any((r, c, "knn") in s["cells"] for r in ALL_ROWS for c in per):
        lines += ["", "### The mixture per task: k-NN@10 top-1 (%)", "",
                  "One adapter over the joint label space and one joint gallery (Multi-LoRA: each task's own LoRA and gallery).", "",
                  *table(s["cells"], ALL_ROWS, per, "knn", want, {c: c.split(":", 1)[1] for c in per}),
                  "", "### The mixture per task: head top-1 (%)", "",
                  *table(s["cells"], [r for r in ALL_ROWS if r != "frozen"], per, "head", want, {c: c.split(":", 1)[1] for c in per})]
    if s["paired"]:
        lines += ["", "### Paired differences (points), 95 % t-interval over seeds", "",
                  "Row minus reference, seed by seed; `[lo, hi]`: mean ± t(0.975, n−1)·s/√n.", "",
                  *paired_table(s["paired"])]
    gaps = s.get("mixture_gap") or []
    if gaps:
        cols = [*tasks, "all tasks"]
        lines += ["", "### The mixture against the same row's single-task adapters (points), 95 % t-interval over seeds", "",
                  "Each task's figure from the row's ONE mixture adapter minus the row's single-task adapter for that task, "
                  "seed by seed: the same seed, budget, epochs and training images (the mixture trains on their union, so each "
                  "image is seen as often in both); the mixture's k-NN searches one gallery of all five tasks. "
                  "\"all tasks\": the mean over the five tasks, per seed.", "",
                  "| row | metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        for row in ALL_ROWS:
            for key, name in (("knn_top1", "k-NN@10"), ("head_top1", "head")):
                by = {g["task"]: g for g in gaps if g["row"] == row and g["metric"] == key}
                if by:
                    lines.append(f"| {LABEL.get(row, row)} | {name} | " + " | ".join(ci(by[c]) if c in by else DASH for c in cols) + " |")
    params = s.get("params") or {}
    if params:
        lines += ["", "### Trainable parameters (head excluded) and ranks", "", "| row | ranks | trainable params | vs budget |", "|---|---|---|---|"]
        for row, p in params.items():
            dev = f"{100 * p['deviation']:+.1f} %" if p.get("deviation") is not None else DASH
            lines.append(f"| {LABEL.get(row, row)} | {p.get('ranks') or DASH} | {p['params']:,} | {dev} |")
    if s["lr"]:
        lines += ["", "### Learning rate per row (validation split of the mixture)", "",
                  "| row | lr | validation k-NN@10 | validation head | chosen |", "|---|---|---|---|---|"]
        for row, recs in s["lr"].items():
            for r in recs:
                lines.append(f"| {LABEL.get(row, row)} | {r['lr']:g} | {100 * r['knn_top1']:.1f} | {100 * r['head_top1']:.1f} | {'**yes**' if r.get('chosen') else ''} |")
    if s["sweep"]:
        lines += ["", "### Rank sweep on the mixture", "", f"![accuracy vs trainable parameters]({pngs['sweep']})", "",
                  "| row | rank R | ranks | trainable params | k-NN@10 | head |", "|---|---|---|---|---|---|"]
        for p in s["sweep"]:
            lines.append(f"| {LABEL.get(p['row'], p['row'])} | {p['rank']} | {p['ranks']} | {p['params']:,} | {pct(p['knn'])} | {pct(p['head'])} |")
    if s["budget2"]:
        lines += ["", f"### Second budget ≈ {s['budget2_value']:,} on the mixture (k-NN@10 % / head %)", "",
                  f"| row | ≈ {s['budget']:,}: k-NN | head | ≈ {s['budget2_value']:,}: k-NN | head | params at the second budget |", "|---|---|---|---|---|---|"]
        n = len(s["seeds"])
        for row, b in s["budget2"].items():
            second = ([pct(b["knn_2"], want_n=n), pct(b["head_2"], want_n=n), f"{b['params_2']:,}"]
                      if b["params_2"] is not None else [DASH] * 3)
            lines.append("| " + " | ".join([LABEL.get(row, row), pct(b["knn_1"], want_n=n), pct(b["head_1"], want_n=n), *second]) + " |")
    if s.get("paired_budget2"):
        lines += ["", "### Paired differences at the second budget (points), the mixture, 95 % t-interval over seeds", "",
                  *paired_table(s["paired_budget2"])]
    if s["seeds_analysis"]:
        lines += ["", "### The seeds c(x) on the mixture's test images (seed-0 adapters)", ""]
        for key in ("pca", "tsne", "move"):
            if key in pngs:
                lines += [f"![seeds: {key}]({pngs[key]})", ""]
        lines += ["Probe: a logistic regression (standardised inputs) predicting the task from c(x), 5-fold stratified "
                  "cross-validation on a task-balanced subsample (its size in the table; ± the std over the folds); chance: the "
                  "largest task's share of that subsample. Between-task share: the variance of the per-task mean seeds "
                  "(weighted by task size) over the total variance of c(x), on all test images.", "",
                  "| adapter | seed dims | test images | probe images | task probe | chance | between-task share of variance |",
                  "|---|---|---|---|---|---|---|"]
        for name, a in s["seeds_analysis"].items():
            lines.append(f"| {name} | {a['seed_dim']} | {a['n']} | {a['probe']['n']} | {100 * a['probe']['mean']:.1f} ± {100 * a['probe']['std']:.1f} % | "
                         f"{100 * a['probe']['chance']:.1f} % | {100 * a['between_task_share']:.0f} % |")
        lines += ["", "How far the seeds moved from their start value c0 (ones for CP, the identity core for TR), per task. "
                  "‖c̄ − c0‖: the shift of the mean seed, a constant (foldable into B, so no conditioning); "
                  "‖c(x) − c̄‖: the input-dependent part.", "",
                  "| adapter | task | mean ‖c(x) − c0‖₂ | relative to ‖c0‖₂ | mean \\|c(x) − c0\\| per entry | mean ‖c(x) − c̄‖₂ | ‖c̄ − c0‖₂ (all tasks) |",
                  "|---|---|---|---|---|---|---|"]
        for name, a in s["seeds_analysis"].items():
            for t, m in a["move"].items():
                lines.append(f"| {name} | {t} | {m['l2']:.4f} | {100 * m['relative']:.2f} % | {m['abs']:.4f} | {m['spread_l2']:.4f} | {a['constant_shift_l2']:.4f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- charts
COLOR = {"lora": "C0", "metalora-tr": "C1", "metalora-cp": "C2", "metalora-tr-frozen-seed-same-ranks": "C3",
         "metalora-tr-frozen-seed": "C4"}
BUDGET_MARK = {"main": ("D", "≈ 70k, main table"), "budget2": ("s", "≈ 280k, second budget")}


def sweep_chart(points: list[dict], budget_points: list[dict], path: Path, frozen: dict | None = None) -> None:
    """Accuracy vs trainable parameters on the mixture: the rank sweep as lines (seed 0), every
    trained row at the two budgets as markers (mean ± std over the seeds done, in the row's colour),
    the frozen backbone's k-NN as a dashed line."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, title in ((axes[0], "knn", "k-NN@10 top-1 (%)"), (axes[1], "head", "head top-1 (%)")):
        for row in sorted({p["row"] for p in points}):
            ps = sorted((p for p in points if p["row"] == row and p[key]), key=lambda p: p["params"])
            if not ps:
                continue
            ax.errorbar([p["params"] for p in ps], [100 * p[key]["mean"] for p in ps],
                        yerr=[100 * (p[key]["std"] or 0) for p in ps], marker="o", capsize=3, color=COLOR.get(row),
                        label=f"{LABEL.get(row, row)}: rank sweep, seed 0")
            for p in ps:
                ax.annotate(f"R={p['rank']}", (p["params"], 100 * p[key]["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for p in budget_points:
            if p.get(key):
                marker, what = BUDGET_MARK[p["budget"]]
                ax.errorbar([p["params"]], [100 * p[key]["mean"]], yerr=[100 * (p[key]["std"] or 0)], marker=marker, ms=6,
                            mfc="none", capsize=3, linestyle="none", color=COLOR.get(p["row"], "k"),
                            label=f"{LABEL.get(p['row'], p['row'])}, {what} (n={p[key]['n']})")
        if key == "knn" and frozen:
            ax.axhline(100 * frozen["mean"], ls="--", color="0.5", lw=1, label="frozen backbone")
        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
        ticks = [m * 10**e for e in range(2, 8) for m in (1, 2, 5) if lo <= m * 10**e <= hi]
        if len(ticks) >= 2:  # "20k" rather than crowded 2×10⁴, 3×10⁴, ... minor labels
            ax.set_xticks(ticks, [f"{t / 1e3:g}k" for t in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("trainable parameters (head excluded)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle("Mixture: accuracy vs trainable parameters (lines: rank sweep, seed 0; open markers: each row at a budget, "
                 "mean ± std over the seeds done, n in the legend)", fontsize=10)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seed_analysis(npz: Path, tsne_max: int, seed: int = 0) -> tuple[dict, dict]:
    """Probe, variance share and movement of one adapter's seeds; (stats, 2-D projections)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.manifold import TSNE
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    z = np.load(npz, allow_pickle=False)
    c, c0, tasks = z["seeds"].astype(np.float64), z["start"].astype(np.float64), z["tasks"].astype(str)
    names = sorted(set(tasks))
    rng = np.random.default_rng(seed)
    # A class-balanced subsample for the probe and t-SNE (t-SNE is quadratic-ish; 2 CPU cores).
    per = max(1, tsne_max // len(names))
    sub = np.sort(np.concatenate([rng.permutation(np.flatnonzero(tasks == t))[:per] for t in names]))
    counts = [int((tasks[sub] == t).sum()) for t in names]
    folds = max(2, min(5, min(counts)))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    acc = cross_val_score(probe, c[sub], tasks[sub], cv=StratifiedKFold(folds, shuffle=True, random_state=seed)) if len(names) > 1 else np.array([1.0])
    tot = ((c - c.mean(0)) ** 2).sum()
    between = sum((tasks == t).sum() * ((c[tasks == t].mean(0) - c.mean(0)) ** 2).sum() for t in names)
    d = c - c0
    # A constant shift of c can be folded into B, so it is no conditioning; the spread around the
    # mean seed is what depends on the input.
    mean_c = c.mean(0)
    move = {t: {"n": int((tasks == t).sum()), "l2": float(np.linalg.norm(d[tasks == t], axis=1).mean()),
                "relative": float(np.linalg.norm(d[tasks == t], axis=1).mean() / np.linalg.norm(c0)),
                "abs": float(np.abs(d[tasks == t]).mean()),
                "spread_l2": float(np.linalg.norm(c[tasks == t] - mean_c, axis=1).mean())} for t in names}
    pca = PCA(n_components=2).fit(c)
    perplexity = float(min(30, max(2, (len(sub) - 1) / 3)))
    # Exact gradients for small sets: Barnes-Hut's OpenMP loop is slower there (and stalls on a busy CPU).
    method = "exact" if len(sub) <= 1000 else "barnes_hut"
    ts = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, method=method).fit_transform(c[sub]) if len(sub) > 3 else np.zeros((len(sub), 2))
    stats = {
        "n": int(len(c)), "seed_dim": int(c.shape[1]), "tasks": names,
        "probe": {"mean": float(acc.mean()), "std": float(acc.std()), "folds": int(folds), "n": int(len(sub)),
                  "chance": max(counts) / len(sub), "model": "StandardScaler + LogisticRegression, stratified k-fold"},
        "between_task_share": float(between / tot) if tot > 0 else 0.0,
        "pca_explained_variance": [float(v) for v in pca.explained_variance_ratio_],
        "tsne": {"n": int(len(sub)), "perplexity": perplexity, "init": "pca", "random_state": seed, "method": method},
        "move": move,
        "constant_shift_l2": float(np.linalg.norm(mean_c - c0)),
    }
    proj = {"pca": (pca.transform(c), tasks), "tsne": (ts, tasks[sub])}
    return stats, proj


def seed_charts(analyses: dict, projections: dict, out: Path) -> dict[str, Path]:
    paths = {}
    if not analyses:
        return paths
    for key, title in (("pca", "PCA"), ("tsne", "t-SNE")):
        fig, axes = plt.subplots(1, len(projections), figsize=(5.2 * len(projections), 4.4), squeeze=False)
        for ax, (name, proj) in zip(axes[0], projections.items()):
            xy, tasks = proj[key]
            # One draw in a shuffled order, so no task (MNIST: 10,000 points) paints over another.
            names = sorted(set(tasks))
            colors = {t: plt.get_cmap("tab10")(i) for i, t in enumerate(names)}
            order = np.random.default_rng(0).permutation(len(tasks))
            ax.scatter(xy[order, 0], xy[order, 1], s=3, alpha=0.5, c=[colors[t] for t in tasks[order]])
            for t in names:
                ax.scatter([], [], s=12, color=colors[t], label=t)
            a = analyses[name]
            sub = f"PC1 {100 * a['pca_explained_variance'][0]:.0f} %, PC2 {100 * a['pca_explained_variance'][1]:.0f} %" if key == "pca" else f"{a['tsne']['n']} images, perplexity {a['tsne']['perplexity']:g}"
            ax.set_title(f"{name}: c(x) {title}\n{sub}; task probe {100 * a['probe']['mean']:.1f} %", fontsize=9)
            ax.legend(markerscale=4, fontsize=7)
            ax.set_xlabel(f"{title} 1" if key == "tsne" else "PC1")
            ax.set_ylabel(f"{title} 2" if key == "tsne" else "PC2")
        fig.tight_layout()
        paths[key] = out / f"seeds_{key}.png"
        fig.savefig(paths[key], dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = list(analyses)
    tasks = sorted({t for a in analyses.values() for t in a["move"]})
    w = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar(np.arange(len(tasks)) + (i - (len(names) - 1) / 2) * w, [100 * analyses[name]["move"].get(t, {}).get("relative", np.nan) for t in tasks], w, label=name)
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylabel("mean ‖c(x) − c0‖ / ‖c0‖ (%)")
    ax.set_title("How far the seeds move from their start value, per task", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths["move"] = out / "seeds_move.png"
    fig.savefig(paths["move"], dpi=120)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------- main
def build(out: Path, suite: str, rows: list[str], seeds: list[int], lr_grid, sweep_ranks, sweep_rows, sweep_seeds, tsne_max: int) -> tuple[dict, dict]:
    from research.run_paper import choose_lr

    recs = load(out)
    tasks = list(SUITES[suite])
    columns = [*tasks, MIXED]
    exp = expected(tasks, rows, seeds, lr_grid, sweep_ranks, sweep_rows, sweep_seeds)
    stages = {k: {"done": len(recs[k]), "expected": exp[k]} for k in exp}
    s: dict = {
        "protocol": {"k": 10, "metric": "cosine", "vote": "similarity-weighted", "spread": "sample std over seeds",
                     "interval": "95 % Student t over paired seeds (scipy.stats.t)"},
        "tasks": tasks, "columns": columns, "seeds": seeds, "budget": BUDGET, "budget2_value": BUDGET2,
        "progress": {"done": sum(v["done"] for v in stages.values()), "expected": sum(v["expected"] for v in stages.values()),
                     "stages": stages, "seconds": sum(r.get("seconds") or 0 for v in recs.values() for r in v)},
    }
    main = recs["main"]
    c = cells(main, columns)
    s["cells"] = c
    s["paired"] = paired(main, columns)
    s["mixture_gap"] = mixture_gap(main, tasks)
    s["n_classes_mixed"] = next((r["n_classes"] for r in main if r["task"] == MIXED and r.get("n_classes")), None)
    params = {}
    for r in main:
        if r["task"] == MIXED and r["row"] not in params and r.get("trainable_params") is not None:
            params[r["row"]] = {"params": r["trainable_params"], "ranks": r.get("ranks"), "deviation": r.get("budget_deviation")}
    s["params"] = {row: params[row] for row in ALL_ROWS if row in params}
    s["lr"] = {}
    for row in [r for r in ALL_ROWS if r in TRAINED]:
        rs = sorted((r for r in recs["lr"] if r["row"] == row), key=lambda r: r["lr"])
        if rs:
            pick = choose_lr(out / "raw", row, lr_grid)
            s["lr"][row] = [{"lr": r["lr"], **{k: r["validation"][k] for k in ("knn_top1", "head_top1", "n")},
                             "chosen": pick is not None and pick["lr"] == r["lr"]} for r in rs]
    sweep = []
    for row in sorted({r["row"] for r in recs["sweep"]}):
        for rank in sorted({r["rank"] for r in recs["sweep"] if r["row"] == row}):
            rs = [r for r in recs["sweep"] if r["row"] == row and r["rank"] == rank]
            sweep.append({"row": row, "rank": rank, "ranks": rs[0]["ranks"], "params": rs[0]["trainable_params"], "seeds": [r["seed"] for r in rs],
                          "knn": summarise([metric(r, "knn_top1") for r in rs]), "head": summarise([metric(r, "head_top1") for r in rs])})
    s["sweep"] = sweep
    b2 = {}
    for row in ALL_ROWS:
        rs2 = [r for r in recs["budget2"] if r["row"] == row and r["task"] == MIXED]
        if row == "frozen" or (not rs2 and (row, MIXED, "knn") not in c):
            continue
        b2[row] = {"knn_1": c.get((row, MIXED, "knn")), "head_1": c.get((row, MIXED, "head")),
                   "knn_2": summarise([metric(r, "knn_top1") for r in rs2]), "head_2": summarise([metric(r, "head_top1") for r in rs2]),
                   "params_2": rs2[0]["trainable_params"] if rs2 else None}
    s["budget2"] = b2 if recs["budget2"] else {}
    s["paired_budget2"] = paired([r for r in recs["budget2"] if r["task"] == MIXED], [MIXED])
    analyses, projections = {}, {}
    for row in SEED_ROWS:
        f = out / "seeds" / f"{MIXED}-{row}-s0.npz"
        if f.exists():
            analyses[LABEL[row]], projections[LABEL[row]] = seed_analysis(f, tsne_max)
    s["seeds_analysis"] = analyses
    budget_points = [{"row": row, "budget": "main", "params": params[row]["params"], "knn": c.get((row, MIXED, "knn")),
                      "head": c.get((row, MIXED, "head"))} for row in params if row in TRAINED]
    budget_points += [{"row": row, "budget": "budget2", "params": b["params_2"], "knn": b["knn_2"], "head": b["head_2"]}
                      for row, b in s["budget2"].items() if row in TRAINED and b["params_2"] is not None]
    return s, {"projections": projections, "budget_points": budget_points, "frozen": c.get(("frozen", MIXED, "knn"))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "research" / "paper")
    ap.add_argument("--docs", type=Path, default=ROOT / "research" / "NOTES.md", help="the page whose paper block is replaced ('-': none)")
    ap.add_argument("--suite", choices=list(SUITES), default="paper")
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ALL_ROWS, help="the rows planned (for the 'N of M done' count)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr-grid", type=float, nargs="+", default=list(LR_GRID))
    ap.add_argument("--sweep-ranks", type=int, nargs="+", default=list(SWEEP_RANKS))
    ap.add_argument("--sweep-rows", nargs="+", default=["lora", "metalora-tr"])
    ap.add_argument("--sweep-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--tsne-max", type=int, default=3000, help="images (class-balanced by task) for t-SNE and the probe")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    s, extra = build(args.out, args.suite, args.rows, args.seeds, args.lr_grid, args.sweep_ranks, args.sweep_rows, args.sweep_seeds, args.tsne_max)
    pngs: dict[str, Path] = {}
    if s["sweep"]:
        pngs["sweep"] = args.out / "sweep.png"
        sweep_chart(s["sweep"], extra["budget_points"], pngs["sweep"], extra["frozen"])
    pngs.update(seed_charts(s["seeds_analysis"], extra["projections"], args.out))
    # JSON keys: "row|column|metric" (column "mixed:<task>" for the mixture's per-task figures)
    out_json = {**s, "cells": {"|".join(k): v for k, v in s["cells"].items()}}
    (args.out / "summary.json").write_text(json.dumps(out_json, indent=1) + "\n")
    if str(args.docs) != "-":
        rel = {k: os.path.relpath(v, args.docs.resolve().parent) for k, v in pngs.items()}
        md = markdown(s, rel)
        text = args.docs.read_text()
        if START not in text or END not in text:
            raise SystemExit(f"{args.docs}: no {START} ... {END} block to replace")
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        args.docs.write_text(f"{head}{START}\n{md}{END}{tail}")
    p = s["progress"]
    print(f"{p['done']} of {p['expected']} runs done; summary: {args.out / 'summary.json'}" + (f"; {args.docs}" if str(args.docs) != "-" else ""))


if __name__ == "__main__":
    main()
