"""ONNX Runtime backend: `OrtRunner` runs a `Runtime`'s loaded keys with onnxruntime sessions.

Serving splits the model as the torch path does: one shared `prefix` graph (image -> frozen
prefix features) runs once per batch, then one `tail` graph per adapter (features -> embedding,
logits, seed) runs per adapter segment, since ONNX cannot pick a branch per sample inside one
graph (the graphs: `export`). `OrtRunner.run(x, keys)` has the call shape and result type of
`Runtime.run`, so the service engine can use either.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..adapters import Adapter, Output
from .base import BASE, onnx_cache_dir
from .export import export_bridge, export_onnx, graph_digest

log = logging.getLogger("metalora.onnx")


def providers_for(device: str | torch.device) -> list[str]:
    """CUDA execution provider when the device is CUDA and this onnxruntime build has it; CPU otherwise."""
    import onnxruntime as ort

    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner:
    """Runs a `Runtime`'s loaded keys with onnxruntime: the shared prefix graph once per batch,
    then one tail graph (and session) per key for its segment.

    Graphs are exported on first use (or `prepare(key)`) and cached on disk by content hash in
    `cache_dir` (default `base.onnx_cache_dir()`), so a restart reuses them. An adapter reloaded
    under the same key is re-exported.
    """

    def __init__(self, runtime, cache_dir: str | Path | None = None, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.ort = ort
        self.runtime = runtime
        self.cache_dir = Path(cache_dir) if cache_dir else onnx_cache_dir()
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


def create_backend(runtime, cache_dir: str | Path | None = None) -> OrtRunner:
    """The service engine's ONNX backend off the CPU (`service.engine.make_backend`): an OrtRunner
    over the runtime, graphs cached in `cache_dir` (default `base.onnx_cache_dir()`); ORT uses as
    many intra-op threads as torch does, the setting the throughput comparison was made with.
    """
    return OrtRunner(runtime, cache_dir=cache_dir, threads=torch.get_num_threads())
