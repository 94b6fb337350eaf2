"""Through a live server (`service.launch`, the real `metalora serve` on a store): `/v1/predict` and
`/v1/knn` over a test set, accuracy and the share answered `"unknown"`, next to `metalora eval`'s
figures for the same images; and the class of scikit-image's `chelsea` (a cat).

    python -m research.live_check --adapter cifar10 --data '../shared/data/cifar10/test.zip?per_class=100' \
        --out research/full_scale/cifar10-live.json [--ood '../shared/data/mnist/test.zip?per_class=20']
    python -m research.live_check --adapter mixed --data 'cifar10=../shared/data/cifar10/test.zip' \
        --data 'mnist=../shared/data/mnist/test.zip' ... --out research/full_scale/mixed-3-live-full.json

Several `--data` specs (each `task=`, as `metalora train` takes them) give labels `task/class`
and a figure per task beside the overall one.

Images go as multipart files, `batch` at a time, exactly the bytes in the zip.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import httpx
from PIL import Image

from metalora.data import DataSpec, list_items
from metalora.store import DEFAULT_STORE
from service.launch import ServerProcess


def items_of(spec: str) -> list:
    """The spec's images; a `task=` prefix makes each label `task/class`, the joint label space."""
    ds = DataSpec.parse(spec)
    items = list_items(ds)
    if ds.task:
        for it in items:
            it.label = f"{ds.task}/{it.label}"
    return items


def run(c: httpx.Client, adapter: str, items, batch: int) -> dict:
    n = knn_ok = head_ok = knn_unknown = head_unknown = 0
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        files = [("images", (it.id.rsplit("/", 1)[-1], it.read())) for it in chunk]
        p = c.post("/v1/predict", files=files, data={"adapter": adapter, "top_k": "1"})
        k = c.post("/v1/knn", files=files, data={"adapter": adapter, "k": "10"})
        p.raise_for_status()
        k.raise_for_status()
        for it, pr, kr in zip(chunk, p.json()["results"], k.json()["results"]):
            n += 1
            head_ok += pr["predictions"][0]["label"] == it.label
            knn_ok += kr["label"] == it.label
            head_unknown += bool(pr.get("unknown"))
            knn_unknown += bool(kr.get("unknown"))
    return {"n": n, "knn_top1": knn_ok / n, "head_top1": head_ok / n, "unknown_rate_knn": knn_unknown / n, "unknown_rate_predict": head_unknown / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--data", required=True, action="append", help="test data spec; repeat with task= for a multi-task adapter")
    ap.add_argument("--ood", action="append", default=[])
    ap.add_argument("--store", default=str(DEFAULT_STORE))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    specs = [DataSpec.parse(s) for s in a.data]
    if len(specs) > 1:  # the joint label space, as `metalora train` builds it (metalora.data.load_features)
        if any(s.task is None for s in specs):
            ap.error("several --data specs form a joint label space: prefix each with task= (e.g. cifar10=PATH)")
        if len({s.name for s in specs}) != len(specs):
            ap.error(f"task names must differ, got {[s.name for s in specs]}")
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, format="PNG")
    t_start = time.perf_counter()
    srv = ServerProcess(Path(a.store), Path(a.out).with_suffix(".server.log"), backend=a.backend, adapters=a.adapter).start()
    startup_s = time.perf_counter() - t_start
    try:
        with httpx.Client(base_url=srv.url, timeout=600) as c:
            t0 = time.perf_counter()
            chelsea = c.post("/v1/predict", files=[("images", ("chelsea.png", buf.getvalue()))], data={"adapter": a.adapter, "top_k": "3"}).json()
            res = {"adapter": a.adapter, "data": a.data if len(a.data) > 1 else a.data[0], "backend": c.get("/readyz").json().get("backend"),
                   "chelsea": chelsea["results"][0]}
            res["startup_s"] = startup_s  # to /readyz: includes opening the gallery (decode, import into the gallery store, index build)
            knn_s = []
            for _ in range(5):  # one image, the gallery open: the median of 5
                t1 = time.perf_counter()
                c.post("/v1/knn", files=[("images", ("chelsea.png", buf.getvalue()))], data={"adapter": a.adapter, "k": "10"}).raise_for_status()
                knn_s.append(time.perf_counter() - t1)
            res["knn_one_image_s"] = sorted(knn_s)[2]
            parts = {DataSpec.parse(spec).name: run(c, a.adapter, items_of(spec), a.batch) for spec in a.data}
            n = sum(r["n"] for r in parts.values())
            res.update({"n": n, **{k: sum(r[k] * r["n"] for r in parts.values()) / n for k in next(iter(parts.values())) if k != "n"}})
            if len(parts) > 1:
                res["per_task"] = parts
            res["ood"] = {spec: run(c, a.adapter, items_of(spec), a.batch) for spec in a.ood}
            res["seconds"] = time.perf_counter() - t0
    finally:
        srv.stop()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
