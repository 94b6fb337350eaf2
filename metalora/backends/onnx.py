"""ONNX Runtime backend: the frozen backbone, and each adapter with it, as static graphs.

`export_onnx(part="full")` (what `metalora export-onnx` writes) maps `image (N, 3, S, S)` to
`embedding (N, D)` and `logits (N, C)`, plus `seed (N, S_c)` for adapters with a mapping network:
the seed `c(x)` is computed inside the graph from the pooled prefix features, exactly as the
torch path does. The batch axis is dynamic, the image size fixed to the backbone's input size.

Serving splits that graph in two, as the torch path does: one shared `prefix` graph
(image -> frozen prefix features) runs once per batch, then one `tail` graph per adapter
(features -> embedding, logits, seed) runs per adapter segment, since ONNX cannot pick a branch
per sample inside one graph. `OrtRunner.run(x, keys)` has the call shape and result type of
`Runtime.run`, so the service engine can use either.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import Adapter, Output
from .backbones.base import Backbone

log = logging.getLogger("metalora.onnx")

BASE = "base"
OPSET = 17
PARTS = ("full", "prefix", "tail")  # plus "bridge:START:STOP" (`export_bridge`)
OUTPUTS = ("embedding", "logits", "seed")

# Which backend `auto` picks per device kind, from the side-by-side measurement in
# docs/deploy.md ("ONNX Runtime vs torch"). CUDA stays on torch until it is measured there.
AUTO_BACKEND = {"cpu": "onnx", "cuda": "torch"}


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """`auto|torch|onnx` -> `torch|onnx` for a device; `auto` falls back to torch without onnxruntime."""
    if backend in ("torch", "onnx"):
        return backend
    if backend != "auto":
        raise ValueError(f"backend must be auto, torch or onnx, got {backend!r}")
    kind = torch.device(device).type
    choice = AUTO_BACKEND.get(kind, "torch")
    if choice == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "torch"
    return choice


class _FusedLayer(nn.Module):
    """A target layer with one adapter's branch folded in: `base(x) + branch(x, seed)`."""

    def __init__(self, name: str, base: nn.Module, branch: nn.Module, seeds: dict):
        super().__init__()
        self.name, self.base, self.branch = name, base, branch
        self._seeds = seeds  # filled by the graph's forward before the tail runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.branch(x, self._seeds.get(self.name))


class ExportGraph(nn.Module):
    """What gets exported, for the bare backbone or one adapter:
    `full`: image -> (embedding, logits[, seed]); `prefix`: image -> features;
    `tail`: features -> (embedding, logits[, seed])."""

    def __init__(self, backbone: Backbone, adapter: Adapter | None = None, part: str = "full"):
        super().__init__()
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.part = part
        backbone = own_cut(backbone, adapter)  # a tail graph starts at its adapter's cut
        # A private copy: the live backbone is shared with the torch path (and may be wrapped by
        # MetaLoRAModel); its wrapped layers behave as the frozen layer when no segment is set.
        self.backbone = copy.deepcopy(backbone).eval()
        self.adapter = adapter
        self._seeds: dict[str, torch.Tensor] = {}
        if adapter is not None:
            tail = self.backbone.tail_module()
            for name in adapter.targets:
                parent_name, _, attr = name.rpartition(".")
                parent = tail.get_submodule(parent_name) if parent_name else tail
                setattr(parent, attr, _FusedLayer(name, getattr(parent, attr), adapter.branch(name), self._seeds))

    @property
    def has_seed(self) -> bool:
        return self.adapter is not None and self.adapter.mapping is not None

    def forward(self, x: torch.Tensor):
        bb = self.backbone
        if self.part == "prefix":
            return bb.prefix(x)  # (N, C_p, H_p, W_p)
        h = x if self.part == "tail" else bb.prefix(x)  # (N, C_p, H_p, W_p)
        self._seeds.clear()
        seeds = self.adapter.seeds(bb.pool_prefix(h)) if self.adapter is not None else {}  # {layer: (N, s_l)}
        self._seeds.update(seeds)
        emb = bb.tail(h)  # (N, D)
        logits = (self.adapter.head if self.adapter is not None else bb.head)(emb)  # (N, C)
        if self.has_seed:
            return emb, logits, torch.cat(list(seeds.values()), dim=1)  # (N, S_c)
        return emb, logits


