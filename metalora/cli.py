"""`metalora` command line: predict, ImageNet check, and (from their own modules) train/eval/serve/bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MetaLoRA Serve: one frozen backbone, many input-conditioned adapters.")


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files", exists=True, dir_okay=False)],
    adapter: Annotated[str, typer.Option(help="adapter name[@version] in the store, or 'base' for the ImageNet head")] = "base",
    store: Annotated[Optional[Path], typer.Option(help="model store (default: the repository's model_store/)")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="labels per image")] = 5,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Classify images in-process with the frozen backbone or an adapter from the store."""
    import torch

    from .runtime import Runtime

    rt = Runtime(store, device=_device(device))
    with torch.inference_mode():
        results = rt.predict([p.read_bytes() for p in images], adapter, top_k=top_k)
    if as_json:
        typer.echo(json.dumps([{"image": str(p), **r} for p, r in zip(images, results)], indent=2))
        return
    for p, r in zip(images, results):
        preds = ", ".join(f"{x['label']} {x['score']:.3f}" for x in r["predictions"])
        typer.echo(f"{p}: [{r['adapter']}@{r['version']}] {preds}")


@app.command("eval-imagenet")
def eval_imagenet(
    data: Annotated[Path, typer.Option(help="ImageFolder zip named by WordNet id")] = Path("../shared/data/imagenet-sample/val.zip"),
    classes: Annotated[Path, typer.Option(help="classes.tsv: index, wnid, name")] = Path("../shared/data/imagenet-sample/classes.tsv"),
    backbone: Annotated[str, typer.Option(help="registered backbone")] = "efficientnet_lite0",
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
):
    """Top-1/top-5 of the backbone's own ImageNet head on the sample set."""
    import torch

    from .backbones import create_backbone
    from .imagenet import evaluate_imagenet_sample

    bb = create_backbone(backbone).to(_device(device)).to(memory_format=torch.channels_last)
    res = evaluate_imagenet_sample(bb, data, classes)
    typer.echo(json.dumps({"backbone": backbone, **res}))


def main() -> None:  # pragma: no cover
    app()
