"""`metalora-client`: call a running MetaLoRA service from the shell, and load-test it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .client import DEFAULT_URL, MetaLoRAClient, default_url
from .errors import MetaLoRAError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Client for a running MetaLoRA service.")

# File suffixes a directory scan picks up: every one Pillow registers (with pillow-heif) for the
# formats the service decodes (metalora.images.SUPPORTED_FORMATS; tests/test_client.py checks that
# the two agree). Defined here because the client imports nothing of the server's packages.
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif",  # JPEG
    ".mpo",  # MPO: JPEG with extra pictures (phone cameras)
    ".png", ".apng",  # PNG
    ".webp",  # WebP
    ".gif",  # GIF
    ".bmp",  # BMP
    ".tif", ".tiff",  # TIFF
    ".avif", ".avifs",  # AVIF
    ".heic", ".heics", ".heif", ".heifs", ".hif",  # HEIF
})
UNKNOWN_CAPTION = "unknown: the nearest gallery item is below the adapter's k-NN threshold (likely none of its classes)"
# "images[3]: bytes are not an image…": the service names the request's image that failed.
_IMAGE_INDEX = re.compile(r"^images\[(\d+)\]")

UrlOpt = Annotated[Optional[str], typer.Option("--url", help=f"service URL (default: $METALORA_URL, else {DEFAULT_URL})")]
AdapterOpt = Annotated[list[str], typer.Option("--adapter", "-a", help="adapter name[@version]; repeat to fan out over several")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the server's response body as is (one body per line if split)")]
BatchOpt = Annotated[int, typer.Option(min=1, help="images per request (larger inputs are split)")]
ImagesArg = Annotated[list[Path], typer.Argument(help="image files or directories of images", exists=True)]


def expand_images(paths: list[Path]) -> list[Path]:
    """Files as given; directories expanded to their image files (sorted, recursive)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    if not out:
        raise typer.BadParameter("no image files found")
    return out


def _client(url: str | None) -> MetaLoRAClient:
    return MetaLoRAClient(url or default_url())


def _fail(e: MetaLoRAError, files: list[Path] | None = None) -> None:
    """One `error:` line on stderr, exit 2; an image error names the file (the server names its index)."""
    from rich.console import Console
    from rich.markup import escape

    text = str(e)
    m = _IMAGE_INDEX.match(getattr(e, "message", ""))
    if files is not None and m and int(m.group(1)) < len(files):
        text = f"{files[int(m.group(1))]}: {text}"
    Console(stderr=True).print(f"[red]error:[/red] {escape(text)}", soft_wrap=True)  # one line, however long
    raise typer.Exit(2)


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _run(kind: str, url, adapters: list[str], images: list[Path], batch: int, as_json: bool, **extra):
    """Send images in chunks; yield (paths of the chunk, body) per request."""
    files = expand_images(images)
    adapter = adapters[0] if len(adapters) == 1 else adapters
    with _client(url) as c:
        chunk: list[Path] = []
        try:
            for chunk in _chunks(files, batch):
                build = {"predict": c._predict, "embed": c._embed, "knn": c._knn}[kind]
                if kind == "predict":
                    call = build([p for p in chunk], adapter, extra["top_k"])
                elif kind == "embed":
                    call = build([p for p in chunk], adapter)
                else:
                    call = build([p for p in chunk], None, adapter, extra["k"])
                body = c.request(call)
                if as_json:
                    typer.echo(json.dumps(body))
                yield chunk, body
        except MetaLoRAError as e:
            _fail(e, chunk)


def _ref(r: dict) -> str:
    """`name@version` of the adapter that answered (`base` has no version)."""
    return f"{r['adapter']}@{r['version']}" if r.get("version") else r["adapter"]