def own_cut(backbone: Backbone, adapter: Adapter | None) -> Backbone:
    """The backbone cut where `adapter` reads its seed: `backbone`, or its `at_cut` view for an
    adapter cut later than the serving prefix (its graphs are the ones a store cut there builds)."""
    split = getattr(adapter, "split", None)
    return backbone if adapter is None or split is None or split == backbone.split else backbone.at_cut(split)


class _Bridge(nn.Module):
    """The frozen blocks[start:stop] as a graph: features at one cut -> features at a later one."""

    def __init__(self, backbone: Backbone, start: int, stop: int):
        super().__init__()
        self.backbone, self.start, self.stop = copy.deepcopy(backbone).eval(), start, stop

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.backbone.bridge(h, self.start, self.stop)


def graph_digest(backbone: Backbone, adapter: Adapter | None, input_size: int, part: str = "full") -> str:
    """Content hash naming a cached graph: backbone weights, adapter tensors and config, input size, part."""
    backbone = own_cut(backbone, adapter)
    h = hashlib.sha256(f"{backbone.identity.name}|{backbone.identity.weights_sha256}|{input_size}|{OPSET}|{torch.__version__}|{part}".encode())
    if backbone.identity.cut is not None:  # a non-default prefix/tail cut is another graph
        h.update(f"|cut={backbone.identity.cut}".encode())
    if backbone.identity.weights_sha256 is None:  # random-init backbones (tests): hash the weights
        for k, v in backbone.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    if adapter is not None:
        h.update(repr(adapter.config.to_dict()).encode())
        for k, v in adapter.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def export_onnx(backbone: Backbone, adapter: Adapter | None, path: str | Path, input_size: int | None = None, part: str = "full") -> Path:
    """Export the bare backbone (adapter=None) or backbone + adapter to `path` (fp32, dynamic batch).

    `part` = full (image in), prefix (image -> features) or tail (features in); see ExportGraph.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = input_size or backbone.preprocess.input_size
    graph = ExportGraph(backbone, None if part == "prefix" else adapter, part).float().cpu()
    names = ["features"] if part == "prefix" else list(OUTPUTS if graph.has_seed else OUTPUTS[:2])
    x = torch.zeros(2, 3, size, size)  # (2, 3, S, S)
    if part == "tail":
        with torch.no_grad():
            x = graph.backbone.prefix(x).contiguous()  # (2, C_p, H_p, W_p)
    inp = "features" if part == "tail" else "image"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its successor
        # The TorchScript-based exporter: the model is plain tensor code, so a trace is exact
        # and needs no onnxscript; the batch axis stays symbolic.
        torch.onnx.export(
            graph,
            (x,),
            str(tmp),
            input_names=[inp],
            output_names=names,
            dynamic_axes={n: {0: "batch"} for n in [inp, *names]},
            opset_version=OPSET,
            dynamo=False,
        )
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return path


def export_bridge(backbone: Backbone, start: int, stop: int, path: str | Path, input_size: int | None = None) -> Path:
    """Export the frozen blocks[start:stop] (`features` at cut start (N, C, H, W) -> `features`
    at cut stop), FP32, dynamic batch: how a runtime whose prefix ends at `start` brings the rows of
    adapters cut at `stop` to their own cut, once for all of them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = input_size or backbone.preprocess.input_size
    graph = _Bridge(backbone.at_cut(start), start, stop).float().cpu()
    with torch.no_grad():
        x = graph.backbone.prefix(torch.zeros(2, 3, size, size)).contiguous()  # (2, C, H, W) at cut start
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(graph, (x,), str(tmp), input_names=["features"], output_names=["features_out"],
                          dynamic_axes={"features": {0: "batch"}, "features_out": {0: "batch"}}, opset_version=OPSET, dynamo=False)
    os.replace(tmp, path)
    return path


