"""Issue 11's target-layer sweep: where the shared prefix ends, and what adapting earlier blocks buys.

The shipped bundles adapt only `blocks.6` and `conv_head`; everything before is the shared,
cached prefix (`blocks[:6]`, 7x7). This sweep moves the cut earlier — `blocks[:5]` (tail adds
block 5, 4 layers at 7x7) and `blocks[:4]` (tail adds blocks 4-5, 14x14 and 7x7) — and adapts
every 1x1 conv of the tail plus `conv_head`, at the same trainable budget, the same data, epochs
and learning rate (tr, lr 3e-3; CIFAR-10: the first 500 training images a class, 4 epochs, batch
128; GTSRB: every training image, 10 epochs, batch 64; no hold-out, the whole training set as the
gallery, test sets whole — so the figures compare cuts with each other, not with the shipped
bundles, which train on more data and ship smaller galleries). For each cut it also measures what
serving pays: the shared prefix's share of the backbone's FLOPs (torch FlopCounterMode) — the part
every adapter shares and INT8 quantises — and the images/s of the service's CPU backend
(`OrtRunner`, fp32) on a batch of several adapters, the cuts alternated in one run (ratios; the
machine is shared). Prefix + tail are the same FLOPs at every cut; what moves is how much of them
runs once per batch (the prefix) rather than once per adapter segment (the tail).

    python -m research.layer_sweep                  # every run; resumable (one JSON per run)
    python -m research.layer_sweep --tasks cifar10 --splits 6 5
    python -m research.layer_sweep --tasks cifar10 --splits 5 --budget 545408   # twice the budget
    python -m research.layer_sweep --serving-mixed   # a blocks[:5] store serving default-cut adapters
    python -m research.layer_sweep --serving-mixed --cut4   # ... and a blocks[:4] store serving all three cuts
Writes research/layer_sweep/<task>-split<S>.json, research/layer_sweep/serving.json, serving-mixed.json
and serving-mixed-cut4.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from metalora.backbones import create_backbone
from metalora.train import TrainConfig, train

D = "../shared/data"
OUT = Path("research/layer_sweep")
# (train spec, test spec, epochs, batch size): the shipped bundles' settings, cifar10 on 500 a class
TASKS = {
    "cifar10": (f"{D}/cifar10/train.zip?per_class=500,pick=first", f"{D}/cifar10/test.zip", 4, 128),
    "gtsrb": (f"{D}/gtsrb/train.zip", f"{D}/gtsrb/test.zip", 10, 64),
}
BUDGET = 272_704  # cifar10@3 / gtsrb@1: tr [8, 7, 8]


def targets_for(backbone) -> list[str]:
    """Every 1x1 conv of the tail's blocks (conv_pw, conv_pwl) and conv_head."""
    return [n for n in backbone.targetable() if n.endswith(("conv_pw", "conv_pwl")) or n == "conv_head"]


SERVING_CONFIGS = ((32, 4), (16, 16))  # (batch, distinct adapters): 8 images per adapter; one image per adapter


def _store_at(root: Path, split: int) -> Path:
    """An empty store at `root` whose backbone (the shipped manifest's) is cut at blocks[:split]."""
    bdir = root / "backbones" / "efficientnet_lite0"
    bdir.mkdir(parents=True)
    man = json.loads(Path("model_store/backbones/efficientnet_lite0/manifest.json").read_text())
    bb = create_backbone("efficientnet_lite0", pretrained=False, split=split)
    man.update(kwargs={"split": split}, seed_in_dim=bb.seed_in_dim, targetable=sorted(bb.targetable()))
    (bdir / "manifest.json").write_text(json.dumps(man))
    (root / "adapters").mkdir()
    return root


# name -> (the store's cut, the cut of adapter i): 16 adapters, cycled through by each config.
MIXED_STORES = {
    "split6": (6, lambda i: 6),
    "split5": (5, lambda i: 6),
    "split5-mixed": (5, lambda i: 5 if i % 4 == 0 else 6),
}
# What moving the store's cut to blocks[:4] costs (`--serving-mixed --cut4`): the shipped mix
# (split5-mixed) against the same adapters in a blocks[:4] store, and that store with every 4th
# adapter (offset 2) cut at blocks[:4] too.
CUT4_STORES = {
    "split6": (6, lambda i: 6),
    "split5-mixed": (5, lambda i: 5 if i % 4 == 0 else 6),
    "split4-same": (4, lambda i: 5 if i % 4 == 0 else 6),
    "split4-mixed": (4, lambda i: 5 if i % 4 == 0 else 4 if i % 4 == 2 else 6),
}


