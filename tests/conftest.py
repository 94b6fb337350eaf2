"""Shared fixtures: tiny backbones for fast CPU tests, the path to ../shared when present, and the
real servers that several test modules share (one process each for the whole session).

Shared servers, for tests that only read them: no gallery edits, nothing left loaded or
unloaded, no setting whose exact value another sharer needs differently. A module whose tests
edit a gallery, need a tiny queue or a fresh server (tests/test_golden.py) starts its own.

* `shipped_server`: the shipped model_store/ on torch (tests/test_oip.py, test_cli_predict.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from metalora.backbones.base import Backbone, BackboneIdentity, Preprocess

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("METALORA_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"


def run_metalora(*args: str, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None) -> "subprocess.CompletedProcess[str]":
    """The real `metalora` command (the console script installed beside this Python), run from the
    repository root (the shipped manifests name their data relative to it); `env` adds variables
    to a copy of this environment without its METALORA_* ones."""
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "metalora"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from metalora_serve.cli import app; app()"]
    full = {k: v for k, v in os.environ.items() if not k.startswith("METALORA_")} | (env or {})
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full)


def needs_shared(*parts: str):
    """Skip unless ../shared/data/<parts> exists (CI has it; a user's clone may not)."""
    p = DATA.joinpath(*parts)
    return pytest.mark.skipif(not p.exists(), reason=f"needs {p} (../shared is absent on this machine)")


class TinyBackbone(Backbone):
    """A few-layer conv net with the Backbone interface; tail has 3x3/s2 and 1x1 convs and a Linear."""

    def __init__(self, width: int = 8, embed: int = 12, classes: int = 5, tag: str | None = None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.body = nn.ModuleDict(
            {
                "conv_a": nn.Conv2d(width, width, 3, stride=2, padding=1),
                "conv_b": nn.Conv2d(width, embed, 1),
                "proj": nn.Linear(embed, embed),
            }
        )
        self.fc = nn.Linear(embed, classes)
        self.embed_dim, self.seed_in_dim, self.num_classes = embed, width, classes
        self.preprocess = Preprocess(input_size=16)
        self.identity = BackboneIdentity("tiny", tag)
        self.freeze()

    def prefix(self, x):
        return self.stem(x)  # (B, W, H, W)

    def tail(self, h):
        b = self.body
        h = torch.relu(b["conv_b"](torch.relu(b["conv_a"](h))))  # (B, E, H/2, W/2)
        return b["proj"](h.mean(dim=(2, 3)))  # (B, E)

    def head(self, emb):
        return self.fc(emb)

    def tail_module(self):
        return self.body


@pytest.fixture
def tiny_backbone():
    torch.manual_seed(0)
    return TinyBackbone().double()


def randomize(adapter, std: float = 0.3):
    """Move an adapter off its zero-start so tests compare non-trivial updates."""
    return adapter.perturb_(std)


# ------------------------------------------------------------------------ servers shared by several modules
SHIPPED_TOKEN = "shipped-test-admin-token-0123456789"
# The union of what its modules need: test_oip's limits (it asserts them: 4 images, 1 Mpx, an 8 MB
# body, top_k up to 1000) and its 150 ms batching delay (a /v1 and a gRPC request meet in one batch);
# cifar10 (today cifar10@6, the calibrated version test_cli_predict names) and digits loaded, mnist left unloaded for
# test_oip's repository tests; gRPC on. Its galleries live in a temporary directory, never model_store/.
SHIPPED_SETTINGS = dict(
    device="cpu", backend="torch", admin_token=SHIPPED_TOKEN, adapters="cifar10,digits", lru_capacity=8, max_delay_ms=150,
    max_images=4, max_pixels=1_000_000, max_body_bytes=8_000_000, max_top_k=1000, version_policy="all",  # all: tests ask for older versions (cifar10@1)
)


@pytest.fixture(scope="session")
def shipped_server(tmp_path_factory):
    """`metalora serve` on the shipped model_store/, torch on CPU, for the whole session."""
    from service.launch import ServerProcess

    tmp = tmp_path_factory.mktemp("shipped")
    srv = ServerProcess(ROOT / "model_store", tmp / "server.log", gallery_dir=tmp / "galleries", **SHIPPED_SETTINGS).start()
    yield srv
    srv.stop()