def default_cache_dir() -> Path:
    env = os.environ.get("METALORA_ONNX_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metalora" / "onnx"


def providers_for(device: str | torch.device) -> list[str]:
    """CUDA execution provider when the device is CUDA and this onnxruntime build has it; CPU otherwise."""
    import onnxruntime as ort

    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner:
    """Runs a `Runtime`'s loaded keys with onnxruntime: the shared prefix graph once per batch,
    then one tail graph (and session) per key for its segment.

    Graphs are exported on first use (or `prepare(key)`) and cached on disk by content hash, so
    a restart reuses them. An adapter reloaded under the same key is re-exported.
    """

    def __init__(self, runtime, cache_dir: str | Path | None = None, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.ort = ort
        self.runtime = runtime
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.providers = providers or providers_for(runtime.device)
        self.input_size = int(runtime.preprocess_cfg.input_size)
        self.options = ort.SessionOptions()
        if threads:
            self.options.intra_op_num_threads = threads
        self.options.log_severity_level = 3  # warnings from graph fusions are noise here
        # Idle ORT threads otherwise spin for a while after each run, taking the cores that the
        # decode threads (and, in a side-by-side measurement, torch) need next.
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._sessions: dict[str, tuple[object, object]] = {}  # key -> (adapter object, tail session)
        self._prefix = None  # the shared prefix session, opened on first use
        self._bridges: dict[tuple[int, int], object] = {}  # (start, stop) -> frozen blocks[start:stop] session
        self._lock = threading.Lock()
        self._scratch: Path | None = None  # where new graphs go when cache_dir cannot be written
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.cache_dir):
                pass
        except OSError as e:
            self._scratch = Path(tempfile.mkdtemp(prefix="metalora-onnx-"))
            atexit.register(shutil.rmtree, self._scratch, ignore_errors=True)
            log.warning("ONNX cache %s cannot be written (%s): graphs it already holds are used, new ones are built in %s for this process only "
                        "(point METALORA_ONNX_CACHE at a writable volume to keep them)", self.cache_dir, e.strerror or e, self._scratch)

    def close(self) -> None:
        """Remove this process's scratch directory, if any (the server's shutdown calls it; atexit
        does too, but a process that dies of the signal it caught never runs atexit)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def cached(self, name: str) -> Path:
        """Where the cached file `name` is read from or written to: `cache_dir`, or this process's
        scratch directory for a file `cache_dir` lacks and cannot take (a read-only volume)."""
        path = self.cache_dir / name
        return path if self._scratch is None or path.exists() else self._scratch / name

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def _adapter(self, key: str) -> Adapter | None:
        if key == BASE:
            return None
        try:
            return self.runtime.model.adapters[key]
        except KeyError:
            raise KeyError(f"adapter {key!r} is not loaded; loaded: {sorted(self.runtime.model.adapters)}") from None

    def graph_path(self, key: str) -> Path:
        """The cached tail graph of a loaded key."""
        adapter = self._adapter(key)
        digest = graph_digest(self.runtime.backbone, adapter, self.input_size, "tail")
        return self.cached(f"{key.replace('@', '-')}-tail-{digest}.onnx")

    def prefix_path(self) -> Path:
        digest = graph_digest(self.runtime.backbone, None, self.input_size, "prefix")
        return self.cached(f"{self.runtime.backbone.identity.name}-prefix-{digest}.onnx")

    def _open(self, path: Path, adapter: Adapter | None, part: str):
        if not path.exists():
            export_onnx(self.runtime.backbone, adapter, path, self.input_size, part=part)
        return self.ort.InferenceSession(str(path), self.options, providers=self.providers)

    def prefix(self):
        """The shared prefix session (image -> frozen features)."""
        with self._lock:
            if self._prefix is None:
                self._prefix = self._open(self.prefix_path(), None, "prefix")
            return self._prefix

    def prepare(self, key: str):
        """The tail session for a loaded key, exporting its graph when not cached."""
        self.prefix()
        adapter = self._adapter(key)
        with self._lock:
            hit = self._sessions.get(key)
            if hit is not None and hit[0] is adapter:
                return hit[1]
            sess = self._open(self.graph_path(key), adapter, "tail")
            self._sessions[key] = (adapter, sess)
            # Drop sessions of keys the runtime has unloaded since.
            for k in [k for k in self._sessions if k != BASE and k not in self.runtime.model.adapters]:
                del self._sessions[k]
            return sess

    def bridge_path(self, start: int, stop: int) -> Path:
        digest = graph_digest(self.runtime.backbone.at_cut(start), None, self.input_size, f"bridge:{start}:{stop}")
        return self.cached(f"{self.runtime.backbone.identity.name}-bridge-{start}-{stop}-{digest}.onnx")

    def bridge(self, start: int, stop: int):
        """The session of the frozen blocks[start:stop] (exported on first use, cached on disk)."""
        with self._lock:
            if (start, stop) not in self._bridges:
                path = self.bridge_path(start, stop)
                if not path.exists():
                    export_bridge(self.runtime.backbone, start, stop, path, self.input_size)
                self._bridges[(start, stop)] = self.ort.InferenceSession(str(path), self.options, providers=self.providers)
            return self._bridges[(start, stop)]

    def split_of(self, key: str) -> int | None:
        """The cut whose features the key's tail graph reads (the serving prefix's for base)."""
        adapter = self._adapter(key)
        own = getattr(adapter, "split", None)
        return self.runtime.backbone.split if adapter is None or own is None else own

    def forget(self, key: str) -> None:
        with self._lock:
            self._sessions.pop(key, None)

    def run(self, x: torch.Tensor, keys: list[str]) -> Output:
        """A mixed batch, one loaded key per sample: same result type and order as `Runtime.run`."""
        n = x.shape[0]
        if len(keys) != n:
            raise ValueError(f"{n} samples but {len(keys)} keys")
        xn = x.detach().float().cpu().contiguous().numpy()  # (N, 3, S, S)
        sessions = {k: self.prepare(k) for k in dict.fromkeys(keys)}  # fails before any compute on an unknown key
        t0 = time.perf_counter()
        feats = self.prefix().run(None, {"image": xn})[0]  # (N, C_p, H_p, W_p): once for the whole batch
        t1 = time.perf_counter()
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        at = self._features_at_cuts(feats, keys)  # split -> (rows, features of those rows)
        emb = np.empty((n, 0), np.float32)
        logits: list[torch.Tensor | None] = [None] * n
        seeds: list[torch.Tensor | None] = [None] * n
        for key, idx in groups.items():
            rows, fs = at[self.split_of(key)]
            if len(idx) == len(rows):
                hs = fs  # (n_k, C, H, W)
            else:
                pos = {r: j for j, r in enumerate(rows)}
                hs = fs[[pos[i] for i in idx]]
            out = sessions[key].run(None, {"features": hs})
            if emb.shape[1] == 0:
                emb = np.empty((n, out[0].shape[1]), np.float32)
            emb[idx] = out[0]
            lo = torch.from_numpy(out[1])  # (n_k, C)
            sd = torch.from_numpy(out[2]) if len(out) > 2 else None  # (n_k, S_c)
            for j, i in enumerate(idx):
                logits[i] = lo[j]
                seeds[i] = sd[j] if sd is not None else None
        stages = {"prefix": t1 - t0, "adapters": time.perf_counter() - t1}
        return Output(embeddings=torch.from_numpy(emb), logits=logits, seeds=seeds, stages=stages)


    def _features_at_cuts(self, feats: np.ndarray, keys: list[str]) -> dict:
        """{split: (rows, features at that cut of those rows)} for every cut the keys' tails read.
        The serving prefix's features cover every row; rows whose adapters are cut later go through
        the frozen bridge blocks together, cut by cut, each row only as far as its own cut."""
        base = self.runtime.backbone.split
        need = [self.split_of(k) for k in keys]
        at = {base: (list(range(len(keys))), feats)}
        cur, rows, fs = base, at[base][0], feats
        for stop in sorted({s for s in need if s is not None and base is not None and s > base}):
            keep = [j for j, r in enumerate(rows) if need[r] >= stop]
            rows, fs = [rows[j] for j in keep], fs if len(keep) == len(rows) else fs[keep]
            fs = self.bridge(cur, stop).run(None, {"features": np.ascontiguousarray(fs)})[0]  # (n_stop, C, H, W)
            at[stop], cur = (rows, fs), stop
        return at


def add_synthetic_adapters(runtime, n: int, fmt: str = "tr", seed: int = 0) -> list[str]:
    """Register `n` randomized adapters (all targets, 10 classes) in memory, for measurements
    where the store has no trained bundles; their B factors and mapping nets are moved off zero
    so they do real low-rank work."""
    from .adapters import AdapterConfig

    ranks = {"lora": (8,), "cp": (8,), "tr": (2, 4, 2)}[fmt]
    gen = torch.Generator().manual_seed(seed)
    keys = []
    for i in range(n):
        ad = Adapter(runtime.backbone, AdapterConfig(fmt, ranks, ["*"], [f"c{j}" for j in range(10)])).perturb_(0.05, gen)
        ad = ad.to(runtime.device).eval()
        key = f"synthetic-{fmt}-{i}@0"
        runtime.model.add_adapter(key, ad)
        keys.append(key)
    return keys


def compare_throughput(runtime, keys: list[str], batch: int = 16, rounds: int = 7, threads: int | None = None, progress: bool = True) -> dict:
    """Images/s of torch (`Runtime.run`) and ORT (`OrtRunner.run`) on the same batch, runs alternated.

    Each round times one torch run and one ORT run back to back (order swapped every round), so
    both see the same machine load; the medians and their ratio are reported.
    """
    before = torch.get_num_threads()
    threads = threads or before
    torch.set_num_threads(threads)
    try:
        return _compare(runtime, keys, batch, rounds, threads, progress)
    finally:
        torch.set_num_threads(before)


def _compare(runtime, keys, batch, rounds, threads, progress) -> dict:
    import statistics
    import time

    from tqdm import tqdm

    runner = OrtRunner(runtime, threads=threads)
    ks = [keys[i % len(keys)] for i in range(batch)]
    x = torch.rand(batch, 3, runner.input_size, runner.input_size) * 2 - 1  # (B, 3, S, S)
    for k in set(ks):
        runner.prepare(k)
    runtime.run(x, ks), runner.run(x, ks)  # warm-up: allocator, thread pools, ORT arenas
    times = {"torch": [], "onnx": []}
    fns = {"torch": lambda: runtime.run(x, ks), "onnx": lambda: runner.run(x, ks)}
    for r in tqdm(range(rounds), desc="torch vs onnx", disable=not progress):
        for name in (("torch", "onnx") if r % 2 == 0 else ("onnx", "torch")):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "device": str(runtime.device),
        "providers": runner.providers,
        "threads": threads,
        "batch": batch,
        "rounds": rounds,
        "keys": sorted(set(ks)),
        "torch_img_s": batch / med["torch"],
        "onnx_img_s": batch / med["onnx"],
        "onnx_over_torch": med["torch"] / med["onnx"],
    }


def create_backend(runtime, settings=None) -> OrtRunner:
    """The service engine's hook (`service.engine.make_backend`): an OrtRunner over the runtime.

    Graphs are cached in `METALORA_ONNX_CACHE` (default ~/.cache/metalora/onnx); ORT uses as
    many intra-op threads as torch does, the setting the throughput comparison was made with.
    """
    return OrtRunner(runtime, threads=torch.get_num_threads())


def export_from_store(store, ref: str, out: str | Path | None = None, check: bool = True) -> dict:
    """`metalora export-onnx`: export `base` or an adapter from the store; report the torch parity."""
    from .runtime import Runtime

    rt = Runtime(store, device="cpu")
    key = rt.load(ref)
    adapter = None if key == BASE else rt.model.adapters[key]
    path = Path(out) if out else Path(f"{key.replace('@', '-')}.onnx")
    export_onnx(rt.backbone, adapter, path, rt.preprocess_cfg.input_size)
    res = {"adapter": key, "path": str(path), "bytes": path.stat().st_size, "outputs": list(OUTPUTS if adapter is not None and adapter.mapping is not None else OUTPUTS[:2])}
    if check:
        import onnxruntime as ort

        size = rt.preprocess_cfg.input_size
        x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (4, 3, S, S)
        ref_out = rt.run(x, [key] * 4)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
        res["max_abs_diff"] = {
            "embedding": float(np.abs(got[0] - ref_out.embeddings.float().numpy()).max()),
            "logits": float(np.abs(got[1] - torch.stack(ref_out.logits).float().numpy()).max()),
        }
        if len(got) > 2:
            res["max_abs_diff"]["seed"] = float(np.abs(got[2] - torch.stack(ref_out.seeds).float().numpy()).max())
    return res
