"""`metalora bench`: the benchmark suite's command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from metalora.cli import resolve_device

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MetaLoRA Serve benchmarks.")


@app.command("bench")
def bench_cmd(
    json_path: Annotated[Path, typer.Option("--json", help="write the results here (JSON)")],
    quick: Annotated[bool, typer.Option("--quick", help="small sizes: under 5 minutes on 2 CPU cores")] = False,
    sections: Annotated[str, typer.Option(help="which of a b c d e f g h i to run (a overhead, b mixed batches, c HTTP, d k-NN, e many adapters, f ONNX Runtime vs torch, g gallery writes, h low precision: fp32/int8/bf16, lowp_speedup, limit_fraction; CPU only; i phone photos vs small images over HTTP)")] = "abcdefghi",
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "cpu",
    rounds: Annotated[Optional[int], typer.Option(min=2, help="rounds per paired comparison (longer, steadier runs)")] = None,
    knn_sizes: Annotated[Optional[str], typer.Option(help="gallery sizes, comma-separated (full run: 10000,100000,1000000)")] = None,
    many_counts: Annotated[Optional[str], typer.Option(help="registered adapter counts, comma-separated (full run: 10,100,1000)")] = None,
    gallery_sizes: Annotated[Optional[str], typer.Option(help="gallery sizes for the write benchmark, comma-separated (full run: 10000,100000,1000000)")] = None,
    gallery_postgres: Annotated[bool, typer.Option("--gallery-postgres/--no-gallery-postgres", help="also measure the PostgreSQL store (a private server from Debian's postgresql)")] = True,
    plots: Annotated[Optional[Path], typer.Option(help="PNG directory (default: the repository's docs/benchmarks/)")] = None,
    doc: Annotated[Optional[Path], typer.Option(help="markdown report (default: the repository's docs/benchmarks.md)")] = None,
    write_doc: Annotated[bool, typer.Option("--doc-write/--no-doc", help="write the markdown report and plots")] = True,
):
    """Benchmarks measured side by side (ratios): adapter overhead, mixed batches vs peft, HTTP, k-NN, many adapters, gallery writes."""
    from .run import ROOT, BenchConfig, run_bench

    plots = plots or ROOT / "docs" / "benchmarks"
    doc = doc or ROOT / "docs" / "benchmarks.md"
    kw: dict = {"device": resolve_device(device), "sections": sections}
    if rounds:
        kw.update(overhead_repeats=rounds, hetero_repeats=rounds, serving_rounds=rounds, many_rounds=rounds, lowp_rounds=rounds)
    if knn_sizes:
        kw["knn_sizes"] = tuple(int(v) for v in knn_sizes.split(","))
    if many_counts:
        kw["many_counts"] = tuple(int(v) for v in many_counts.split(","))
    if gallery_sizes:
        kw["gallery_sizes"] = tuple(int(v) for v in gallery_sizes.split(","))
    kw["gallery_postgres"] = gallery_postgres
    cfg = BenchConfig.quick_config(**kw) if quick else BenchConfig(**kw)
    res = run_bench(cfg, json_path, plots if write_doc else None, doc if write_doc else None, log=lambda m: typer.echo(m, err=True))
    for k, t in res["targets"].items():
        verdict = "not measured" if t["pass"] is None else ("pass" if t["pass"] else "FAIL")
        typer.echo(f"{k:24s} {t['value']!s:>8} (target {t['target']}): {verdict}")
    typer.echo(f"results: {json_path}" + (f", report: {doc}" if write_doc else ""))
