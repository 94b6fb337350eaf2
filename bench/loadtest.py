"""Throughput of a running `metalora serve` with 1 adapter and with 4 adapters mixed (closed loop).

Starts the server in a subprocess on a free port, drives it with `clients.loadgen` at a fixed
concurrency, and prints one JSON report per mix. With `--demo-store` (or when the store has
fewer than 4 adapters) it first builds a throw-away store of randomized adapters of the shipped
shapes, so the figures do not wait on training; the compute per image is the same.

    .venv/bin/python -m bench.loadtest --concurrency 32 --duration 30
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import httpx
import typer

from metalora.store import DEFAULT_STORE, ModelStore
from service.launch import ServerProcess

app = typer.Typer(add_completion=False)
DEMO = {"demo-lora": ("lora", (8,)), "demo-cp": ("cp", (8,)), "demo-tr": ("tr", (4, 4, 4)), "demo-cp2": ("cp", (16,))}


def demo_store(root: Path) -> Path:
    """The shipped backbone manifest + four randomized adapters (10 classes each) in `root`."""
    import torch

    from metalora.adapters import Adapter, AdapterConfig
    from metalora.backbones import create_backbone
    from metalora.bundle import save_bundle

    shutil.copytree(DEFAULT_STORE / "backbones", root / "backbones", dirs_exist_ok=True)
    bb = create_backbone("efficientnet_lite0", split=6)
    torch.manual_seed(0)
    for name, (fmt, ranks) in DEMO.items():
        ad = Adapter(bb, AdapterConfig(fmt, ranks, ["*"], labels=[f"c{i}" for i in range(10)])).perturb_(0.02)
        save_bundle(root / "adapters" / name / "1", ad, bb, name=name, version="1")
    return root


def photos() -> list[bytes]:
    """Eight scikit-image photos as JPEG files, 256 px on the long side (what a client of a 224 model sends)."""
    import skimage.data as sd
    from PIL import Image

    out = []
    for f in (sd.chelsea, sd.astronaut, sd.coffee, sd.rocket, sd.cat, sd.hubble_deep_field, sd.immunohistochemistry, sd.logo):
        buf = io.BytesIO()
        img = Image.fromarray(f()).convert("RGB")
        img.thumbnail((256, 256))
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def batch_stats(url: str) -> dict:
    """Mean batch size and mean distinct adapters per batch, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in fam.samples]
    vals = {s.name: s.value for s in samples if not s.labels}
    stages = {f"{s.name}:{s.labels['stage']}": s.value for s in samples if s.name.startswith("metalora_inference_seconds_") and "le" not in s.labels}
    req = [s for s in samples if s.name.startswith("metalora_request_duration_seconds_") and s.labels.get("endpoint") == "/v1/predict" and "le" not in s.labels]
    vals["request_s_sum"] = sum(s.value for s in req if s.name.endswith("_sum"))
    vals["request_s_count"] = sum(s.value for s in req if s.name.endswith("_count"))
    return {"request_s_sum": vals["request_s_sum"], "request_s_count": vals["request_s_count"], "batches": int(vals.get("metalora_batch_size_count", 0)), "images": vals.get("metalora_batch_size_sum", 0), "adapter_slots": vals.get("metalora_batch_adapters_sum", 0),
            "queue_wait_s": vals.get("metalora_queue_wait_seconds_sum", 0), **stages}


