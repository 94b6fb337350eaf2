"""KServe's own Python SDK (`kserve` 0.21: `InferenceRESTClient`, `InferenceGRPCClient`) against a
real `metalora serve` on the shipped store (issue 32, item 5): liveness, readiness, model
readiness, server and model metadata, and infer over REST (JSON and binary data) and gRPC.

kserve 0.21 cannot share this project's virtualenv: it pins `protobuf<7`, and the server's
grpcio-tools needs protobuf >= 7.35. So it lives in its own virtualenv under /tmp (`bash .ci/run`
makes it; this module makes it too when it is missing), and the client runs there, in a
subprocess, printing what it got as JSON. Skipped, with pip's words, only where kserve cannot be
installed. The SDK's clients have no metadata call: metadata goes through the SDK's own pieces
(its gRPC stub and messages, its REST response models, which validate the JSON).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.launch import ServerProcess

from .conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KSERVE = "kserve==0.21.0"
VENV = Path("/tmp/metalora-kserve-0.21")  # also made by .ci/run
MODELS = ("cifar10", "digits", "base")

# Runs in kserve's virtualenv: argv = HTTP url, gRPC address, JPEG path, models...
CLIENT = r'''
import asyncio, base64, json, sys
import numpy as np
import kserve
from importlib.metadata import version
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse, ServerMetadataResponse

url, grpc_url, jpeg_path, *models = sys.argv[1:]
jpeg = open(jpeg_path, "rb").read()


def request(model, binary):
    image = InferInput("image", [1], "BYTES")
    # JSON carries BYTES as text: the file in base64 (what the server takes in JSON); binary data is the file itself
    image.set_data_from_numpy(np.array([jpeg if binary else base64.b64encode(jpeg)], dtype=object), binary_data=binary)
    return InferRequest(model_name=model, infer_inputs=[image], request_id="k-" + model)


def outputs(resp):
    out = {}
    for o in resp.outputs:
        a = o.as_numpy()
        out[o.name] = {"datatype": o.datatype, "shape": list(o.shape), "data": [x.decode() if isinstance(x, bytes) else x for x in a.reshape(-1).tolist()] if o.name != "embedding" else None,
                       "norm": float(np.linalg.norm(a.reshape(a.shape[0], -1), axis=1)[0]) if o.name == "embedding" else None}
    return out


async def main():
    got = {"kserve": version("kserve"), "rest": {}, "grpc": {}}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    got["rest"]["live"] = await rest.is_server_live(url)
    got["rest"]["ready"] = await rest.is_server_ready(url)
    got["rest"]["server_metadata"] = ServerMetadataResponse.model_validate((await rest._client.get(url + "/v2")).json()).model_dump()
    got["rest"]["unknown_model_ready"] = await rest.is_model_ready(url, "no-such-adapter")
    g = InferenceGRPCClient(grpc_url, retries=0)
    got["grpc"]["live"] = await g.is_server_live()
    got["grpc"]["ready"] = await g.is_server_ready()
    sm = await g._client_stub.ServerMetadata(pb.ServerMetadataRequest())
    got["grpc"]["server_metadata"] = {"name": sm.name, "version": sm.version, "extensions": list(sm.extensions)}
    for model in models:
        r = got["rest"][model] = {"ready": await rest.is_model_ready(url, model)}
        r["metadata"] = ModelMetadataResponse.model_validate((await rest._client.get(f"{url}/v2/models/{model}")).json()).model_dump()
        for binary in (False, True):
            resp = await rest.infer(url, request(model, binary), model_name=model)
            r["infer_binary" if binary else "infer_json"] = {"model_name": resp.model_name, "id": resp.id, "outputs": outputs(resp)}
        q = got["grpc"][model] = {"ready": await g.is_model_ready(model)}
        md = await g._client_stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
        q["metadata"] = {"name": md.name, "versions": list(md.versions), "platform": md.platform,
                         "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in md.inputs],
                         "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in md.outputs]}
        resp = await g.infer(request(model, True))  # gRPC BYTES are raw bytes
        q["infer"] = {"model_name": resp.model_name, "model_version": resp.model_version, "id": resp.id, "outputs": outputs(resp)}
    await rest.close()
    await g.close()
    print(json.dumps(got))


asyncio.run(main())
'''


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def kserve_python() -> Path:
    """kserve's virtualenv's python: made (python -m venv, pip install kserve==0.21.0) when missing."""
    py = VENV / "bin" / "python"
    if py.exists() and _run([str(py), "-c", "import importlib.metadata as m; assert m.version('kserve') == '0.21.0'"], 120).returncode == 0:
        return py
    r = _run([sys.executable, "-m", "venv", "--clear", str(VENV)], 300)
    if r.returncode != 0:
        pytest.skip(f"cannot make kserve's virtualenv {VENV}: {(r.stderr or r.stdout).strip()[-500:]}")
    r = _run([str(py), "-m", "pip", "install", "-q", KSERVE], 900)
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
        pytest.skip(f"cannot install {KSERVE} into {VENV}: {' | '.join(lines[-3:])}")
    return py


@pytest.fixture(scope="module")
def answers(kserve_python, tmp_path_factory) -> dict:
    """What kserve's clients got from a real server on the shipped store (torch, CPU)."""
    import skimage.data
    from PIL import Image

    tmp = tmp_path_factory.mktemp("kserve")
    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, "JPEG")
    (tmp / "cat.jpg").write_bytes(buf.getvalue())
    with ServerProcess(ROOT / "model_store", tmp / "server.log", device="cpu", backend="torch", adapters=",".join(m for m in MODELS if m != "base"),
                       warmup="false", gallery_dir=tmp / "galleries") as srv:
        r = _run([str(kserve_python), "-c", CLIENT, srv.url, srv.grpc_url, str(tmp / "cat.jpg"), *MODELS], 300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_it_is_kserve_0_21(answers):
    assert answers["kserve"] == "0.21.0"


@pytest.mark.parametrize("door", ["rest", "grpc"])
def test_server_live_ready_and_metadata(answers, door):
    got = answers[door]
    assert got["live"] is True and got["ready"] is True
    assert got["server_metadata"]["name"] == "metalora-serve"
    assert {"binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"} <= set(got["server_metadata"]["extensions"])
    if door == "rest":
        assert got["unknown_model_ready"] is False  # the protocol's 4xx: "not ready"


@pytest.mark.parametrize("door", ["rest", "grpc"])
@pytest.mark.parametrize("model", MODELS)
def test_model_ready_and_metadata(answers, door, model):
    got = answers[door][model]
    assert got["ready"] is True
    meta = got["metadata"]
    assert meta["name"] == model and meta["platform"] == "metalora_torch" and (meta["versions"] == [] if model == "base" else len(meta["versions"]) >= 1)
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs == {"image": ("BYTES", [-1, 1]), "pixels": ("FP32", [-1, 3, 224, 224])}
    outputs = {t["name"]: t["datatype"] for t in meta["outputs"]}
    want = {"probabilities": "FP32", "embedding": "FP32", "label": "BYTES"}
    assert outputs == (want if model == "base" else {**want, "unknown": "BOOL"})  # the shipped adapters' latest versions are calibrated


@pytest.mark.parametrize("how", ["rest:infer_json", "rest:infer_binary", "grpc:infer"])
@pytest.mark.parametrize("model", MODELS)
def test_infer(answers, how, model):
    door, key = how.split(":")
    got = answers[door][model][key]
    assert got["model_name"] == model and got["id"] == f"k-{model}"
    outs = got["outputs"]
    classes = {"cifar10": 10, "digits": 10, "base": 1000}[model]
    assert outs["probabilities"]["shape"] == [1, classes] and abs(sum(outs["probabilities"]["data"]) - 1) < 1e-4
    assert outs["embedding"]["shape"] == [1, 1280] and abs(outs["embedding"]["norm"] - 1) < 1e-4
    assert outs["label"]["datatype"] == "BYTES" and len(outs["label"]["data"]) == 1
    if model == "cifar10":
        assert outs["label"]["data"] == ["cat"]
    if model == "base":
        assert "unknown" not in outs and outs["label"]["data"][0] in {"tiger cat", "tabby", "tabby cat", "Egyptian cat"}
    else:
        assert outs["unknown"]["datatype"] == "BOOL" and outs["unknown"]["shape"] == [1]