def serving_mixed(configs=SERVING_CONFIGS, rounds: int = 7, precisions: tuple[str, ...] = ("fp32", "int8"), stores: dict | None = None) -> dict:
    """What a store cut before the default cut costs the default-cut bundles it also serves.

    The runner is the service's CPU backend, `metalora.backends.lowp.LowpRunner` (static-pad prefix and
    bridge graphs, FP32 tails), once per precision: `fp32` (what `metalora serve` runs by default)
    and `int8` (the prefix quantised; bridges and tails FP32), where this CPU offers it.

    The runtimes of `stores` (default `MIXED_STORES`; name -> (store cut, cut of adapter i)) are
    timed in alternation in one run (median of `rounds`). `MIXED_STORES`: `split6` — a blocks[:6]
    store with 16 default-cut tr adapters (BUDGET, blocks.6 + conv_head); `split5` — a blocks[:5]
    store with the same 16 adapters: the prefix graph stops at block 5, a frozen bridge graph runs
    block 5 once for all their rows, then each adapter's own tail graph; `split5-mixed` — the
    blocks[:5] store with every 4th adapter replaced by a cut-5 one (11 layers at the same budget),
    as the shipped store mixes them. `CUT4_STORES` adds blocks[:4] stores (17 layers for a cut-4
    adapter). Adapter i of a given cut is the same weights in every store. Each (batch, adapters)
    config cycles through the first `adapters` of them.
    """
    import shutil
    import statistics
    import tempfile

    from bench.settings import BenchSettings
    from metalora.adapters import Adapter, AdapterConfig
    from metalora.backends.calib import CalibrationSet
    from metalora.backends.lowp import LowpRunner, unavailable
    from metalora.runtime import Runtime
    from metalora.train import ranks_for_budget

    stores = stores or MIXED_STORES
    precs = [p for p in precisions if unavailable(p) is None]
    tmp = Path(tempfile.mkdtemp(prefix="layer-sweep-mixed-"))
    n_max = max(n for _, n in configs)
    torch.manual_seed(0)
    xs = {b: torch.rand(b, 3, 224, 224) * 2 - 1 for b, _ in configs}
    runners, out = {}, {}
    try:
        rts = {name: Runtime(store=_store_at(tmp / name, cut)) for name, (cut, _) in stores.items()}
        cuts = sorted({rule(i) for _, rule in stores.values() for i in range(n_max)}, reverse=True)
        gen = torch.Generator().manual_seed(6)
        ranks, params, made = {}, {}, {}
        earliest = min(rts.values(), key=lambda rt: rt.backbone.split).backbone
        for c in cuts:  # 6 first, then 5: the draws MIXED_STORES always made
            bb = earliest.at_cut(c)
            tg = targets_for(bb)
            ranks[c], params[c] = ranks_for_budget(bb, "tr", BUDGET, tg, 64, "input")
            made[c] = [Adapter(bb, AdapterConfig("tr", ranks[c], tg, [f"c{j}" for j in range(10)])).perturb_(0.05, gen).eval() for _ in range(n_max)]
        for name, rt in rts.items():
            rule = stores[name][1]
            for i in range(n_max):
                src = made[rule(i)][i]  # the same adapter, built on this runtime's view at its own cut
                ad = Adapter(rt.backbone.at_cut(rule(i)), src.config).eval()
                ad.load_state_dict(src.state_dict())
                rt.model.add_adapter(f"a{i}@1", ad)
            for prec in precs:
                bs = BenchSettings()  # int8 calibrates on the shared data beside the checkout
                runner = LowpRunner(rt, prec, threads=torch.get_num_threads(), cache_dir=bs.onnx_cache_dir, calibration=CalibrationSet(data=bs.data))
                for i in range(n_max):
                    runner.prepare(f"a{i}@1")
                runners[(name, prec)] = runner
                out.setdefault(prec, {})[name] = {"prefix": rt.backbone.identity.cut or "blocks[:6]", "serving": {}}
                for bsz, n_ad in configs:
                    runner.run(xs[bsz], [f"a{i % n_ad}@1" for i in range(bsz)])  # warm-up (exports the bridge)
                    out[prec][name]["serving"][f"batch{bsz}-adapters{n_ad}"] = {"times": []}
        for _ in range(rounds):
            for bsz, n_ad in configs:
                for (name, prec), runner in runners.items():
                    t0 = time.perf_counter()
                    runner.run(xs[bsz], [f"a{i % n_ad}@1" for i in range(bsz)])
                    out[prec][name]["serving"][f"batch{bsz}-adapters{n_ad}"]["times"].append(time.perf_counter() - t0)
        for prec in precs:
            for bsz, n_ad in configs:
                key = f"batch{bsz}-adapters{n_ad}"
                for name in stores:
                    c = out[prec][name]["serving"][key]
                    c["images_per_s"] = bsz / statistics.median(c["times"])
                for name in stores:
                    c = out[prec][name]["serving"][key]
                    c["vs_split6"] = c["images_per_s"] / out[prec]["split6"]["serving"][key]["images_per_s"]
                    c["vs_split6_fp32"] = c["images_per_s"] / out["fp32"]["split6"]["serving"][key]["images_per_s"] if "fp32" in out else None
    finally:
        for runner in runners.values():
            runner.close()
        shutil.rmtree(tmp, ignore_errors=True)
    names = {6: "default_cut", 5: "blocks[:5]", 4: "blocks[:4]"}
    return {"configs": [{"batch": b, "distinct_adapters": n} for b, n in configs], "rounds": rounds, "threads": torch.get_num_threads(),
            "ranks": {names[c]: list(r) for c, r in ranks.items()}, "trainable_params": {names[c]: n for c, n in params.items()},
            "stores": {name: {"cut": f"blocks[:{cut}]", "adapter_cuts": [f"blocks[:{rule(i)}]" for i in range(n_max)]} for name, (cut, rule) in stores.items()},
            "by_precision": out, "note": "LowpRunner (the service's CPU backend) per precision; median of alternated rounds; "
                                         "split5-mixed: every 4th adapter cut at blocks[:5]"}


