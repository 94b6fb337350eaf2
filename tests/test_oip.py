"""The Open Inference Protocol end to end: the real `tritonclient` (HTTP and gRPC) against a real
`metalora serve` on the shipped model store, checked against the service's own `/v1` answers for
the same images (the reference), and against what the photos show (a cat)."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.launch import ServerProcess

from .conftest import ROOT, SHIPPED_SETTINGS, SHIPPED_TOKEN

# The shipped store's cifar10: every version, and the one a plain "cifar10" resolves to (the loaded one).
from metalora.store import ModelStore  # noqa: E402

CIFAR_VERSIONS = ModelStore(ROOT / "model_store").versions("cifar10")
CIFAR = CIFAR_VERSIONS[-1]

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException

TOKEN = SHIPPED_TOKEN
AUTH_HTTP = {"Authorization": f"Bearer {TOKEN}"}
AUTH_GRPC = {"authorization": f"Bearer {TOKEN}"}
CAT_NEIGHBOURS = {"tiger cat", "tabby", "tabby cat", "Egyptian cat"}
MAX_IMAGES = SHIPPED_SETTINGS["max_images"]  # 4
MAX_PIXELS = SHIPPED_SETTINGS["max_pixels"]  # 1_000_000
MAX_BODY = SHIPPED_SETTINGS["max_body_bytes"]  # 8_000_000
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _file(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """The cat photo (skimage's chelsea) as JPEG and PNG, and a second photo."""
    import skimage.data as sd

    cat = sd.chelsea()
    return {"cat.jpg": _file(cat, "JPEG"), "cat.png": _file(cat, "PNG"), "coffee.png": _file(np.asarray(Image.fromarray(sd.coffee()).resize((200, 150))), "PNG")}


@pytest.fixture(scope="module")
def server(shipped_server):
    """The session's shared server on the shipped store (tests/conftest.py): mnist is left unloaded
    for the repository tests; a 150 ms batching delay lets a /v1 and a gRPC request meet in one
    batch; top_k up to 1000 so /v1 can list every base class; the limits below."""
    return shipped_server


@pytest.fixture(scope="module")
def http(server):
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpcc(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def _image_input(mod, raws: list[bytes], binary: bool = True):
    inp = mod.InferInput("image", [len(raws)], "BYTES")
    if binary or mod is grpcclient:
        inp.set_data_from_numpy(np.array(raws, dtype=object), **({"binary_data": True} if mod is httpclient else {}))
    else:  # JSON carries text: base64, as /v1 JSON does
        inp.set_data_from_numpy(np.array([base64.b64encode(r).decode() for r in raws], dtype=object), binary_data=False)
    return inp


def _pixels_input(mod, arrs: list[np.ndarray], binary: bool = True):
    x = np.stack(arrs).astype(np.uint8)  # (N, H, W, 3)
    inp = mod.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, **({"binary_data": binary} if mod is httpclient else {}))
    return inp


def _v1(server, model: str, raws: list[bytes], top_k: int) -> tuple[list[dict], np.ndarray]:
    """The reference: /v1/predict (every class) and /v1/embed for the same files."""
    images = [base64.b64encode(r).decode() for r in raws]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        pred = c.post("/v1/predict", json={"adapter": model, "images": images, "top_k": top_k})
        emb = c.post("/v1/embed", json={"adapter": model, "images": images})
    assert pred.status_code == 200 and emb.status_code == 200, (pred.text, emb.text)
    return [r["predictions"] for r in pred.json()["results"]], np.array([r["embedding"] for r in emb.json()["results"]])


def _dense(preds: list[dict], classes: int) -> np.ndarray:
    out = np.zeros(classes)
    for p in preds:
        out[p["index"]] = p["score"]
    return out


def _metrics(server) -> dict:
    text = httpx.get(server.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


# ------------------------------------------------------------------------ metadata
def test_server_and_model_metadata_over_http_and_grpc(http, grpcc):
    assert http.is_server_live() and http.is_server_ready() and grpcc.is_server_live() and grpcc.is_server_ready()
    for meta in (http.get_server_metadata(), grpcc.get_server_metadata(as_json=True)):
        assert meta["name"] == "metalora-serve"
        assert {"binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"} <= set(meta["extensions"])
    # cifar10's latest version carries a calibration (a k-NN threshold), so it has `unknown`; base has none
    for model, classes, versions, unknown in (("cifar10", 10, http.get_model_metadata("cifar10")["versions"], True), ("base", 1000, [], False)):
        for meta in (http.get_model_metadata(model), grpcc.get_model_metadata(model, as_json=True)):
            assert meta["name"] == model and meta.get("versions", []) == versions
            shapes = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
            want = {"probabilities": ("FP32", [-1, classes]), "embedding": ("FP32", [-1, 1280]), "label": ("BYTES", [-1])}
            assert shapes == {**want, **({"unknown": ("BOOL", [-1])} if unknown else {})}
            # `pixels` is declared as the model input (already preprocessed); UINT8 RGB pixels are taken too
            assert {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]} == {"image": ("BYTES", [-1, 1]), "pixels": ("FP32", [-1, 3, 224, 224])}
    assert CIFAR in http.get_model_metadata("cifar10")["versions"]
    assert http.is_model_ready("cifar10") and http.is_model_ready("cifar10", CIFAR) and http.is_model_ready("base")
    assert grpcc.is_model_ready("cifar10") and not grpcc.is_model_ready("mnist")
    assert not http.is_model_ready("mnist")  # in the store, not loaded


# Triton's model_config.proto DataType names for the protocol's datatypes (Triton's docs, "Datatypes" table)
TRITON_TYPES = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32", "BOOL": "TYPE_BOOL"}


def _grpc_config(grpcc, model: str, version: str = "") -> dict:
    """tritonclient's gRPC get_model_config as the JSON HTTP answers (protobuf's JSON writes int64 as strings)."""
    cfg = grpcc.get_model_config(model, version, as_json=True)["config"]
    for t in cfg["input"] + cfg["output"]:
        t["dims"] = [int(d) for d in t["dims"]]
        if "reshape" in t:
            t["reshape"] = {"shape": [int(d) for d in t["reshape"].get("shape", [])]}
    return cfg


@pytest.mark.parametrize("model, version, classes", [("cifar10", None, 10), ("cifar10", CIFAR, 10), ("base", None, 1000)])
def test_model_config_over_http_and_grpc_agrees_with_metadata(http, grpcc, model, version, classes):
    """tritonclient's get_model_config (Triton's model-configuration extension), HTTP and gRPC alike:
    batched, at most METALORA_MAX_IMAGES per request, each tensor the metadata's shape without the
    batch -1 (Triton: with max_batch_size > 0 the full shape is [-1] + dims; a per-image scalar
    output is dims [1] with reshape [], sent as [N]), and both inputs optional (a request sends one)."""
    kw = {"model_version": version} if version else {}
    cfg = http.get_model_config(model, **kw)
    meta = http.get_model_metadata(model, **kw)
    assert cfg["name"] == model and cfg["platform"] == meta["platform"] and cfg["max_batch_size"] == MAX_IMAGES
    for side, tensors in (("input", meta["inputs"]), ("output", meta["outputs"])):
        got = {t["name"]: t for t in cfg[side]}
        assert set(got) == {t["name"] for t in tensors}
        for t in tensors:
            c = got[t["name"]]
            assert c["data_type"] == TRITON_TYPES[t["datatype"]]
            if side == "input":
                assert [-1] + c["dims"] == t["shape"] and c["optional"] is True
            else:
                assert [-1] + (c["reshape"]["shape"] if "reshape" in c else c["dims"]) == t["shape"] and "optional" not in c
    assert {t["name"]: t["dims"] for t in cfg["output"]}["probabilities"] == [classes]
    assert _grpc_config(grpcc, model, version or "") == cfg


def test_model_config_errors(http, grpcc):
    status, msg = _http_error(lambda: http.get_model_config("no-such-adapter"))
    assert status == "404" and "no-such-adapter" in msg
    status, msg = _http_error(lambda: grpcc.get_model_config("no-such-adapter"))
    assert status == "StatusCode.NOT_FOUND" and "no-such-adapter" in msg
    status, msg = _http_error(lambda: grpcc.get_model_config("base", "1"))
    assert status == "StatusCode.NOT_FOUND" and msg.startswith("unknown_version")


def test_unmatched_v2_routes_answer_in_the_protocol_shape(server, http):
    """An unknown /v2 route or a wrong method: `"error": "<string>"` as the /v2 routes' own errors,
    so tritonclient's exception works; /v1 keeps its own shape."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.get("/v2/models/cifar10/trace/setting")  # Triton's trace extension, not served here
        assert r.status_code == 404 and isinstance(r.json()["error"], str) and r.json()["code"] == "not_found"
        r = c.get("/v2/models/cifar10/infer")
        assert r.status_code == 405 and isinstance(r.json()["error"], str) and r.json()["code"] == "method_not_allowed"
        assert "POST" in r.headers["allow"]
        r = c.get("/v1/no-such-route")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ------------------------------------------------------------------------ the cat, and /v1 as the reference
@pytest.mark.parametrize("model, want, top", [("cifar10", {"cat"}, 1), ("base", CAT_NEIGHBOURS, 1)])
@pytest.mark.parametrize("client", ["http", "grpc"])
def test_cat_photo_is_a_cat_and_matches_v1(server, http, grpcc, photos, model, want, top, client):
    """The cat is a cat, top-1 (base: a cat breed; cifar10: "cat" — cifar10@1 said "dog" 0.39 vs "cat"
    0.36 here, the calibrated bundles after it say "cat"), and every number equals what
    /v1/predict and /v1/embed say for the same files."""
    mod, cl = (httpclient, http) if client == "http" else (grpcclient, grpcc)
    raws = [photos["cat.jpg"], photos["coffee.png"]]
    classes = 10 if model == "cifar10" else 1000
    outputs = [mod.InferRequestedOutput(n) for n in ("probabilities", "embedding", "label")]
    res = cl.infer(model, [_image_input(mod, raws)], outputs=outputs)
    probs, emb, label = res.as_numpy("probabilities"), res.as_numpy("embedding"), res.as_numpy("label")
    assert probs.shape == (2, classes) and probs.dtype == np.float32 and emb.shape == (2, 1280)
    topk = cl.infer(model, [_image_input(mod, raws[:1])], outputs=[mod.InferRequestedOutput("probabilities", class_count=top)]).as_numpy("probabilities")
    said = [s.decode().split(":", 2)[2] for s in topk[0]]
    assert want & set(said), f"{model} says {said} for the cat"
    preds, ref_emb = _v1(server, model, raws, top_k=classes)
    for i in range(2):
        np.testing.assert_allclose(probs[i], _dense(preds[i], classes), atol=1e-5)
        assert label[i].decode() == preds[i][0]["label"]
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    resp = res.get_response() if client == "http" else res.get_response(as_json=True)
    assert resp["model_name"] == model and resp.get("model_version", "") == (CIFAR if model == "cifar10" else "")


@pytest.mark.parametrize("binary", [True, False])
def test_http_binary_data_on_and_off_give_the_same_answer(http, photos, binary):
    raws = [photos["cat.png"]]
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "embedding", "label")]
    res = http.infer("cifar10", [_image_input(httpclient, raws, binary)], outputs=outputs)
    for o in res.get_response()["outputs"]:
        assert ("binary_data_size" in o.get("parameters", {})) == binary and ("data" in o) != binary
    ref = http.infer("cifar10", [_image_input(httpclient, raws, True)])  # no outputs named: all, binary
    np.testing.assert_allclose(res.as_numpy("probabilities"), ref.as_numpy("probabilities"), atol=1e-6)
    np.testing.assert_allclose(res.as_numpy("embedding"), ref.as_numpy("embedding"), atol=1e-6)


@pytest.mark.parametrize("client, binary", [("http", True), ("http", False), ("grpc", True)])
def test_uint8_pixels_equal_the_encoded_file(http, grpcc, photos, client, binary):
    """Already-decoded RGB pixels give what the lossless PNG of the same pixels gives."""
    mod, cl = (httpclient, http) if client == "http" else (grpcclient, grpcc)
    pix = np.asarray(Image.open(io.BytesIO(photos["coffee.png"])).convert("RGB"))  # (150, 200, 3)
    outputs = [mod.InferRequestedOutput("probabilities", **({"binary_data": binary} if mod is httpclient else {}))]
    a = cl.infer("digits", [_pixels_input(mod, [pix, pix[::-1].copy()], binary)], outputs=outputs).as_numpy("probabilities")
    b = cl.infer("digits", [_image_input(mod, [photos["coffee.png"], _file(pix[::-1].copy(), "PNG")])], outputs=outputs).as_numpy("probabilities")
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(a[0], a[1])  # the flipped photo is a different input, not a copy


def _core_takes_model_inputs() -> bool:
    """Whether the data plane takes a model input as it is (float32 (3, S, S): no decode, no preprocessing)."""
    from service import decode

    return hasattr(decode, "check_model_input")


needs_model_inputs = pytest.mark.skipif(
    not _core_takes_model_inputs(),
    reason="FP32 `pixels` needs the core to take model inputs: service.decode.check_model_input and DataPlane.check_images / "
    "decode_one passing float32 (3, S, S) arrays through (issue 32, item 5)",
)


def _model_input(jpeg: bytes) -> np.ndarray:
    """The file as the model input (3, S, S) float32, by the store's own preprocessing recipe (the
    backbone manifest's `preprocess`, as metalora.runtime builds it)."""
    import json

    from metalora.images import Preprocess, Preprocessor

    (manifest,) = (ROOT / "model_store" / "backbones").glob("*/manifest.json")
    return Preprocessor(Preprocess(**json.loads(manifest.read_text())["preprocess"]))(jpeg).numpy()


@needs_model_inputs
@pytest.mark.parametrize("client, binary", [("http", True), ("http", False), ("grpc", True)])
def test_fp32_pixels_are_the_model_input_and_equal_the_encoded_file(http, grpcc, photos, client, binary):
    """`pixels` FP32 [N, 3, S, S] is the model input itself: the cat preprocessed by the store's
    recipe gives exactly what the JPEG gives (decode and preprocessing skipped, the rest the same)."""
    mod, cl = (httpclient, http) if client == "http" else (grpcclient, grpcc)
    x = np.stack([_model_input(photos["cat.jpg"]), _model_input(photos["coffee.png"])])  # (2, 3, 224, 224)
    inp = mod.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, **({"binary_data": binary} if mod is httpclient else {}))
    outputs = [mod.InferRequestedOutput(n, **({"binary_data": binary} if mod is httpclient else {})) for n in ("probabilities", "label", "unknown")]
    a = cl.infer("cifar10", [inp], outputs=outputs)
    b = cl.infer("cifar10", [_image_input(mod, [photos["cat.jpg"], photos["coffee.png"]])], outputs=outputs)
    np.testing.assert_allclose(a.as_numpy("probabilities"), b.as_numpy("probabilities"), atol=1e-6)
    assert list(a.as_numpy("label")) == list(b.as_numpy("label")) and a.as_numpy("label")[0] in (b"cat", "cat")
    assert list(a.as_numpy("unknown")) == list(b.as_numpy("unknown"))


