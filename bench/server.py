"""A real `metalora serve` in a subprocess on a free loopback port, and a throwaway model store
of randomized adapters for it (used by the HTTP benchmarks and the client tests)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_store(root: Path, adapters: dict[str, tuple[str, tuple[int, ...], int]], gallery: dict[str, int] | None = None, seed: int = 0, backbone=None, progress=None) -> Path:
    """Write `{name: (format, ranks, n_classes)}` as randomized bundles (version 1) next to the
    shipped backbone manifest; `gallery` gives some of them a k-NN gallery of that many items."""
    from metalora.backbones import create_backbone
    from metalora.bundle import Gallery, save_bundle

    from .kernels import randomized_adapter

    root = Path(root)
    if not (root / "backbones").exists():
        shutil.copytree(ROOT / "model_store" / "backbones", root / "backbones")
    bb = backbone or create_backbone("efficientnet_lite0")
    gallery = gallery or {}
    for i, (name, (fmt, ranks, n_classes)) in enumerate(adapters.items()):
        ad = randomized_adapter(bb, fmt, n_classes=n_classes, seed=seed + i, ranks=ranks)
        gal = None
        if gallery.get(name):
            g = torch.Generator().manual_seed(seed + 1000 + i)
            n = gallery[name]
            emb = torch.nn.functional.normalize(torch.randn(n, bb.embed_dim, generator=g), dim=1)
            gal = Gallery(emb, torch.arange(n) % n_classes, [f"item{j}" for j in range(n)])
        save_bundle(root / "adapters" / name / "1", ad, bb, name=name, version="1", gallery=gal)
        if progress is not None:
            progress.update(1)
    return root


class ServerProcess:
    """`metalora serve` configured through METALORA_* environment variables; a context manager."""

    def __init__(self, store: Path, log: Path | None = None, device: str = "cpu", **settings):
        self.store = Path(store)
        self.log_path = Path(log) if log else self.store.parent / f"server-{os.getpid()}-{id(self)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("METALORA_")}
        env.update({"METALORA_STORE": str(store), "METALORA_HOST": "127.0.0.1", "METALORA_DEVICE": device})
        env.update({f"METALORA_{k.upper()}": str(v) for k, v in settings.items()})
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.url = ""

    def start(self, timeout_s: float = 300) -> "ServerProcess":
        return self.launch().wait_ready(timeout_s)

    def launch(self) -> "ServerProcess":
        """Start the process without waiting (start several, then `wait_ready` on each)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cli = Path(sys.executable).parent / "metalora"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(cli), "serve", "--port", str(self.port)], env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = 300) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{self.log()[-3000:]}")

    def metric_sum(self, name: str) -> float:
        """Sum of every sample of one Prometheus metric (e.g. `metalora_batch_size_sum`)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()
            self.proc = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
