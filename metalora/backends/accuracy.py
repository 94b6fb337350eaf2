"""Accuracy per precision on whole test sets, and the drop against FP32 (`python -m bench.lowp
accuracy`, docs/benchmarks.md section h): the measurement behind the INT8 default's 0.5-point bound."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from .calib import CalibrationSet, imagenet_split
from .lowp import LowpRunner, base_outputs


def _test_specs(manifest: dict, data: Path, per_class: int | None) -> list[str]:
    """The adapter's recorded test specs, `../shared/data` re-rooted at `data`, each the whole
    test split (`per_class=None`: a bundle may record a subset it was scored on at training time;
    a 0.5-point bound needs every image there is) or `per_class` images a class."""
    out = []
    for spec in manifest.get("metrics", {}).get("data", []):
        spec = spec.replace("../shared/data", str(data))
        body, _, query = spec.partition("?")
        opts = [o for o in query.split(",") if o and not o.startswith("per_class=")] + ([f"per_class={per_class}"] if per_class is not None else [])
        out.append(f"{body}?{','.join(opts)}" if opts else body)
    return out


def evaluate_precisions(
    runtime,
    precisions: list[str],
    adapters: list[str] | None = None,
    imagenet: int | None = None,
    per_class: int | None = None,
    state_path: Path | None = None,
    data: Path | None = None,
    batch: int = 32,
    log=print,
    **runner_kw,
) -> dict:
    """Accuracy per precision, same images for all: ImageNet-sample top-1 (held-out photos, the
    calibration ones excluded) and each adapter's k-NN@10 and head top-1 on its recorded test
    sets, whole (`_test_specs`), against its bundle's gallery. Adapter tails and heads run FP32 (torch) on each precision's
    prefix features. `data` is a directory laid out as ../shared/data (the benchmarks pass the
    checkout's). `imagenet`/`per_class` shrink the sets (tests); `state_path` makes a long
    run resumable (finished (set, precision) results are kept there and skipped on a rerun).
    """
    from ..bundle import load_gallery
    from ..data import DataSpec, FeatureSet, list_items
    from ..evaluate import evaluate_features
    from ..images import decode_image
    from ..imagenet import read_classes_tsv

    if data is None:
        raise RuntimeError("accuracy needs a data directory laid out as ../shared/data (ImageNet sample and the adapters' test sets)")
    state = json.loads(state_path.read_text()) if state_path and state_path.is_file() else {}

    def save():
        if state_path:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            state_path.write_text(json.dumps(state, indent=1) + "\n")

    runner_kw.setdefault("calibration", CalibrationSet(data=data))  # int8 calibrates on the same directory's training splits
    runners = {p: LowpRunner(runtime, p, **runner_kw) for p in precisions}
    # What each entry was measured with: a state written for another quantisation config or set
    # size is measured again rather than reused (entries are keyed by the adapter's version too).
    graph = {p: runners[p].tag() for p in precisions}

    def done(key: str, p: str, specs: list[str]) -> bool:
        e = state.get(f"{key}/{p}")
        return e is not None and e.get("graph") == graph[p] and e.get("specs") == shown(specs)

    def shown(specs: list[str]) -> list[str]:  # as recorded in the state: independent of where the data is
        return [sp.replace(str(data), "../shared/data") for sp in specs]

    def features(raw: list, todo: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {p: [] for p in todo}
        for i in range(0, len(raw), batch):
            x = np.stack([runtime.preprocessor(decode_image(r() if callable(r) else r)).numpy() for r in raw[i : i + batch]])  # (b, 3, S, S)
            for p in todo:
                out[p].append(runners[p].features(x))  # (b, C_p, H_p, W_p)
        return {p: np.concatenate(v) for p, v in out.items()}

    # ImageNet sample: the backbone's own head.
    _, held = imagenet_split(data)
    held = held[:imagenet] if imagenet is not None else held
    todo = [p for p in precisions if not (state.get(f"imagenet/{p}", {}).get("graph") == graph[p] and state[f"imagenet/{p}"].get("n") == len(held))]
    if held and todo:
        wnids = read_classes_tsv(data / "imagenet-sample" / "classes.tsv")
        index = {w: i for i, w in enumerate(wnids)}
        y = torch.tensor([index[Path(m).parent.name] for m in held])
        with zipfile.ZipFile(data / "imagenet-sample" / "val.zip") as z:
            feats = features([z.read(m) for m in held], todo)
        for p in todo:
            _, logits = base_outputs(runtime, feats[p])
            state[f"imagenet/{p}"] = {"top1": float((logits.argmax(1) == y).float().mean()), "n": len(held), "graph": graph[p]}
            log(f"imagenet {p}: {state[f'imagenet/{p}']}")
        save()

    # Adapters: k-NN@10 against the bundle's gallery and head top-1, on the recorded test sets.
    names = adapters if adapters is not None else runtime.store.adapter_names()
    cache: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        key = runtime.load(name)
        manifest = runtime.manifests[key]
        specs = _test_specs(manifest, data, per_class)
        todo = [p for p in precisions if not done(key, p, specs)]
        if not todo or not specs:
            continue
        parts = []
        for spec in specs:
            ds = DataSpec.parse(spec)
            src = spec.split("=", 1)[1] if ds.task else spec
            items = list_items(ds)
            if src not in cache or any(p not in cache[src] for p in todo):
                cache[src] = {**cache.get(src, {}), **features([it.read for it in items], todo)}
            labels = [f"{ds.task}/{it.label}" if ds.task else it.label for it in items]
            parts.append((items, labels, ds.name, src))
        adapter = runtime.model.adapters[key]
        _, _, path = runtime.store.resolve(key)
        gallery = load_gallery(path, manifest)
        for p in todo:
            h = torch.from_numpy(np.concatenate([cache[src][p] for *_, src in parts]))  # (N, C_p, H_p, W_p)
            fs = FeatureSet(h, sum((lab for _, lab, _, _ in parts), []), sum(([it.id for it in items] for items, *_ in parts), []), specs, sum(([t] * len(items) for items, _, t, _ in parts), []))
            res = evaluate_features(runtime.model, adapter, manifest["adapter"]["labels"], fs, gallery)
            state[f"{key}/{p}"] = {**{k: res[k] for k in ("knn_top1", "head_top1", "n")}, "graph": graph[p], "specs": shown(specs)}
            log(f"{key} {p}: {state[f'{key}/{p}']}")
            save()
    return state


def accuracy_table(state: dict, reference: str = "fp32", max_drop_points: float = 0.5) -> dict:
    """Per set and precision: the figures, the drop vs `reference` in points, and pass/fail.

    Keys of `state` are `SET/PRECISION`, SET being `imagenet` or an adapter's `name@version`."""
    table: dict[str, dict] = {}
    for k, v in state.items():
        name, prec = k.split("/")
        v = {m: x for m, x in v.items() if m not in ("graph", "specs")}
        ref = state.get(f"{name}/{reference}")
        row = dict(v)
        if ref is not None:
            for m in ("top1", "knn_top1", "head_top1"):
                if v.get(m) is not None and ref.get(m) is not None:
                    row[f"{m}_drop_points"] = round(100 * (ref[m] - v[m]), 2)
            row["pass"] = all(row[d] <= max_drop_points for d in row if d.endswith("_drop_points"))
        table.setdefault(name, {})[prec] = row
    return table