def serving_cost(splits: list[int], configs=SERVING_CONFIGS, rounds: int = 7) -> dict:
    """Per cut: the prefix's share of the backbone's FLOPs, and the CPU serving path's images/s.

    The serving path is `OrtRunner` (the service's CPU backend): one shared prefix graph per batch,
    then one tail graph per adapter segment. Each (batch, adapters) config mixes that many tr
    adapters at BUDGET, round-robin. The cuts are timed in alternation in one run (median of `rounds`), so the
    ratios compare like with like on a shared machine. FLOPs: torch FlopCounterMode, one image.
    """
    import shutil
    import statistics
    import tempfile

    from torch.utils.flop_counter import FlopCounterMode

    from metalora.adapters import Adapter, AdapterConfig
    from bench.settings import BenchSettings
    from metalora.backends.onnx import OrtRunner
    from metalora.runtime import Runtime
    from metalora.train import ranks_for_budget

    tmp = Path(tempfile.mkdtemp(prefix="layer-sweep-store-"))
    torch.manual_seed(0)
    n_max = max(n for _, n in configs)
    xs = {b: torch.rand(b, 3, 224, 224) * 2 - 1 for b, _ in configs}
    runners, out = {}, {}
    try:
        for s in splits:
            rt = Runtime(store=_store_at(tmp / f"split{s}", s))
            bb = rt.backbone
            tg = targets_for(bb)
            ranks, n = ranks_for_budget(bb, "tr", BUDGET, tg, 64, "input")
            gen = torch.Generator().manual_seed(s)
            keys = []
            for i in range(n_max):
                ad = Adapter(bb, AdapterConfig("tr", ranks, tg, [f"c{j}" for j in range(10)])).perturb_(0.05, gen).eval()
                rt.model.add_adapter(f"a{i}@1", ad)
                keys.append(f"a{i}@1")
            with torch.inference_mode():
                with FlopCounterMode(display=False) as fc:
                    h = bb.prefix(xs[configs[0][0]][:1])
                pre = fc.get_total_flops()
                with FlopCounterMode(display=False) as fc:
                    bb.tail(h)
                tail = fc.get_total_flops()
            runner = OrtRunner(rt, threads=torch.get_num_threads(), cache_dir=BenchSettings().onnx_cache_dir)
            for k in keys:
                runner.prepare(k)
            runners[s] = runner
            out[s] = {"cut": bb.identity.cut or "blocks[:6] (default)", "targets": len(tg), "ranks": list(ranks), "trainable_params": n,
                      "prefix_gflop": pre / 1e9, "tail_gflop": tail / 1e9, "prefix_share": pre / (pre + tail), "serving": {}}
            for bsz, n_ad in configs:
                runner.run(xs[bsz], [keys[i % n_ad] for i in range(bsz)])  # warm-up
                out[s]["serving"][f"batch{bsz}-adapters{n_ad}"] = {"times": []}
        for _ in range(rounds):  # the cuts alternated inside every round, so drift hits all alike
            for bsz, n_ad in configs:
                for s, runner in runners.items():
                    ks = [f"a{i % n_ad}@1" for i in range(bsz)]
                    t0 = time.perf_counter()
                    runner.run(xs[bsz], ks)
                    out[s]["serving"][f"batch{bsz}-adapters{n_ad}"]["times"].append(time.perf_counter() - t0)
        for bsz, n_ad in configs:
            key = f"batch{bsz}-adapters{n_ad}"
            for s in splits:
                c = out[s]["serving"][key]
                c["images_per_s"] = bsz / statistics.median(c["times"])
            for s in splits:
                c = out[s]["serving"][key]
                c["vs_default_cut"] = c["images_per_s"] / out[6]["serving"][key]["images_per_s"] if 6 in out else None
    finally:
        for runner in runners.values():
            runner.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"configs": [{"batch": b, "distinct_adapters": n} for b, n in configs], "rounds": rounds, "threads": torch.get_num_threads(),
            "by_split": out, "note": "OrtRunner fp32 (the service's CPU backend): shared prefix graph + one tail graph per adapter "
                                     "segment; median of alternated rounds"}


