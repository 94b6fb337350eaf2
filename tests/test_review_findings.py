"""Regressions for a second user review: HEAD probes, thumbnail validators, server paths in error
bodies, gallery batch errors, the error responses the OpenAPI document declares.

One real server (service/launch.py) on a throw-away store: a tiny adapter with a gallery and a
corrupt bundle, torch on CPU, the admin token set.
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from metalora.adapters import Adapter, AdapterConfig
from metalora.backbones import create_backbone
from metalora.bundle import Gallery, save_bundle
from service.launch import ServerProcess

from .conftest import ROOT, randomize

TOKEN = "review-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LABELS = ["cat", "dog", "fox"]
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def _image(colour: str, fmt: str = "PNG") -> str:
    """A small picture as base64."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The shipped backbone manifest, `alpha` (a gallery of 4) and `broken` (one flipped weight byte)."""
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(ROOT / "model_store" / "backbones", root / "backbones")
    bb = create_backbone("efficientnet_lite0", split=6)
    torch.manual_seed(0)
    for name in ("alpha", "broken"):
        ad = randomize(Adapter(bb, AdapterConfig("lora", (2,), ["conv_head"], labels=LABELS)), std=0.05)
        emb = torch.nn.functional.normalize(torch.randn(4, bb.embed_dim), dim=1)
        save_bundle(root / "adapters" / name / "1", ad, bb, name=name, version="1", gallery=Gallery(emb, torch.tensor([0, 1, 2, 0]), [f"g{i}" for i in range(4)]))
    w = root / "adapters" / "broken" / "1" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def server(store):
    srv = ServerProcess(store, store.parent / "review-server.log", backend="torch", admin_token=TOKEN, max_delay_ms=5).start()
    yield srv
    srv.stop()


def test_probes_answer_head_like_get_without_a_body(server):
    """Load balancers and uptime checkers send HEAD; it was 405."""
    for path in ("/healthz", "/readyz"):
        get, head = httpx.get(server.url + path), httpx.head(server.url + path)
        assert get.status_code == 200 and head.status_code == 200, (path, head.text)
        assert head.content == b""
        for h in ("content-type", "content-length"):
            assert head.headers[h] == get.headers[h], (path, h)


def test_thumbnail_if_none_match_uses_the_weak_comparison(server):
    """A weak validator (what proxies and browsers send back) and `*` answer 304 too (RFC 9110
    §13.1.2); only the strong tag did."""
    r = httpx.put(server.url + "/v1/adapters/alpha/gallery/etag-probe", headers=AUTH, json={"label": "cat", "image": _image("orange")}, timeout=60)
    assert r.status_code == 200, r.text
    url = server.url + "/v1/adapters/alpha/gallery/etag-probe/thumbnail"
    first = httpx.get(url)
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"')
    for header in (etag, f"W/{etag}", "*", f'"other", W/{etag}', f'W/"nope",{etag}'):
        again = httpx.get(url, headers={"If-None-Match": header})
        assert again.status_code == 304 and again.content == b"", header
        assert again.headers["etag"] == etag
    for header in ('"other"', 'W/"other"', etag[:-2] + '"'):
        assert httpx.get(url, headers={"If-None-Match": header}).status_code == 200, header
