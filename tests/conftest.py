"""Shared fixtures: tiny backbones for fast CPU tests, the path to ../shared when present, and the
real servers that several test modules share (one process each, session-scoped: its modules run
one after the other and it stops after the last of them).

Shared servers, for tests that only read them: no gallery edits, nothing left loaded or
unloaded, no setting whose exact value another sharer needs differently. A module whose tests
edit a gallery, need a tiny queue or a fresh server (tests/test_golden.py) starts its own.

* `shipped_server`: the shipped model_store/ on torch (tests/test_oip.py, test_cli_predict.py,
  test_http.py, test_readme.py);
* `small_server` on `small_store`: alpha (a gallery of 4) and a corrupt bundle `broken`
  (tests/test_errors.py, test_thumbnails.py).
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


# ------------------------------------------------------------------------ pictures
@pytest.fixture(scope="session")
def cat() -> bytes:
    """skimage's chelsea (the README's cat photo, 451 x 300) as JPEG bytes."""
    import io

    import skimage.data
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(b, "JPEG")
    return b.getvalue()


def small_png(colour: str, fmt: str = "PNG") -> str:
    """A small picture (40 x 32, one colour) as base64."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------ servers shared by several modules
# Each one holds 1-2 GB for as long as it runs, and other modules start servers of their own: the
# modules that use one run one after the other (moved up to where the first of them runs; the
# order within a module and of every other module is kept), and the server stops right after its
# last test, not at the end of the session.
SHARED_SERVERS = ("shipped_server", "small_server")
_SHARED: dict = {}  # fixture name -> its ServerProcess, once started
_LAST_USER: dict = {}  # fixture name -> nodeid of the last test that uses it, in the order run


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = list(modules)
    for name in SHARED_SERVERS:
        users = [m for m in order if any(name in getattr(i, "fixturenames", ()) for i in modules[m])]
        if len(users) > 1:
            first = order.index(users[0])
            rest = [m for m in order if m not in users]
            order = rest[:first] + users + rest[first:]
    items[:] = [i for m in order for i in modules[m]]


def pytest_collection_finish(session):
    for item in session.items:
        for name in SHARED_SERVERS:
            if name in getattr(item, "fixturenames", ()):
                _LAST_USER[name] = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    for name, srv in _SHARED.items():
        if _LAST_USER.get(name) == item.nodeid:
            srv.stop()  # the session's finalizer then finds it stopped (stop is idempotent)


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
    srv = _SHARED["shipped_server"] = ServerProcess(ROOT / "model_store", tmp / "server.log", gallery_dir=tmp / "galleries", **SHIPPED_SETTINGS).start()
    yield srv
    srv.stop()


SMALL_TOKEN = "small-store-test-admin-token-0123456789"
SMALL_LABELS = ["cat", "dog", "fox"]


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> Path:
    """A throw-away store: the shipped backbone manifest, `alpha` (a gallery of 4) and `broken`
    (one flipped weight byte)."""
    import shutil

    from metalora.adapters import Adapter, AdapterConfig
    from metalora.backbones import create_backbone
    from metalora.bundle import Gallery, save_bundle

    root = tmp_path_factory.mktemp("store")
    shutil.copytree(ROOT / "model_store" / "backbones", root / "backbones")
    bb = create_backbone("efficientnet_lite0", split=6)
    torch.manual_seed(0)
    for name in ("alpha", "broken"):
        ad = randomize(Adapter(bb, AdapterConfig("lora", (2,), ["conv_head"], labels=SMALL_LABELS)), std=0.05)
        emb = torch.nn.functional.normalize(torch.randn(4, bb.embed_dim), dim=1)
        save_bundle(root / "adapters" / name / "1", ad, bb, name=name, version="1", gallery=Gallery(emb, torch.tensor([0, 1, 2, 0]), [f"g{i}" for i in range(4)]))
    w = root / "adapters" / "broken" / "1" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="session")
def small_server(small_store):
    """`metalora serve` on `small_store`, torch on CPU, the admin token set, for the whole session.
    Its sharers' gallery writes are their own items (alpha's size is read before and after)."""
    from service.launch import ServerProcess

    srv = _SHARED["small_server"] = ServerProcess(small_store, small_store.parent / "small-server.log", backend="torch", admin_token=SMALL_TOKEN, max_delay_ms=5).start()
    yield srv
    srv.stop()