@needs_model_inputs
@pytest.mark.parametrize("client", ["http", "grpc"])
def test_fp32_pixels_obey_the_data_plane_limits(http, grpcc, client):
    """The model input's shape is the model's; NaN is refused; the image count limit holds as for files."""
    mod, cl = (httpclient, http) if client == "http" else (grpcclient, grpcc)
    bad = "400" if client == "http" else "StatusCode.INVALID_ARGUMENT"

    def send(x):
        inp = mod.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return cl.infer("cifar10", [inp])

    status, msg = _http_error(lambda: send(np.zeros((1, 3, 32, 32), np.float32)))
    assert status == bad and "224" in msg
    nan = np.zeros((1, 3, 224, 224), np.float32)
    nan[0, 1, 2, 3] = np.nan
    assert _http_error(lambda: send(nan))[0] == bad
    assert _http_error(lambda: send(np.zeros((MAX_IMAGES + 1, 3, 224, 224), np.float32)))[0] in ("413", "StatusCode.INVALID_ARGUMENT")
    assert send(np.zeros((1, 3, 224, 224), np.float32)).as_numpy("probabilities").shape == (1, 10)


# ------------------------------------------------------------------------ statistics extension
def _stats(rows: list[dict], name: str) -> dict:
    (row,) = [r for r in rows if r["name"] == name]
    return row