def report() -> str:
    """A markdown table of every run and the serving cost per cut, and a chart beside the JSONs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sv = json.loads((OUT / "serving.json").read_text())["by_split"] if (OUT / "serving.json").is_file() else {}
    runs = sorted((json.loads(f.read_text()) for f in OUT.glob("*-split*.json")), key=lambda r: (r["task"], -r["split"], r.get("budget", BUDGET)))
    lines = ["| task | prefix (shared) | adapted layers | ranks | trainable (budget) | k-NN@10 % | head top-1 % | prefix share of FLOPs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c = sv.get(str(r["split"]), {})
        share = f"{100 * c['prefix_share']:.0f} %" if c else "—"
        lines.append(f"| {r['task']} | `blocks[:{r['split']}]` | {len(r['targets'])} | {r['ranks']} | {r['trainable_params']:,} ({r.get('budget', BUDGET):,}) "
                     f"| {100 * r['knn_top1']:.1f} | {100 * r['head_top1']:.1f} | {share} |")
    if sv:
        keys = list(next(iter(sv.values()))["serving"])
        lines += ["", "| prefix (shared) | prefix GFLOP | tail GFLOP | " + " | ".join(f"{k}: images/s (vs default cut)" for k in keys) + " |",
                  "|---|---|---|" + "---|" * len(keys)]
        for s_, c in sorted(sv.items(), key=lambda kv: -int(kv[0])):
            cells = " | ".join(f"{c['serving'][k]['images_per_s']:.1f} ({c['serving'][k]['vs_default_cut']:.2f}×)" for k in keys)
            lines.append(f"| `blocks[:{s_}]` | {c['prefix_gflop']:.3f} | {c['tail_gflop']:.3f} | {cells} |")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, key, title in ((axes[0], "knn_top1", "k-NN@10"), (axes[1], "head_top1", "head top-1")):
        for task in sorted({r["task"] for r in runs}):
            rs = [r for r in runs if r["task"] == task and r.get("budget", BUDGET) == BUDGET]
            ax.plot([r["split"] for r in rs], [100 * r[key] for r in rs], "o-", label=task)
        ax.set_xlabel("prefix ends at blocks[:N]  (smaller N: more of the backbone adapted)")
        ax.set_title(f"{title}, test set (budget {BUDGET:,})")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(OUT / "layer_sweep.png", dpi=110)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--splits", nargs="+", type=int, default=[6, 5, 4])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--budget", type=int, default=BUDGET, help="trainable parameters (a non-default budget is in the file name)")
    ap.add_argument("--serving-only", action="store_true")
    ap.add_argument("--serving-mixed", action="store_true", help="only measure what a blocks[:5] store costs default-cut adapters "
                                                                 "(research/layer_sweep/serving-mixed.json)")
    ap.add_argument("--cut4", action="store_true", help="with --serving-mixed: what moving the store's cut to blocks[:4] costs "
                                                        "(research/layer_sweep/serving-mixed-cut4.json)")
    ap.add_argument("--report", action="store_true", help="only write the table (stdout) and research/layer_sweep/layer_sweep.png from the JSONs")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report())
        return
    from metalora.backends.cpu import cpu_info  # CPU model and ISA flags go with every figure

    machine = cpu_info()
    if args.serving_mixed:
        res = serving_mixed(stores=CUT4_STORES if args.cut4 else MIXED_STORES)
        res["machine"] = machine
        (OUT / ("serving-mixed-cut4.json" if args.cut4 else "serving-mixed.json")).write_text(json.dumps(res, indent=2))
        for prec, stores in res["by_precision"].items():
            for name, r in stores.items():
                print(f"{prec} {name} (prefix {r['prefix']}): " + ", ".join(f"{k} {c['images_per_s']:.1f} img/s ({c['vs_split6']:.2f}x split6)"
                                                                           for k, c in r["serving"].items()), flush=True)
        return
    sv = OUT / "serving.json"
    if not sv.exists():
        res = serving_cost(sorted(set(args.splits) | {6, 5, 4}, reverse=True))
        res["machine"] = machine
        sv.write_text(json.dumps(res, indent=2))
        for s, r in res["by_split"].items():
            print(f"split {s}: prefix {r['prefix_share']:.1%} of the backbone's FLOPs; " + ", ".join(
                f"{k} {c['images_per_s']:.1f} img/s ({c['vs_default_cut']:.2f}x the default cut)" for k, c in r["serving"].items()), flush=True)
    if args.serving_only:
        return
    for task in args.tasks:
        train_spec, test_spec, epochs, bs = TASKS[task]
        for s in args.splits:
            path = OUT / (f"{task}-split{s}.json" if args.budget == BUDGET else f"{task}-split{s}-budget{args.budget}.json")
            if path.exists():
                continue
            bb = create_backbone("efficientnet_lite0", split=s)
            cfg = TrainConfig(data=[train_spec], format="tr", budget=args.budget, targets=targets_for(bb), epochs=epochs, lr=args.lr, batch_size=bs, seed=0)
            t0 = time.time()
            res = train(cfg, bb, eval_data=[test_spec], ckpt_dir=Path("runs/layer_sweep") / path.stem, baseline=False)
            m, t = res["metrics"], res["training"]
            rec = {"task": task, "split": s, "cut": bb.identity.cut or f"blocks[:{s}] (default)", "targets": cfg.targets,
                   "ranks": list(t["ranks"]), "budget": args.budget, "trainable_params": t["trainable_params"], "n_train": t["n_train"], "epochs": epochs,
                   "batch_size": bs, "lr": args.lr, "knn_top1": m["knn_top1"], "head_top1": m.get("head_top1"), "n_test": m["n"],
                   "history": t["history"], "seconds": round(time.time() - t0, 1), "data": [train_spec, test_spec], "machine": machine}
            path.write_text(json.dumps(rec, indent=2))
            print(f"{task} split {s}: k-NN@10 {m['knn_top1']:.4f}, head {m.get('head_top1') or 0:.4f}, "
                  f"{t['trainable_params']} params, {rec['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