def _pairs(chunk: list[Path], results: list[dict]):
    """Results are image-major: image 0 with every adapter, then image 1, ..."""
    per = max(1, len(results) // max(1, len(chunk)))
    for j, r in enumerate(results):
        yield chunk[j // per], r


@app.command()
def predict(
    images: ImagesArg,
    url: UrlOpt = None,
    adapter: AdapterOpt = ["base"],
    top_k: Annotated[int, typer.Option(min=1, help="labels per image")] = 3,
    batch: BatchOpt = 32,
    as_json: JsonOpt = False,
):
    """Class scores for each image (and each adapter)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("image", "adapter", "predictions")
    for chunk, body in _run("predict", url, adapter, images, batch, as_json, top_k=top_k):
        for p, r in _pairs(chunk, body["results"]):
            preds = ", ".join(f"{x['label']} {x['score']:.3f}" for x in r["predictions"])
            if r.get("unknown"):
                preds = f"[bold]unknown[/bold] ({preds})"
                table.caption = UNKNOWN_CAPTION
            table.add_row(str(p), _ref(r), preds)
    if not as_json:
        Console().print(table)


@app.command()
def embed(images: ImagesArg, url: UrlOpt = None, adapter: AdapterOpt = ["base"], batch: BatchOpt = 32, as_json: JsonOpt = False):
    """L2-normalised embeddings (the table shows the first values)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("image", "adapter", "dim", "embedding")
    for chunk, body in _run("embed", url, adapter, images, batch, as_json):
        for p, r in _pairs(chunk, body["results"]):
            head = ", ".join(f"{v:+.3f}" for v in r["embedding"][:4])
            table.add_row(str(p), _ref(r), str(r["dim"]), f"[{head}, …]")
    if not as_json:
        Console().print(table)


@app.command()
def knn(
    images: ImagesArg,
    url: UrlOpt = None,
    adapter: AdapterOpt = [],
    k: Annotated[int, typer.Option(min=1, help="neighbours per image")] = 10,
    batch: BatchOpt = 32,
    as_json: JsonOpt = False,
):
    """Nearest gallery items of each image in an adapter's gallery, and their vote."""
    from rich.console import Console
    from rich.table import Table

    if not adapter:
        raise typer.BadParameter("k-NN needs --adapter (the base backbone has no gallery)")
    table = Table("image", "adapter", "vote", "nearest")
    for chunk, body in _run("knn", url, adapter, images, batch, as_json, k=k):
        for p, r in _pairs(chunk, body["results"]):
            near = ", ".join(f"{n['id']} ({n['label']}, {n['score']:.3f})" for n in r["neighbors"][:3])
            vote = f"[bold]unknown[/bold] ({r['label']})" if r.get("unknown") else str(r["label"])
            if r.get("unknown"):
                table.caption = UNKNOWN_CAPTION
            table.add_row(str(p), _ref(r), vote, near)
    if not as_json:
        Console().print(table)


@app.command()
def adapters(url: UrlOpt = None, as_json: JsonOpt = False):
    """Adapters in the server's store, their versions and which are loaded."""
    from rich.console import Console
    from rich.table import Table

    with _client(url) as c:
        try:
            body = c.request(c.__class__._list_call())
        except MetaLoRAError as e:
            _fail(e)
    if as_json:
        typer.echo(json.dumps(body))
        return
    bb = body.get("backbone", {})
    table = Table("adapter", "versions", "latest", "loaded", "pinned", title=f"backbone {bb.get('name', '?')} on {bb.get('device', '?')} · LRU capacity {body.get('capacity')}")
    for a in body["adapters"]:
        table.add_row(a["name"], ", ".join(a["versions"]), str(a.get("latest")), ", ".join(a.get("loaded", [])) or "-", ", ".join(a.get("pinned", [])) or "-")
    Console().print(table)


@app.command()
def health(url: UrlOpt = None):
    """Liveness and readiness of the server (exit 1 when not ready)."""
    with _client(url) as c:
        try:
            r = c.ready()
        except MetaLoRAError as e:
            _fail(e)
    typer.echo(json.dumps(r.model_dump()))
    raise typer.Exit(0 if r.ready else 1)


@app.command("load")
def load_test(
    images: Annotated[Optional[list[Path]], typer.Argument(help="images to send (default: synthetic JPEGs)")] = None,
    url: UrlOpt = None,
    adapter: Annotated[list[str], typer.Option("--adapter", "-a", help="NAME[:WEIGHT], repeat for a mix")] = ["base"],
    endpoint: Annotated[str, typer.Option(help="predict | embed | knn")] = "predict",
    concurrency: Annotated[Optional[int], typer.Option(min=1, help="closed loop: requests in flight")] = None,
    rate: Annotated[Optional[float], typer.Option(min=0.001, help="open loop: requests per second")] = None,
    poisson: Annotated[bool, typer.Option(help="open loop with exponential inter-arrival times")] = False,
    requests: Annotated[Optional[int], typer.Option(min=1, help="stop after this many requests")] = None,
    duration: Annotated[Optional[float], typer.Option(min=0.1, help="stop after this many seconds")] = None,
    images_per_request: Annotated[int, typer.Option(min=1)] = 1,
    warmup: Annotated[int, typer.Option(min=0, help="requests sent before the clock starts")] = 4,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the report here")] = None,
):
    """Load-test a server: closed loop (--concurrency) or open loop (--rate); prints a JSON report."""
    from .loadgen import LoadSpec, parse_mix, run_load_sync

    if concurrency is None and rate is None:
        concurrency = 8
    if requests is None and duration is None:
        duration = 10.0
    data = [p.read_bytes() for p in expand_images(images)] if images else synthetic_images(8)
    try:
        spec = LoadSpec(
            url=(url or default_url()).rstrip("/"),
            images=data,
            adapters=parse_mix(adapter),
            endpoint=endpoint,
            concurrency=concurrency,
            rate=rate,
            poisson=poisson,
            requests=requests,
            duration_s=duration,
            images_per_request=images_per_request,
            warmup_requests=warmup,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    report = run_load_sync(spec)
    text = json.dumps(report, indent=2)
    if json_out:
        json_out.write_text(text + "\n")
    typer.echo(text)
    if report["ok"] == 0:
        print("no request succeeded", file=sys.stderr)
        raise typer.Exit(1)


def synthetic_images(n: int, size: int = 256) -> list[bytes]:
    """Smooth random colour fields as JPEG: real-sized inputs with nothing read from disk."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover - `python -m clients.cli`
    main()