@pytest.mark.parametrize("client", ["http", "grpc"])
def test_statistics_count_what_each_model_version_answered(server, http, grpcc, photos, client):
    """Triton's statistics extension (tritonclient's get_inference_statistics, HTTP and gRPC): per
    model version, counts of images and requests, cumulative ns, failures apart; from the data plane,
    so a /v1 request counts as well."""
    cl = http if client == "http" else grpcc

    def stats(model="", version=""):
        got = cl.get_inference_statistics(model, version) if client == "http" else cl.get_inference_statistics(model, version, as_json=True)
        return _ints(got["model_stats"])

    before = _stats(stats("digits"), "digits")
    assert before["version"] and set(before["inference_stats"]) >= {"success", "fail", "queue", "compute_input", "compute_infer", "compute_output"}
    cl.infer("digits", [_image_input(httpclient if client == "http" else grpcclient, [photos["cat.png"], photos["coffee.png"]])])
    _v1(server, "digits", [photos["cat.png"]], top_k=1)  # /v1/predict and /v1/embed: two requests of one image
    junk = _image_input(httpclient if client == "http" else grpcclient, [b"not an image"])
    _http_error(lambda: cl.infer("digits", [junk]))
    after = _stats(stats("digits", before["version"]), "digits")
    d = lambda k: after[k] - before[k]  # noqa: E731
    s0, s1 = before["inference_stats"], after["inference_stats"]
    assert (d("inference_count"), d("execution_count")) == (4, 3)
    assert s1["success"]["count"] - s0["success"]["count"] == 3 and s1["success"]["ns"] > s0["success"]["ns"]
    assert s1["fail"]["count"] - s0["fail"]["count"] == 1
    assert s1["queue"]["count"] - s0["queue"]["count"] == 4 and s1["compute_infer"]["count"] - s0["compute_infer"]["count"] == 4
    assert s1["compute_input"]["count"] == s1["compute_infer"]["count"] == s1["compute_output"]["count"]  # Triton's (perf_analyzer checks it)
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 1e12  # ms since the epoch
    assert not after["batch_stats"]  # batches mix adapters: none per model
    every = stats()
    assert {"base", "cifar10", "digits"} <= {r["name"] for r in every}
    status, _ = _http_error(lambda: stats("no-such-adapter"))
    assert status in ("404", "StatusCode.NOT_FOUND")