@app.command()
def main(
    store: Path = typer.Option(DEFAULT_STORE, help="model store; needs 4 adapters unless --demo-store"),
    demo: bool = typer.Option(False, "--demo-store", help="use randomized adapters in a temp store"),
    adapters: str = typer.Option("", help="comma-separated mix for the 4-adapter runs (first one alone for the 1-adapter runs); may include base"),
    concurrency: int = typer.Option(32, help="requests in flight"),
    duration: float = typer.Option(30.0, help="seconds per mix and round"),
    rounds: int = typer.Option(2, min=1, help="alternate the mixes this many times (1, 4, 1, 4, ...): the machine's load drifts, side by side it cancels"),
    max_batch_size: int = typer.Option(32),
    max_delay_ms: float = typer.Option(10.0),
    device: str = typer.Option("auto"),
    backend: str = typer.Option("auto", help="auto|torch|onnx (the server's METALORA_BACKEND)"),
    out: Path = typer.Option(None, help="also write the reports here (JSON)"),
):
    """Measure images/s with 1 adapter and with 4 mixed, against a real server."""
    from clients.loadgen import LoadSpec, run_load_sync

    tmp = Path(tempfile.mkdtemp(prefix="metalora-load-"))
    try:
        names = [a.strip() for a in adapters.split(",") if a.strip()] or ModelStore(store).adapter_names()
        if demo or len(names) < 4:
            typer.echo(f"store {store} has {len(names)} adapters; building a demo store with 4 randomized ones", err=True)
            store, names = demo_store(tmp / "store"), list(DEMO)
        four = names[:4]
        server = ServerProcess(
            store, tmp / "server.log", device=device, backend=backend, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
            adapters=",".join(a for a in four if a != "base"), gallery_dir=tmp / "g",
        ).start()
        url = server.url
        reports = []
        try:
            imgs = photos()
            for mix in [m for _ in range(rounds) for m in ([four[0]], four)]:
                before = batch_stats(url)
                spec = LoadSpec(url=url, images=imgs, adapters={a: 1.0 for a in mix}, concurrency=concurrency, duration_s=duration, warmup_requests=concurrency)
                rep = run_load_sync(spec)
                after = batch_stats(url)
                d = {k: after[k] - before.get(k, 0) for k in after}
                nb = max(d["batches"], 1)
                rep["server"] = {
                    "batches": d["batches"],
                    "mean_batch_size": d["images"] / nb,
                    "mean_adapters_per_batch": d["adapter_slots"] / nb,
                    "mean_queue_wait_s": d["queue_wait_s"] / max(d["images"], 1),
                    "mean_request_s": d["request_s_sum"] / max(d["request_s_count"], 1),
                    "mean_forward_s_per_batch": d.get("metalora_inference_seconds_sum:forward", 0) / nb,
                    "mean_decode_s_per_request": d.get("metalora_inference_seconds_sum:decode", 0) / max(d.get("metalora_inference_seconds_count:decode", 0), 1),
                    "device": httpx.get(url + "/readyz").json()["device"],
                    "backend": httpx.get(url + "/readyz").json()["backend"],
                    "max_batch_size": max_batch_size,
                    "max_delay_ms": max_delay_ms,
                }
                reports.append(rep)
                typer.echo(
                    f"[{rep['server']['backend']}] {len(mix)} adapter(s): {rep['images_per_s']:.1f} images/s, p50 {rep['latency_s']['p50']:.3f} s, p99 {rep['latency_s']['p99']:.3f} s, "
                    f"errors {rep['errors']}, mean batch {rep['server']['mean_batch_size']:.1f} images / {rep['server']['mean_adapters_per_batch']:.2f} adapters, "
                    f"forward {rep['server']['mean_forward_s_per_batch']:.3f} s/batch, decode {rep['server']['mean_decode_s_per_request']:.3f} s/request, queue wait {rep['server']['mean_queue_wait_s']:.3f} s, in server {rep['server']['mean_request_s']:.3f} s",
                    err=True,
                )
        finally:
            server.stop()
        summary = {}
        for n in (1, 4):
            ips = sorted(r["images_per_s"] for r in reports if len(r["adapters"]) == n)
            summary[f"{n}_adapter{'s' if n > 1 else ''}_images_per_s"] = {"median": ips[len(ips) // 2] if len(ips) % 2 else sum(ips[len(ips) // 2 - 1 : len(ips) // 2 + 1]) / 2, "rounds": ips}
        result = {"summary": {"concurrency": concurrency, "backend": reports[0]["server"]["backend"], "device": reports[0]["server"]["device"], "cpu_count": os.cpu_count(), "load_average_after": os.getloadavg(), **summary}, "runs": reports}
        typer.echo(json.dumps(result["summary"], indent=2))
        if out:
            out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    app()
