"""The golden set: requests on every front door (`/v1`, `/v2` REST, gRPC), errors included, and
how to replay them against a running server.

`python -m tests.golden.cases record` starts a real `metalora serve` on the shipped model store
(torch backend, CPU) and writes `tests/golden/golden.json`; `tests/test_golden.py` replays the
same requests and compares the answers with it: byte for byte on the machine that recorded it
(same CPU model and flags, same torch), and as parsed JSON with floats to 1e-4 elsewhere (other
CPUs round the last bits of a float differently).

It was recorded before the one-data-plane move (issue 31), so it pins what a request means across
that move. One change was meant: `/v2` answers of calibrated bundles now carry an `unknown`
output, which the comparison leaves out (`V2_NEW_OUTPUTS`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden.json"
TOKEN = "golden-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SETTINGS = dict(backend="torch", adapters="cifar10,mixed", lru_capacity=4, max_images=4, max_delay_ms=0, admin_token=TOKEN, warmup="false", version_policy="all")  # all: the set asks for older versions (cifar10@1)
KEEP_HEADERS = ("content-type", "retry-after", "www-authenticate", "inference-header-content-length", "allow", "accept-encoding")
V2_NEW_OUTPUTS = {"unknown"}


def machine() -> dict:
    """What decides the last bits of a float: the CPU (model and ISA flags), the torch build."""
    import torch

    flags, model = "", platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16], "torch": torch.__version__, "threads": torch.get_num_threads()}


def _jpeg(arr, size=None) -> bytes:
    from PIL import Image

    img = Image.fromarray(arr)
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def images() -> dict[str, bytes]:
    import skimage.data as sd

    return {"cat": _jpeg(sd.chelsea()), "astronaut": _jpeg(sd.astronaut(), (256, 256)), "coffee": _jpeg(sd.coffee(), (200, 150))}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def http_cases(img: dict[str, bytes]) -> list[tuple[str, str, str, dict]]:
    """(name, method, path, httpx keyword arguments), replayed in order (the gallery edits build on each other)."""
    cat, astro, coffee = (b64(img[k]) for k in ("cat", "astronaut", "coffee"))
    j = "application/json"
    return [
        # /v1 inference
        ("v1.predict", "POST", "/v1/predict", {"json": {"adapter": "cifar10", "images": [cat], "top_k": 3}}),
        ("v1.predict.fanout", "POST", "/v1/predict", {"json": {"adapter": ["cifar10", "base", "mixed"], "images": [cat, astro], "top_k": 2}}),
        ("v1.predict.multipart", "POST", "/v1/predict", {"files": [("images", ("a.jpg", img["coffee"], "image/jpeg"))], "data": {"adapter": "cifar10@6", "top_k": "2"}}),
        ("v1.predict.seed", "POST", "/v1/predict", {"json": {"adapter": "mixed", "images": [coffee], "top_k": 1, "include_seed": True}}),
        ("v1.predict.version", "POST", "/v1/predict", {"json": {"adapter": "cifar10@1", "images": [cat], "top_k": 2}}),
        ("v1.embed", "POST", "/v1/embed", {"json": {"adapter": "cifar10", "images": [cat]}}),
        ("v1.knn", "POST", "/v1/knn", {"json": {"adapter": "cifar10", "images": [cat, astro], "k": 5}}),
        ("v1.knn.vectors", "POST", "/v1/knn", {"json": {"adapter": "cifar10", "vectors": [[1.0] + [0.0] * 1279], "k": 3}}),
        # /v1 errors
        ("v1.err.unknown_adapter", "POST", "/v1/predict", {"json": {"adapter": "nope", "images": [cat]}}),
        ("v1.err.unknown_version", "POST", "/v1/predict", {"json": {"adapter": "cifar10@99", "images": [cat]}}),
        ("v1.err.invalid_name", "POST", "/v1/predict", {"json": {"adapter": "Bad Name!", "images": [cat]}}),
        ("v1.err.invalid_base64", "POST", "/v1/predict", {"json": {"adapter": "cifar10", "images": ["@@@@"]}}),
        ("v1.err.not_an_image", "POST", "/v1/predict", {"json": {"adapter": "cifar10", "images": [b64(b"hello world, not an image")]}}),
        ("v1.err.top_k", "POST", "/v1/predict", {"json": {"adapter": "cifar10", "images": [cat], "top_k": 1000}}),
        ("v1.err.too_many_images", "POST", "/v1/predict", {"json": {"adapter": "cifar10", "images": [cat] * 5}}),
        ("v1.err.media_type", "POST", "/v1/predict", {"content": b"x", "headers": {"content-type": "text/plain"}}),
        ("v1.err.query", "POST", "/v1/predict?top_k=3", {"json": {"adapter": "cifar10", "images": [cat]}}),
        ("v1.err.json", "POST", "/v1/predict", {"content": b"{not json", "headers": {"content-type": j}}),
        ("v1.err.timeout_header", "POST", "/v1/predict", {"json": {"adapter": "cifar10", "images": [cat]}, "headers": {"x-timeout-ms": "soon"}}),
        ("v1.err.k", "POST", "/v1/knn", {"json": {"adapter": "cifar10", "images": [cat], "k": 1000}}),
        ("v1.err.knn_base", "POST", "/v1/knn", {"json": {"adapter": "base", "images": [cat]}}),
        ("v1.err.dim_mismatch", "POST", "/v1/knn", {"json": {"adapter": "cifar10", "vectors": [[1.0, 2.0]]}}),
        ("v1.err.zero_vector", "POST", "/v1/knn", {"json": {"adapter": "cifar10", "vectors": [[0.0] * 1280]}}),
        ("v1.err.no_route", "GET", "/v1/nothing", {}),
        # /v1 adapters and galleries
        ("v1.adapters", "GET", "/v1/adapters", {}),
        ("v1.adapter", "GET", "/v1/adapters/cifar10", {}),
        ("v1.adapter.base", "GET", "/v1/adapters/base", {}),
        ("v1.adapter.unknown", "GET", "/v1/adapters/nope", {}),
        ("v1.gallery", "GET", "/v1/adapters/cifar10/gallery", {}),
        ("v1.gallery.base", "GET", "/v1/adapters/base/gallery", {}),
        ("v1.load.no_token", "POST", "/v1/adapters/mnist/load", {}),
        ("v1.load.wrong_token", "POST", "/v1/adapters/mnist/load", {"headers": {"Authorization": "Bearer wrong-token-wrong-token"}}),
        ("v1.unload.not_loaded", "POST", "/v1/adapters/mnist/unload", {"headers": AUTH}),
        ("v1.unload.base", "POST", "/v1/adapters/base/unload", {"headers": AUTH}),
        ("v1.gallery.put.vector", "PUT", "/v1/adapters/cifar10/gallery/golden-1", {"json": {"label": "cat", "vector": [0.0, 1.0] + [0.0] * 1278}, "headers": AUTH}),
        ("v1.gallery.put.image", "PUT", "/v1/adapters/cifar10/gallery/golden-2", {"json": {"label": "cat", "image": cat}, "headers": AUTH}),
        ("v1.gallery.put.bad_label", "PUT", "/v1/adapters/cifar10/gallery/golden-3", {"json": {"label": "unicorn", "vector": [1.0] * 1280}, "headers": AUTH}),
        ("v1.gallery.put.no_token", "PUT", "/v1/adapters/cifar10/gallery/golden-4", {"json": {"label": "cat", "vector": [1.0] * 1280}}),
        ("v1.gallery.batch", "POST", "/v1/adapters/cifar10/gallery", {"json": {"items": [{"id": "golden-5", "label": "dog", "vector": [0.5] * 1280}, {"id": "golden-6", "label": "ship", "image": coffee}]}, "headers": AUTH}),
        ("v1.gallery.batch.dup", "POST", "/v1/adapters/cifar10/gallery", {"json": {"items": [{"id": "d", "label": "dog", "vector": [0.5] * 1280}, {"id": "d", "label": "dog", "vector": [0.5] * 1280}]}, "headers": AUTH}),
        ("v1.knn.after_put", "POST", "/v1/knn", {"json": {"adapter": "cifar10", "vectors": [[0.0, 1.0] + [0.0] * 1278], "k": 2}}),
        ("v1.gallery.delete", "DELETE", "/v1/adapters/cifar10/gallery/golden-1", {"headers": AUTH}),
        ("v1.gallery.delete.again", "DELETE", "/v1/adapters/cifar10/gallery/golden-1", {"headers": AUTH}),
        ("v1.gallery.after", "GET", "/v1/adapters/cifar10/gallery", {}),
        ("v1.thumbnail.missing", "GET", "/v1/adapters/cifar10/gallery/golden-1/thumbnail", {}),
        # /v2 REST
        ("v2.server", "GET", "/v2", {}),
        ("v2.live", "GET", "/v2/health/live", {}),
        ("v2.model", "GET", "/v2/models/cifar10", {}),
        ("v2.model.base", "GET", "/v2/models/base", {}),
        ("v2.model.version", "GET", "/v2/models/cifar10/versions/1", {}),
        ("v2.model.unknown", "GET", "/v2/models/nope", {}),
        ("v2.config", "GET", "/v2/models/cifar10/config", {}),
        ("v2.ready", "GET", "/v2/models/cifar10/ready", {}),
        ("v2.ready.not_loaded", "GET", "/v2/models/mnist/ready", {}),
        ("v2.infer", "POST", "/v2/models/cifar10/infer", {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [cat]}]}}),
        ("v2.infer.outputs", "POST", "/v2/models/cifar10/versions/6/infer", {"json": {"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [cat, astro]}],
                                                                                      "outputs": [{"name": "label"}, {"name": "probabilities", "parameters": {"classification": 2}}]}}),
        ("v2.infer.base", "POST", "/v2/models/base/infer", {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [coffee]}], "outputs": [{"name": "label"}]}}),
        ("v2.infer.pixels", "POST", "/v2/models/mixed/infer", {"json": {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 4, 4, 3], "data": list(range(48))}], "outputs": [{"name": "label"}, {"name": "probabilities"}]}}),
        ("v2.err.unknown_model", "POST", "/v2/models/nope/infer", {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [cat]}]}}),
        ("v2.err.input_name", "POST", "/v2/models/cifar10/infer", {"json": {"inputs": [{"name": "img", "datatype": "BYTES", "shape": [1], "data": [cat]}]}}),
        ("v2.err.datatype", "POST", "/v2/models/cifar10/infer", {"json": {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}}),
        ("v2.err.not_an_image", "POST", "/v2/models/cifar10/infer", {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(b"not an image at all")]}]}}),
        ("v2.err.output", "POST", "/v2/models/cifar10/infer", {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [cat]}], "outputs": [{"name": "logits"}]}}),
        ("v2.err.json", "POST", "/v2/models/cifar10/infer", {"content": b"{", "headers": {"content-type": j}}),
        ("v2.err.base_version", "GET", "/v2/models/base/versions/1", {}),
        ("v2.err.no_route", "GET", "/v2/nothing", {}),
        ("v2.repository.index", "POST", "/v2/repository/index", {"headers": AUTH}),
        ("v2.repository.index.no_token", "POST", "/v2/repository/index", {}),
        ("v2.repository.unload.base", "POST", "/v2/repository/models/base/unload", {"headers": AUTH}),
    ]


def grpc_cases(img: dict[str, bytes]) -> list[tuple[str, str, dict, list]]:
    """(name, RPC, request fields, metadata)."""
    cat = img["cat"]
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": [cat]}}
    auth = [("authorization", f"Bearer {TOKEN}")]
    return [
        ("grpc.server_metadata", "ServerMetadata", {}, []),
        ("grpc.model_metadata", "ModelMetadata", {"name": "cifar10"}, []),
        ("grpc.model_metadata.unknown", "ModelMetadata", {"name": "nope"}, []),
        ("grpc.model_ready", "ModelReady", {"name": "cifar10"}, []),
        ("grpc.infer", "ModelInfer", {"model_name": "cifar10", "inputs": [tensor]}, []),
        ("grpc.infer.outputs", "ModelInfer", {"model_name": "mixed", "id": "g1", "inputs": [tensor], "outputs": [{"name": "label"}, {"name": "probabilities", "parameters": {"classification": {"int64_param": 3}}}]}, []),
        ("grpc.infer.unknown", "ModelInfer", {"model_name": "nope", "inputs": [tensor]}, []),
        ("grpc.infer.bad_input", "ModelInfer", {"model_name": "cifar10", "inputs": [{**tensor, "name": "img"}]}, []),
        ("grpc.infer.not_an_image", "ModelInfer", {"model_name": "cifar10", "inputs": [{**tensor, "contents": {"bytes_contents": [b"nope"]}}]}, []),
        ("grpc.repository.index.no_token", "RepositoryIndex", {}, []),
        ("grpc.repository.index", "RepositoryIndex", {}, auth),
        ("grpc.repository.unload.base", "RepositoryModelUnload", {"model_name": "base"}, auth),
    ]


def replay_http(url: str, img: dict[str, bytes]) -> list[dict]:
    import httpx

    out = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for name, method, path, kw in http_cases(img):
            r = c.request(method, path, **kw)
            binary = "octet-stream" in r.headers.get("content-type", "")
            out.append({"name": name, "status": r.status_code, "headers": {h: r.headers[h] for h in KEEP_HEADERS if h in r.headers},
                        "body": b64(r.content) if binary else r.text, "binary": binary})
    return out


def replay_grpc(target: str, img: dict[str, bytes]) -> list[dict]:
    import grpc
    from google.protobuf import json_format

    from service.grpc import proto

    pb, methods = proto.messages(), proto.methods()
    out = []
    with grpc.insecure_channel(target) as ch:
        for name, rpc, fields, md in grpc_cases(img):
            req_t, resp_t = methods[rpc]
            req = req_t()
            json_format.ParseDict(_grpc_json(fields), req)
            call = ch.unary_unary(f"/{proto.SERVICE}/{rpc}", request_serializer=req_t.SerializeToString, response_deserializer=resp_t.FromString)
            try:
                resp = call(req, metadata=md, timeout=120)
                out.append({"name": name, "code": "OK", "body": b64(resp.SerializeToString(deterministic=True))})
            except grpc.RpcError as e:
                out.append({"name": name, "code": e.code().name, "details": e.details()})
    del pb
    return out


def _grpc_json(fields: dict) -> dict:
    """bytes -> base64, as protobuf's JSON mapping spells them."""
    if isinstance(fields, dict):
        return {k: _grpc_json(v) for k, v in fields.items()}
    if isinstance(fields, list):
        return [_grpc_json(v) for v in fields]
    if isinstance(fields, bytes):
        return b64(fields)
    return fields


def record_all(url: str, grpc_target: str) -> dict:
    img = images()
    return {"machine": machine(), "http": replay_http(url, img), "grpc": replay_grpc(grpc_target, img)}


def start_server(tmp: Path):
    """A real `metalora serve` on the shipped store, with a private gallery directory."""
    from service.launch import ServerProcess

    root = HERE.parent.parent
    return ServerProcess(root / "model_store", tmp / "golden-server.log", gallery_dir=tmp / "galleries", **SETTINGS).start()


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as d, start_server(Path(d)) as srv:
        doc = record_all(srv.url, srv.grpc_url)
    GOLDEN.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {len(doc['http'])} HTTP and {len(doc['grpc'])} gRPC answers on {doc['machine']['cpu']}")