def _ints(rows: list[dict]) -> list[dict]:
    """gRPC's JSON writes uint64 as strings and leaves out zeros; HTTP writes numbers: make them alike."""
    out = []
    for r in rows:
        st = r.get("inference_stats", {})
        out.append({
            "name": r["name"], "version": r.get("version", ""), "batch_stats": r.get("batch_stats", []),
            **{k: int(r.get(k, 0)) for k in ("last_inference", "inference_count", "execution_count")},
            "inference_stats": {k: {f: int(st.get(k, {}).get(f, 0)) for f in ("count", "ns")} for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")},
        })
    return out


def test_statistics_routes_over_plain_http(server):
    """The three routes of the extension, in Triton's JSON shape."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        every = c.get("/v2/models/stats")
        one = c.get("/v2/models/cifar10/stats")
        version = c.get(f"/v2/models/cifar10/versions/{CIFAR}/stats")
        base = c.get("/v2/models/base/stats")
        unknown = c.get("/v2/models/no-such-adapter/stats")
    assert every.status_code == one.status_code == version.status_code == base.status_code == 200
    assert [r["name"] for r in one.json()["model_stats"]] == ["cifar10"] and one.json()["model_stats"][0]["version"] == CIFAR
    assert version.json()["model_stats"][0]["version"] == CIFAR and base.json()["model_stats"][0]["version"] == ""
    row = every.json()["model_stats"][0]
    assert set(row) == {"name", "version", "last_inference", "inference_count", "execution_count", "inference_stats", "batch_stats"}
    assert set(row["inference_stats"]) == {"success", "fail", "queue", "compute_input", "compute_infer", "compute_output"}
    assert unknown.status_code == 404 and isinstance(unknown.json()["error"], str)


@pytest.mark.parametrize("client, binary", [("http", True), ("http", False), ("grpc", True)])
def test_classification_extension_matches_v1_top_k(server, http, grpcc, photos, client, binary):
    mod, cl = (httpclient, http) if client == "http" else (grpcclient, grpcc)
    kw = {"binary_data": binary} if mod is httpclient else {}
    res = cl.infer("base", [_image_input(mod, [photos["cat.jpg"]])], outputs=[mod.InferRequestedOutput("probabilities", class_count=3, **kw)])
    got = res.as_numpy("probabilities")
    assert got.shape == (1, 3)
    preds, _ = _v1(server, "base", [photos["cat.jpg"]], top_k=3)
    for s, p in zip(got[0], preds[0]):
        value, index, label = (s.decode() if isinstance(s, bytes) else s).split(":", 2)
        assert (int(index), label) == (p["index"], p["label"])
        assert abs(float(value) - p["score"]) < 1e-5


# ------------------------------------------------------------------------ repository extension
@pytest.mark.parametrize("client", ["http", "grpc"])
def test_load_and_unload_through_the_repository_api(http, grpcc, client):
    cl = http if client == "http" else grpcc
    index = cl.get_model_repository_index(headers=AUTH_HTTP if client == "http" else AUTH_GRPC)
    rows = index if client == "http" else [{"name": m.name, "version": m.version, "state": m.state} for m in index.models]
    states = {(r["name"], r["version"]): r["state"] for r in rows}
    assert states[("cifar10", CIFAR)] == "READY" and states[("mnist", "1")] == "UNAVAILABLE" and states[("base", "")] == "READY"
    auth = AUTH_HTTP if client == "http" else AUTH_GRPC
    cl.load_model("mnist", headers=auth)
    assert cl.is_model_ready("mnist")
    cl.unload_model("mnist", headers=auth)
    assert not cl.is_model_ready("mnist")
    cl.unload_model("mnist", headers=auth)  # idempotent, as the protocol's unload is
    for headers in (None, {"authorization": "Bearer wrong-token-0123456789"}):
        with pytest.raises(InferenceServerException) as e:
            cl.load_model("mnist", headers=headers)
        assert e.value.status() in ("401", "StatusCode.UNAUTHENTICATED")
    assert not cl.is_model_ready("mnist")


# ------------------------------------------------------------------------ errors
def _http_error(fn) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        fn()
    return e.value.status(), e.value.message()


@pytest.mark.parametrize("client", ["http", "grpc"])
def test_bad_inputs_and_unknown_models(http, grpcc, photos, client):
    mod, cl = (httpclient, http) if client == "http" else (grpcclient, grpcc)
    bad = "400" if client == "http" else "StatusCode.INVALID_ARGUMENT"
    not_found = "404" if client == "http" else "StatusCode.NOT_FOUND"
    img = _image_input(mod, [photos["cat.png"]])
    status, msg = _http_error(lambda: cl.infer("no-such-adapter", [img]))
    assert status == not_found and "no-such-adapter" in msg
    assert _http_error(lambda: cl.get_model_metadata("no-such-adapter"))[0] == not_found
    assert _http_error(lambda: cl.infer("cifar10", [img], model_version="99"))[0] == not_found
    wrong = mod.InferInput("tensor", [1], "BYTES")
    wrong.set_data_from_numpy(np.array([b"x"], dtype=object))
    assert _http_error(lambda: cl.infer("cifar10", [wrong]))[0] == bad
    junk = _image_input(mod, [b"definitely not an image"])
    status, msg = _http_error(lambda: cl.infer("cifar10", [junk]))
    assert status == bad and "image" in msg
    f32 = mod.InferInput("pixels", [1, 2, 2, 3], "FP32")
    f32.set_data_from_numpy(np.zeros((1, 2, 2, 3), np.float32))
    assert _http_error(lambda: cl.infer("cifar10", [f32]))[0] == bad
    out = [mod.InferRequestedOutput("logits")]
    assert _http_error(lambda: cl.infer("cifar10", [img], outputs=out))[0] == bad
    many = _image_input(mod, [photos["cat.png"]] * (MAX_IMAGES + 1))
    assert _http_error(lambda: cl.infer("cifar10", [many]))[0] in ("413", "StatusCode.INVALID_ARGUMENT")
    huge = _pixels_input(mod, [np.zeros((1001, 1000, 3), np.uint8)])
    assert _http_error(lambda: cl.infer("cifar10", [huge]))[0] in ("413", "StatusCode.INVALID_ARGUMENT")
    assert cl.is_server_ready()  # and the server is fine after all that


@pytest.mark.parametrize("h, w, refused", [(10, 300, True), (300, 10, True), (10, 200, False)])  # the default limit is 20:1
def test_pixels_obey_the_aspect_ratio_rule_of_v1(server, grpcc, h, w, refused):
    """`pixels` go by the rule /v1 applies to files (the reference: a PNG of the same pixels on
    /v1/predict): 30:1 refused with /v1's code (400 on /v2, INVALID_ARGUMENT on gRPC), 20:1 served."""
    arr = np.full((h, w, 3), 128, np.uint8)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        v1 = c.post("/v1/predict", json={"adapter": "cifar10", "images": [base64.b64encode(_file(arr, "PNG")).decode()]})
        x = arr[None]
        v2 = c.post("/v2/models/cifar10/infer", json={"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]})
    assert (v1.status_code != 200) == refused, v1.text
    if not refused:
        assert v2.status_code == 200, v2.text
        grpcc.infer("cifar10", [_pixels_input(grpcclient, [arr])])
        return
    assert v1.status_code == 422 and v1.json()["error"]["code"] == "extreme_aspect_ratio"
    assert v2.status_code == 400 and v2.json()["code"] == "extreme_aspect_ratio" and isinstance(v2.json()["error"], str)
    status, msg = _http_error(lambda: grpcc.infer("cifar10", [_pixels_input(grpcclient, [arr])]))
    assert status == "StatusCode.INVALID_ARGUMENT" and msg.startswith("extreme_aspect_ratio")


def test_http_errors_have_the_protocol_shape(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v2/models/cifar10/infer", content=b"{not json")
        assert r.status_code == 400 and set(r.json()) == {"error", "code"} and r.json()["code"] == "invalid_json"
        r = c.post("/v2/models/no-such-adapter/infer", json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]})
        assert r.status_code == 404 and isinstance(r.json()["error"], str)
        r = c.post("/v2/repository/models/cifar10/load")  # the repository's writes need the token (its index is open)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        r = c.post("/v2/models/cifar10/infer", content=b"x" * (MAX_BODY + 1))  # the middleware's refusal, in the protocol's shape too
        assert r.status_code == 413 and r.json() == {"error": f"request body is over the {MAX_BODY}-byte limit", "code": "body_too_large"}


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_request_compression(http, photos, algorithm):
    """tritonclient's request_compression_algorithm (Content-Encoding on the body): the same answer
    as the uncompressed request."""
    plain = http.infer("cifar10", [_image_input(httpclient, [photos["cat.jpg"]])])
    packed = http.infer("cifar10", [_image_input(httpclient, [photos["cat.jpg"]])], request_compression_algorithm=algorithm)
    assert packed.as_numpy("label")[0] == b"cat"
    np.testing.assert_allclose(packed.as_numpy("probabilities"), plain.as_numpy("probabilities"), atol=1e-6)


def test_compressed_bodies_that_cannot_be_read(server):
    import zlib

    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v2/models/cifar10/infer", json=body, headers={"Content-Encoding": "gzip"})  # says gzip, is not
        assert r.status_code == 400 and r.json()["code"] == "invalid_compressed_body" and isinstance(r.json()["error"], str)
        r = c.post("/v2/models/cifar10/infer", json=body, headers={"Content-Encoding": "br"})
        assert r.status_code == 415 and r.json()["code"] == "unsupported_content_encoding" and isinstance(r.json()["error"], str)
        bomb = zlib.compress(bytes(10 * MAX_BODY), 9)  # ~80 kB on the wire, 80 MB inflated
        r = c.post("/v2/models/cifar10/infer", content=bomb, headers={"Content-Encoding": "deflate", "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json() == {"error": f"the decompressed request body is over the {MAX_BODY}-byte limit", "code": "body_too_large"}


def test_grpc_message_over_the_body_limit_is_refused(grpcc):
    big = grpcclient.InferInput("pixels", [3, 1000, 1000, 3], "UINT8")  # 9 MB > the 8 MB limit
    big.set_data_from_numpy(np.zeros((3, 1000, 1000, 3), np.uint8))
    status, _ = _http_error(lambda: grpcc.infer("cifar10", [big]))
    assert status == "StatusCode.RESOURCE_EXHAUSTED"
    assert grpcc.is_server_ready()


# ------------------------------------------------------------------------ one engine
def test_v1_and_grpc_requests_for_different_adapters_share_a_batch(server, grpcc, photos):
    """The batcher is one object: a /v1 request (cifar10) and a gRPC request (digits) released
    together land in one engine batch that holds both adapters (metalora_batch_adapters sees a 2)."""

    def hist():
        m = _metrics(server)
        return {dict(k)["le"]: v for (n, k), v in m.items() if n == "metalora_batch_adapters_bucket"}

    web = httpx.Client(base_url=server.url, timeout=60)
    body = {"adapter": "cifar10", "images": [base64.b64encode(photos["cat.png"]).decode()]}
    grpc_input = _image_input(grpcclient, [photos["cat.png"]])
    for attempt in range(5):  # both within the 150 ms batching window; a loaded machine can miss it
        go = threading.Barrier(2)

        def v1(go=go):
            go.wait()
            return web.post("/v1/predict", json=body).status_code

        def over_grpc(go=go):
            go.wait()
            return grpcc.infer("digits", [grpc_input]).as_numpy("label")

        before = hist()
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.submit(v1), pool.submit(over_grpc)
            assert a.result() == 200 and b.result() is not None
        after = hist()
        if after["+Inf"] - before["+Inf"] == 1:
            break
    web.close()
    assert after["+Inf"] - before["+Inf"] == 1, "the two requests ran in separate batches"
    assert after["1.0"] - before["1.0"] == 0, "that batch held one adapter only"


def test_metrics_count_v2_and_grpc_with_their_own_endpoints(server, http, grpcc, photos):
    http.infer("cifar10", [_image_input(httpclient, [photos["cat.png"]])])
    grpcc.infer("cifar10", [_image_input(grpcclient, [photos["cat.png"]])])
    m = _metrics(server)
    counts = {dict(k)["endpoint"]: v for (n, k), v in m.items() if n == "metalora_requests_total" and dict(k)["adapter"] == "cifar10" and dict(k)["code"] == "200"}
    assert counts.get("/v2/models/{model_name}/infer", 0) >= 1
    assert counts.get("/inference.GRPCInferenceService/ModelInfer", 0) >= 1
    errors = {dict(k)["endpoint"] for (n, k), v in m.items() if n == "metalora_requests_total" and dict(k)["code"] == "404"}
    assert "/inference.GRPCInferenceService/ModelInfer" in errors  # the unknown-model test's NOT_FOUND, counted as a 404


# ------------------------------------------------------------------------ overload over gRPC
def test_overload_is_unavailable_or_503_with_a_retry_hint(tmp_path, photos):
    """A 2-image queue held for 1.5 s: concurrent gRPC requests beyond it get UNAVAILABLE and the
    retry hint (retry-after, grpc-retry-pushback-ms), /v2 requests 503 with Retry-After in the
    protocol's shape, and the server recovers."""
    from service.grpc import proto

    pb = proto.messages()
    with ServerProcess(ROOT / "model_store", tmp_path / "tight.log", device="cpu", backend="torch", adapters="cifar10", max_queue=2, max_delay_ms=1500, max_batch_size=64, gallery_dir=tmp_path / "g") as srv:
        channel = grpc.insecure_channel(srv.grpc_url)
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString, response_deserializer=pb.ModelInferResponse.FromString)
        req = pb.ModelInferRequest(model_name="cifar10")
        req.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(photos["cat.png"])

        def one(_):
            try:
                infer(req, timeout=60)
                return "OK", {}
            except grpc.RpcError as e:
                return e.code().name, dict(e.trailing_metadata() or ())

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, range(8)))
        codes = [c for c, _ in outcomes]
        assert set(codes) <= {"OK", "UNAVAILABLE"} and 1 <= codes.count("OK") <= 2 and codes.count("UNAVAILABLE") >= 6, codes
        for code, md in outcomes:
            if code == "UNAVAILABLE":
                assert md.get("retry-after") == "1" and md.get("grpc-retry-pushback-ms") == "1000"
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(photos["cat.png"]).decode()]}]}

        def rest(_):
            return httpx.post(f"{srv.url}/v2/models/cifar10/infer", json=body, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(rest, range(8)))
        full = [r for r in answers if r.status_code == 503]
        assert len(full) >= 6 and {r.status_code for r in answers} <= {200, 503}, [r.status_code for r in answers]
        assert all(r.headers.get("retry-after") == "1" and r.json()["code"] == "overloaded" and isinstance(r.json()["error"], str) for r in full)
        time.sleep(0.1)
        assert one(0)[0] == "OK"
        channel.close()


# ------------------------------------------------------------------------ start-up
def test_grpc_port_held_by_another_server_fails_the_start(tmp_path):
    """grpcio binds with SO_REUSEPORT unless told not to: a second server on the same host would then
    share a gRPC port another server holds, and the kernel would spread clients over both. The holder
    here is a plain grpc server (SO_REUSEPORT on, as a second `metalora serve` of old would be); our
    server must refuse to start, naming the port, as uvicorn does for a busy HTTP port."""
    from service.launch import free_port

    port = free_port()
    holder = grpc.server(ThreadPoolExecutor(1))
    assert holder.add_insecure_port(f"127.0.0.1:{port}") == port
    holder.start()
    srv = ServerProcess(ROOT / "model_store", tmp_path / "busy.log", grpc_port=port, adapters="digits", warmup="false", gallery_dir=tmp_path / "g")
    try:
        with pytest.raises(RuntimeError, match=f"gRPC could not bind 127.0.0.1:{port}: the port is in use"):
            srv.start(timeout_s=180)
    finally:
        srv.stop()
        holder.stop(0)
