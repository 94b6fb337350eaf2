"""Shared fixtures: tiny backbones for fast CPU tests, and the path to ../shared when present."""

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
