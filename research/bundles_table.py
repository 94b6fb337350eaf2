"""The shipped bundles' table (README, research/NOTES.md "Shipped bundles"), from what is on disk:
each bundle's manifest (its own test-set figures, calibration, OOD rejection), the frozen
backbone's figures on the same images (`research/full_scale/<task>-frozen-full.json`, written by
`research/frozen_baseline.py`) and, where measured, k-NN with the whole training set as gallery
(`research/full_scale/<task>-<version>-eval-fullgallery.json`, `metalora eval --gallery-data`).

    python -m research.bundles_table [cifar10@3 fashion-mnist@1 ...] [--write]

Default: the five tasks, `mixed` and `digits` (scikit-learn's 8×8 digits); the targets table
holds the five tasks only (issue #11's targets).

`--write` also puts the table (and the targets table) between the markers in README.md and
research/NOTES.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from metalora.bundle import read_manifest
from metalora.refs import name_of
from metalora.store import ModelStore

ROOT = Path(__file__).resolve().parent.parent
FULL = ROOT / "research" / "full_scale"
OOD_NAMES = {"cifar10": "C10", "mnist": "MNIST", "fashion-mnist": "F-MNIST", "eurosat": "EuroSAT", "gtsrb": "GTSRB", "imagenet-sample": "ImageNet sample"}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _diff(a, b) -> str:
    return "—" if a is None or b is None else f"{100 * (a - b):+.1f}"


def row(ref: str) -> str:
    name, version, path = ModelStore(ROOT / "model_store").resolve(ref)
    m = read_manifest(path)
    met, tr, cal = m.get("metrics", {}), m.get("training", {}), m.get("calibration") or {}
    frozen = FULL / f"{name}-frozen-full.json"
    fz = json.loads(frozen.read_text()) if frozen.is_file() else {}
    full = FULL / f"{name}-{version}-eval-fullgallery.json"
    fg = json.loads(full.read_text()).get("knn_top1") if full.is_file() else None
    ood = "; ".join(f"{OOD_NAMES.get(Path(k.split('?')[0]).parent.name, k)} {_pct(v)}" for k, v in (met.get("ood_rejection") or {}).items())
    ranks = m["adapter"]["ranks"]
    frozen_knn = next((v for k, v in fz.items() if k.startswith("knn10_gallery_") and k != "knn10_gallery_full"), None)
    if frozen_knn is None:  # no separate frozen run (mixed): the manifest's, on the bundle's own gallery images
        frozen_knn = met.get("baseline_knn_top1")
    ece = f"{_pct(met.get('ece'))} → {_pct(met.get('ece_calibrated'))} (T {cal['temperature']:.2f})" if cal else "—"
    n_held = int(cal["fitted_on"].split()[0]) if cal.get("fitted_on", "").split()[:1] and cal["fitted_on"].split()[0].isdigit() \
        else round(tr["n_train"] * tr["holdout_frac"] / (1 - tr["holdout_frac"])) if tr.get("holdout_frac") else 0  # the calibration's own count
    held = f" (+{n_held:,} held out)" if n_held else ""
    cut = m["backbone"].get("cut") or "blocks[:6]"  # where the shared prefix ends (no `cut`: the default)
    form = f"PQ{tr['gallery_pq']}" if tr.get("gallery_pq") else "fp16"  # how the gallery file stores its vectors
    return (f"| `{name}@{version}` | {m['adapter']['format']} {list(ranks)}, `{cut}` | {tr['trainable_params']:,} | {tr['n_train']:,}{held} "
            f"| {tr['gallery_items']:,} {form} | **{_pct(met.get('knn_top1'))}** | {_pct(fg)} | **{_pct(met.get('head_top1'))}** "
            f"| {_pct(frozen_knn)} / {_pct(fz.get('probe_top1'))} | {ece} | {_pct(met.get('test_false_reject_rate'))} | {ood} | {met['n']:,} |")


HEADER = ("| bundle | format, ranks, prefix cut | trainable | train images | gallery (items, stored as) | k-NN@10 % | k-NN@10, whole train set as gallery % | head top-1 % "
          "| frozen k-NN@10 / probe % | ECE % → after T | unknown on own test % | OOD answered unknown % | test images |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


# Issue #11's targets: CIFAR-10 >= 0.90, MNIST >= 0.99; the others >= the frozen probe + 3 points and >= 0.90.
FIXED_TARGETS = {"cifar10": 0.90, "mnist": 0.99}


def target(name: str) -> float | None:
    if name in FIXED_TARGETS:
        return FIXED_TARGETS[name]
    f = FULL / f"{name}-frozen-full.json"
    return max(json.loads(f.read_text())["probe_top1"] + 0.03, 0.90) if f.is_file() else None


def target_row(ref: str) -> str:
    name, version, path = ModelStore(ROOT / "model_store").resolve(ref)
    met = read_manifest(path).get("metrics", {})
    t = target(name)
    gap = "—" if t is None else f"{100 * (min(met['knn_top1'], met['head_top1']) - t):+.1f} points (the lower of the two)"
    return f"| `{name}@{version}` | ≥ {_pct(t)} | {_pct(met.get('knn_top1'))} | {_pct(met.get('head_top1'))} | {gap} |"


TASKS = ["cifar10", "mnist", "fashion-mnist", "eurosat", "gtsrb"]


def mixed_table(ref: str = "mixed") -> str:
    """Issue #11's last target: the multi-task adapter per task against each single-task bundle
    (within 1 point), on the same (whole) test sets; tasks of `TASKS` only. k-NN with each bundle's
    shipped gallery, and with its whole training set as gallery where measured
    (`<name>-<version>-eval-fullgallery.json`), which takes the gallery size out of the comparison.
    Raises ValueError when the two bundles were measured on different test images."""
    store = ModelStore(ROOT / "model_store")
    name, version, path = store.resolve(ref)
    m = read_manifest(path)
    met, per_class = m["metrics"], m.get("training", {}).get("gallery_per_class")
    gal = f"{per_class:,} a class" if per_class else "every training image"
    fg_path = FULL / f"{name}-{version}-eval-fullgallery.json"
    fg = json.loads(fg_path.read_text()).get("per_task", {}) if fg_path.is_file() else {}
    lines = [f"| task | `{name}@{version}` k-NN@10 % ({gal} in the gallery) | whole train set as gallery % | head top-1 % "
             "| single-task bundle | its k-NN@10 % | whole train set as gallery % | its head % | head Δ | k-NN Δ (shipped galleries) "
             "| k-NN Δ (whole train set as gallery) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task in TASKS:
        pt = met.get("per_task", {}).get(task)
        if pt is None or task not in store.adapter_names():
            continue
        sn, sv, sp = store.resolve(task)
        sm = read_manifest(sp)["metrics"]
        if pt.get("n") != sm.get("n"):
            raise ValueError(f"{name}@{version} was measured on {pt.get('n')} {task} test images, {sn}@{sv} on {sm.get('n')}: not comparable")
        sfg_path = FULL / f"{sn}-{sv}-eval-fullgallery.json"
        sfg = json.loads(sfg_path.read_text()).get("knn_top1") if sfg_path.is_file() else None
        mfg = (fg.get(task) or {}).get("knn_top1")
        lines.append(f"| {task} | {_pct(pt['knn_top1'])} | {_pct(mfg)} | {_pct(pt['head_top1'])} | `{sn}@{sv}` | {_pct(sm['knn_top1'])} "
                     f"| {_pct(sfg)} | {_pct(sm['head_top1'])} | {_diff(pt.get('head_top1'), sm.get('head_top1'))} "
                     f"| {_diff(pt.get('knn_top1'), sm.get('knn_top1'))} | {_diff(mfg, sfg)} |")
    return "\n".join(lines)


def _replace(path: Path, block: str, text: str) -> None:
    doc = path.read_text()
    start, end = f"<!-- {block}:start -->\n", f"<!-- {block}:end -->"
    if start not in doc or end not in doc:
        raise ValueError(f"{path} has no {start.strip()} ... {end} markers")
    i, j = doc.index(start) + len(start), doc.index(end)
    path.write_text(doc[:i] + text + "\n" + doc[j:])


def main(refs: list[str], write: bool = False) -> None:
    table = "\n".join([HEADER, *(row(r) for r in refs)])
    print(table)
    if write:  # docs/models.md and research/NOTES.md carry the tables between their markers; all computed before any write
        blocks = [(ROOT / "docs" / "models.md", "readme-bundles", table), (ROOT / "research" / "NOTES.md", "bundles-table", table),
                  (ROOT / "research" / "NOTES.md", "targets", "\n".join(target_row(r) for r in refs if name_of(r) in TASKS))]
        if any(name_of(r) == "mixed" for r in refs):
            blocks.append((ROOT / "research" / "NOTES.md", "mixed-table", mixed_table()))
        for path, block, _ in blocks:
            doc = path.read_text()
            if f"<!-- {block}:start -->" not in doc or f"<!-- {block}:end -->" not in doc:
                raise SystemExit(f"{path} has no <!-- {block}:start/end --> markers: nothing written")
        for path, block, text in blocks:
            _replace(path, block, text)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--write"]
    main(args or [*TASKS, "mixed", "digits"], write="--write" in sys.argv)
