"""ONNX Runtime backend (metalora/backends/onnx.py, export.py): exported graphs match the torch path (fp32, max abs diff <= 1e-4).

Runs the real efficientnet_lite0 with randomized adapter bundles of every format, written to a
temporary store and loaded the way the service loads them.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from metalora.adapters import Adapter, AdapterConfig
from metalora.bundle import save_bundle
from metalora.runtime import Runtime
from metalora.store import DEFAULT_STORE
from tests.conftest import randomize

ort = pytest.importorskip("onnxruntime")
from metalora.backends.base import AUTO_BACKEND, resolve_backend  # noqa: E402
from metalora.backends.export import export_onnx  # noqa: E402
from metalora.backends.onnx import OrtRunner  # noqa: E402

TOL = 1e-4
BUNDLES = [  # (name, format, ranks, targets)
    ("tr-all", "tr", (2, 3, 2), ["*"]),
    ("cp-head", "cp", (4,), ["conv_head"]),
    ("lora-pw", "lora", (4,), ["blocks.6.0.*"]),
]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    """A store holding the shipped backbone manifest and three randomized bundles."""
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(DEFAULT_STORE / "backbones", root / "backbones")
    rt = Runtime(root, device="cpu")
    torch.manual_seed(0)
    for name, fmt, ranks, targets in BUNDLES:
        ad = randomize(Adapter(rt.backbone, AdapterConfig(fmt, ranks, targets, [f"c{i}" for i in range(7)])), std=0.05)
        save_bundle(root / "adapters" / name / "1", ad, rt.backbone, name=name, version="1")
        rt.load(name)
    return rt


@pytest.fixture(scope="module")
def runner(runtime, tmp_path_factory):
    return OrtRunner(runtime, cache_dir=tmp_path_factory.mktemp("onnx"))


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 224, 224, generator=g) * 2 - 1  # the backbone's [-1, 1] input range


def _max_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("key", ["base"] + [f"{b[0]}@1" for b in BUNDLES])
def test_graph_matches_torch(runtime, runner, key):
    x = _images(3, seed=1)
    ref = runtime.run(x, [key] * 3)
    out = runner.run(x, [key] * 3)
    assert out.embeddings.shape == ref.embeddings.shape
    assert (out.embeddings - ref.embeddings.float()).abs().max().item() <= TOL
    assert _max_diff(out.logits, ref.logits) <= TOL
    if key.startswith("lora") or key == "base":
        assert all(s is None for s in out.seeds)
    else:
        # The seed is computed inside the graph; a randomized mapping net moves it off its start.
        assert _max_diff(out.seeds, ref.seeds) <= TOL
        assert not torch.allclose(out.seeds[0], runtime.model.adapters[key].mapping.seed0.detach())
    # A randomized adapter really changes the output, so equality above is not the frozen path's.
    if key != "base":
        base = runtime.run(x, ["base"] * 3).embeddings
        assert (base - ref.embeddings).abs().max().item() > 1e-3


@pytest.mark.slow
def test_mixed_batch_in_request_order(runtime, runner):
    keys = ["tr-all@1", "base", "cp-head@1", "tr-all@1", "lora-pw@1", "base"]
    x = _images(len(keys), seed=2)
    ref, out = runtime.run(x, keys), runner.run(x, keys)
    assert (out.embeddings - ref.embeddings.float()).abs().max().item() <= TOL
    assert [lo.shape for lo in out.logits] == [lo.shape for lo in ref.logits]
    assert _max_diff(out.logits, ref.logits) <= TOL


@pytest.mark.slow
def test_cache_reuse_and_reexport_on_reload(runtime, runner):
    key = "cp-head@1"
    path = runner.graph_path(key)
    first = runner.prepare(key)
    assert path.exists() and runner.prepare(key) is first
    mtime = path.stat().st_mtime_ns
    OrtRunner(runtime, cache_dir=runner.cache_dir).prepare(key)  # a restart reuses the cached graph
    assert path.stat().st_mtime_ns == mtime
    # A reload makes a new adapter object: the runner opens a new session for it.
    runtime.unload(key)
    with pytest.raises(KeyError):
        runner.run(_images(1, seed=4), [key])
    runtime.load(key)
    assert runner.prepare(key) is not first
    # The digest covers the weights, so a changed adapter never reuses a stale graph file.
    bias = runtime.model.adapters[key].head.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.add_(1.0)
    try:
        assert runner.graph_path(key) != path
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert runner.graph_path(key) == path


def test_unknown_key_is_refused(runner):
    with pytest.raises(KeyError, match="not loaded"):
        runner.run(torch.zeros(1, 3, 224, 224), ["nope@1"])


@pytest.mark.slow
def test_export_file_has_dynamic_batch(runtime, tmp_path):
    path = export_onnx(runtime.backbone, runtime.model.adapters["tr-all@1"], tmp_path / "g.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["embedding", "logits", "seed"]
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # symbolic batch axis
    layers = len(runtime.model.adapters["tr-all@1"].targets)  # "*": every targetable layer of the store's cut
    for n in (1, 5):
        emb, lo, sd = sess.run(None, {"image": _images(n, seed=n).numpy()})
        assert emb.shape == (n, 1280) and lo.shape == (n, 7) and sd.shape == (n, layers * 2 * 2)  # tr (2, 3, 2): R3 x R1 a layer


def test_resolve_backend_rule():
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("onnx", "cuda") == "onnx"
    assert resolve_backend("auto", "cpu") == AUTO_BACKEND["cpu"]
    assert resolve_backend("auto", "cuda") == AUTO_BACKEND["cuda"]
    with pytest.raises(ValueError):
        resolve_backend("tensorrt", "cpu")


@pytest.mark.slow
def test_export_onnx_command(tmp_path):
    """`metalora export-onnx` on the shipped store writes a graph and reports its torch parity."""
    import json

    from typer.testing import CliRunner

    from metalora.cli import app

    out = tmp_path / "base.onnx"
    r = CliRunner().invoke(app, ["export-onnx", "--adapter", "base", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert out.is_file() and res["bytes"] == out.stat().st_size and res["outputs"] == ["embedding", "logits"]
    assert max(res["max_abs_diff"].values()) <= TOL


@pytest.mark.slow
def test_bench_onnx_command_reports_both_backends(monkeypatch, tmp_path):
    """Through `metalora` (metalora_serve.cli), whose METALORA_ONNX_CACHE default reaches --onnx-cache."""
    import json

    from typer.testing import CliRunner

    from metalora_serve.cli import app

    monkeypatch.setenv("METALORA_ONNX_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    r = CliRunner().invoke(app, ["bench-onnx", "--synthetic", "2", "--batch", "2", "--rounds", "1", "--threads", "1"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["keys"] == ["synthetic-tr-0@0", "synthetic-tr-1@0"] and res["threads"] == 1
    assert res["torch_img_s"] > 0 and res["onnx_img_s"] > 0
    assert res["onnx_over_torch"] == pytest.approx(res["onnx_img_s"] / res["torch_img_s"])
    assert torch.get_num_threads() == threads  # the measurement's thread count does not leak
    assert list(tmp_path.glob("*-prefix-*.onnx"))  # its graphs went to the cache the environment named


@pytest.mark.slow
def test_serve_backend_onnx_matches_torch(runtime, tmp_path):
    """`metalora serve --backend onnx` on a real uvicorn: a fan-out over base and two adapters in
    one request answers what the in-process torch model computes (scores and embeddings)."""
    import base64
    import io
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    import torch.nn.functional as F
    from PIL import Image
    from skimage import data

    photos = [data.chelsea(), data.coffee()]
    blobs = []
    for arr in photos:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "METALORA_STORE": str(runtime.store.root), "METALORA_ADAPTERS": "tr-all,cp-head", "METALORA_ONNX_CACHE": str(tmp_path / "onnx"), "METALORA_GRPC_PORT": "0"}
    env.pop("METALORA_ADMIN_TOKEN", None)
    log = tmp_path / "serve.log"
    cli = Path(sys.executable).parent / "metalora"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(cli), "serve", "--port", str(port), "--device", "cpu", "--backend", "onnx"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in time:\n" + log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert httpx.get(f"{url}/readyz").json()["backend"] == "onnx"
        # The shared prefix, and a tail for base and each adapter, exported at warm-up.
        assert sorted(p.name.split("-tail-")[0] for p in (tmp_path / "onnx").glob("*-tail-*.onnx")) == ["base", "cp-head-1", "tr-all-1"]
        assert len(list((tmp_path / "onnx").glob("*-prefix-*.onnx"))) == 1
        images = [base64.b64encode(b).decode() for b in blobs]
        refs = ["tr-all", "cp-head", "base"]
        r = httpx.post(f"{url}/v1/predict", json={"adapter": refs, "images": images, "top_k": 3}, timeout=120)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == len(images) * len(refs)
        for i, blob in enumerate(blobs):
            for j, ref in enumerate(refs):
                got = results[i * len(refs) + j]
                want = runtime.predict([blob], ref, top_k=3)[0]
                assert got["adapter"] == ref
                assert [p["index"] for p in got["predictions"]] == [p["index"] for p in want["predictions"]]
                assert max(abs(a["score"] - b["score"]) for a, b in zip(got["predictions"], want["predictions"])) <= TOL
        r = httpx.post(f"{url}/v1/embed", json={"adapter": "tr-all", "images": images}, timeout=120)
        assert r.status_code == 200, r.text
        want = F.normalize(runtime.run(runtime.preprocess(blobs), ["tr-all@1"] * 2).embeddings.float(), dim=-1)
        got = torch.tensor([e["embedding"] for e in r.json()["results"]])
        assert (got - want).abs().max().item() <= TOL
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
