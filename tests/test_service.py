"""The service on a real uvicorn over loopback: outputs, mixed batches, adapters at run time,
overload and deadlines, bad inputs, admin token, gallery persistence across a restart.

The store is built here (the shipped backbone manifest + randomized adapters), so the tests do
not depend on trained bundles. Two servers: the main one and a tiny-queue one for overload.
"""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from metalora.adapters import Adapter, AdapterConfig
from metalora.backbones import create_backbone
from metalora.bundle import Gallery, save_bundle
from metalora.runtime import Runtime
from service.launch import ServerProcess, free_port

from .conftest import ROOT, randomize

TOKEN = "test-admin-token-0123456789"
MAX_PIXELS = 4_000_000
MAX_BODY = 2_000_000
ADAPTERS = {  # name -> (format, ranks, labels)
    "alpha": ("lora", (4,), [f"a{i}" for i in range(4)]),
    "beta": ("cp", (4,), [f"b{i}" for i in range(5)]),
    "gamma": ("tr", (2, 2, 2), [f"g{i}" for i in range(3)]),
}
pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------ fixtures
def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Four small photos from scikit-image, as JPEG and PNG files."""
    import skimage.data as sd

    photos = [sd.chelsea(), sd.astronaut(), sd.coffee(), sd.rocket()]
    return [_png(Image.fromarray(p).resize((120, 96)), "JPEG" if i % 2 else "PNG") for i, p in enumerate(photos)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A model store: the shipped backbone manifest plus randomized adapters (two versions of beta, a gallery on alpha, one corrupt bundle)."""
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(ROOT / "model_store" / "backbones", root / "backbones")
    bb = create_backbone("efficientnet_lite0", split=6)
    torch.manual_seed(0)
    for name, (fmt, ranks, labels) in ADAPTERS.items():
        versions = ["1", "2"] if name == "beta" else ["1"]
        for v in versions:
            ad = randomize(Adapter(bb, AdapterConfig(fmt, ranks, ["*"], labels=labels)), std=0.05)
            gallery = None
            if name == "alpha":
                emb = torch.nn.functional.normalize(torch.randn(6, bb.embed_dim), dim=1)
                gallery = Gallery(emb, torch.tensor([0, 1, 2, 3, 0, 1]), [f"seed{i}" for i in range(6)])
            save_bundle(root / "adapters" / name / v, ad, bb, name=name, version=v, gallery=gallery)
    ad = randomize(Adapter(bb, AdapterConfig("lora", (2,), ["conv_head"], labels=["x", "y"])))
    save_bundle(root / "adapters" / "broken" / "1", ad, bb, name="broken", version="1")
    w = root / "adapters" / "broken" / "1" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte: the sha256 check must catch it
    w.write_bytes(bytes(data))
    return root


class Server(ServerProcess):
    """The shared launcher (`service.launch`) pinned to CPU and the torch backend, plus helpers."""

    def __init__(self, store: Path, log: Path, **settings):
        super().__init__(store, log, device="cpu", backend="torch", **{"version_policy": "all", **settings})  # all: beta@1 beside beta@2

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    gal = tmp_path_factory.mktemp("galleries")
    srv = Server(
        store, store.parent / "server.log", admin_token=TOKEN, max_delay_ms=60, max_pixels=MAX_PIXELS, max_body_bytes=MAX_BODY, max_images=8, gallery_dir=gal, gallery_batch_max=4,
        adapters="alpha,beta@1,gamma", lru_capacity=4,
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(store):
    return Runtime(store, "cpu")


# ------------------------------------------------------------------------ tests
def test_health_ready_and_listing(server):
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and ready["backend"] == "torch" and set(ready["loaded"]) == {"alpha@1", "beta@1", "gamma@1"}
        listing = c.get("/v1/adapters").json()
        names = {a["name"]: a for a in listing["adapters"]}
        assert set(names) == {"alpha", "beta", "gamma", "broken"} and names["beta"]["versions"] == ["1", "2"]
        info = c.get("/v1/adapters/alpha").json()
        assert info["versions"][0]["labels"] == ADAPTERS["alpha"][2] and info["versions"][0]["loaded"]
        # Trained at the default cut (no `cut` in the manifest), served by a store cut at blocks[:4].
        assert info["versions"][0]["cut"] == "blocks[:6]" and listing["backbone"]["cut"] == "blocks[:4]"
        assert "/v1/predict" in c.get("/openapi.json").json()["paths"] and c.get("/docs").status_code == 200


def test_served_outputs_equal_in_process_model(server, reference, images):
    refs = ["base", "alpha", "beta@1", "gamma", "beta@2"]
    with server.client() as c:
        r = c.post("/v1/predict", json={"adapter": refs, "images": [_b64(b) for b in images], "top_k": 3})
        assert r.status_code == 200, r.text
        pred = r.json()["results"]
        e = c.post("/v1/embed", json={"adapter": refs, "images": [_b64(b) for b in images]})
        assert e.status_code == 200, e.text
        emb = e.json()["results"]
        multi = c.post("/v1/predict", files=[("images", ("a.png", images[0])), ("images", ("b.jpg", images[1]))], data={"adapter": "gamma", "top_k": "2"})
        assert multi.status_code == 200, multi.text
    assert len(pred) == len(images) * len(refs)
    x = reference.preprocess(images)
    for j, ref in enumerate(refs):
        key = reference.load(ref)
        out = reference.run(x, [key] * len(images))
        want_emb = torch.nn.functional.normalize(out.embeddings, dim=-1)
        for i in range(len(images)):
            got = pred[i * len(refs) + j]  # image-major: image i with every adapter in order
            assert got["adapter"] == ref.split("@")[0] and (ref == "base" or got["version"] == key.split("@")[1])
            probs = out.logits[i].softmax(-1)
            scores, idx = probs.topk(3)
            assert [p["index"] for p in got["predictions"]] == idx.tolist()
            np.testing.assert_allclose([p["score"] for p in got["predictions"]], scores.numpy(), atol=1e-4)
            labels = reference.labels(key)
            assert [p["label"] for p in got["predictions"]] == [labels[k] for k in idx.tolist()]
            ge = emb[i * len(refs) + j]
            assert ge["dim"] == 1280
            np.testing.assert_allclose(ge["embedding"], want_emb[i].numpy(), atol=1e-4)
    # the two betas differ: the pinned version is really the one served
    assert pred[2]["predictions"] != pred[4]["predictions"]
    gamma = reference.run(x[:2], [reference.load("gamma")] * 2)
    for i, res in enumerate(multi.json()["results"]):
        assert [p["index"] for p in res["predictions"]] == gamma.logits[i].topk(2).indices.tolist()


def test_include_seed_on_the_torch_backend(server, reference, images):
    """`include_seed`: c(x) per adapted layer, from the adapter's mapping network (the reference
    path: `Adapter.seeds` on the pooled prefix); null for lora (alpha) and base."""
    refs = ["base", "alpha", "beta@1", "gamma"]
    with server.client() as c:
        r = c.post("/v1/embed", json={"adapter": refs, "images": [_b64(b) for b in images[:2]], "include_seed": True})
        assert r.status_code == 200, r.text
        m = c.post("/v1/predict", files=[("images", ("a.png", images[0]))], data={"adapter": ["gamma", "beta@1"], "include_seed": "true"})
        assert m.status_code == 200, m.text
    res = r.json()["results"]
    x = reference.preprocess(images[:2])
    for j, ref in enumerate(refs):
        for i in range(2):
            got = res[i * len(refs) + j]["seed"]
            if ref in ("base", "alpha"):
                assert got is None
                continue
            adapter = reference.model.adapters[reference.load(ref)]
            # The bundles are cut at blocks[:6], the shipped store's backbone at blocks[:4]: the seed
            # is the mapping network on the features at the bundle's own cut.
            own = reference.backbone.at_cut(adapter.split)
            assert own.split == 6 and reference.backbone.split == 4
            with torch.inference_mode():
                f = own.pool_prefix(own.prefix(x))  # (2, 192)
            want = {k: v[i].numpy() for k, v in adapter.seeds(f).items()}
            assert list(got) == adapter.targets  # named by layer, in target order
            for layer, vals in got.items():
                np.testing.assert_allclose(vals, want[layer], atol=1e-4)
    assert m.json()["results"][0]["seed"] == res[3]["seed"]  # multipart: the same seed for the same image


def _hist(metrics: dict, name: str) -> dict[str, float]:
    return {dict(k)["le"]: v for (n, k), v in metrics.items() if n == name + "_bucket"}


def test_concurrent_requests_fuse_adapters_in_one_batch(server, images):
    before = _hist(server.metrics(), "metalora_batch_adapters")
    names = ["alpha", "beta", "gamma"]

    def one(i):
        with server.client() as c:
            return c.post("/v1/predict", json={"adapter": names[i % 3], "images": [_b64(images[i % len(images)])], "top_k": 1}).status_code

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(one, range(24)))
    assert codes == [200] * 24
    after = _hist(server.metrics(), "metalora_batch_adapters")
    batches = after["+Inf"] - before["+Inf"]
    single = after["1.0"] - before["1.0"]
    assert batches < 24, "requests were never batched together"
    assert batches - single >= 1, "no batch held more than one adapter"
    m = server.metrics()  # the frozen prefix ran once per batch, timed apart from the adapted rest
    assert m[("metalora_inference_seconds_count", (("stage", "prefix"),))] == m[("metalora_inference_seconds_count", (("stage", "forward"),))]


def test_load_unload_under_traffic_loses_no_request(server, images):
    stop = threading.Event()
    codes: list[int] = []

    def traffic(i):
        with server.client() as c:
            while not stop.is_set():
                codes.append(c.post("/v1/predict", json={"adapter": ["alpha", "beta"][i % 2], "images": [_b64(images[i % 4])], "top_k": 1}).status_code)

    auth = {"Authorization": f"Bearer {TOKEN}"}
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(traffic, i) for i in range(4)]
        with server.client(headers=auth) as c:
            for _ in range(4):
                time.sleep(0.3)
                r = c.post("/v1/adapters/alpha/unload")
                assert r.status_code in (200, 404), r.text  # 404: a request had not yet brought it back
                time.sleep(0.3)
                assert c.post("/v1/adapters/alpha/load").status_code == 200
        stop.set()
        for f in futs:
            f.result()
    assert len(codes) >= 8 and set(codes) == {200}, codes


def test_admin_token_is_checked(server):
    with server.client() as c:
        r = c.post("/v1/adapters/gamma/load")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = c.post("/v1/adapters/gamma/load", headers={"Authorization": "Bearer wrong-token-wrong-token"})
        assert r.status_code == 401
        r = c.put("/v1/adapters/alpha/gallery/x1", json={"label": "a0", "vector": [1.0] * 1280})
        assert r.status_code == 401
        r = c.post("/v1/adapters/gamma/load", headers={"Authorization": f"Bearer {TOKEN}"}, params={"pin": "true"})
        assert r.status_code == 200 and r.json()["pinned"] is True


def _bomb() -> bytes:
    return _png(Image.new("1", (2500, 2500)))  # 6.25 Mpx in a few hundred bytes


BAD = [
    # (id, method, path, request kwargs, status, code)
    ("unknown-adapter", "post", "/v1/predict", dict(json={"adapter": "nope", "images": ["AAAA"]}), 404, "unknown_adapter"),
    ("unknown-version", "post", "/v1/predict", dict(json={"adapter": "beta@9", "images": ["AAAA"]}), 404, "unknown_adapter"),
    ("bad-adapter-name", "post", "/v1/predict", dict(json={"adapter": "../etc", "images": ["AAAA"]}), 422, "invalid_name"),
    ("top-k-zero", "post", "/v1/predict", dict(json={"adapter": "base", "images": ["AAAA"], "top_k": 0}), 422, "invalid_request"),
    ("top-k-huge", "post", "/v1/predict", dict(json={"adapter": "base", "images": ["AAAA"], "top_k": 100000}), 422, "invalid_top_k"),
    ("no-images", "post", "/v1/predict", dict(json={"adapter": "base", "images": []}), 422, "invalid_request"),
    ("extra-field", "post", "/v1/predict", dict(json={"adapter": "base", "images": ["AAAA"], "topk": 3}), 422, "invalid_request"),
    ("not-json", "post", "/v1/predict", dict(content=b"{not json", headers={"content-type": "application/json"}), 422, "invalid_json"),
    ("wrong-media-type", "post", "/v1/predict", dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    ("not-base64", "post", "/v1/predict", dict(json={"adapter": "base", "images": ["***"]}), 422, "invalid_base64"),
    ("empty-image", "post", "/v1/predict", dict(json={"adapter": "base", "images": [""]}), 422, "empty_image"),
    ("text-not-image", "post", "/v1/predict", dict(json={"adapter": "base", "images": [_b64(b"just some text")]}), 415, "undecodable_image"),
    ("truncated-png", "post", "/v1/predict", dict(json={"adapter": "base", "images": [_b64(_png(Image.new("RGB", (64, 64), "red"))[:60])]}), 422, "undecodable_image"),
    ("unsupported-format", "post", "/v1/predict", dict(json={"adapter": "base", "images": [_b64(_png(Image.new("RGB", (32, 32)), "ICO"))]}), 415, "unsupported_image"),
    ("pixel-bomb", "post", "/v1/predict", dict(json={"adapter": "base", "images": [_b64(_bomb())]}), 413, "image_too_large"),
    ("body-too-large", "post", "/v1/predict", dict(json={"adapter": "base", "images": ["A" * (MAX_BODY + 8)]}), 413, "body_too_large"),
    ("too-many-images", "post", "/v1/predict", dict(json={"adapter": "base", "images": ["AAAA"] * 9}), 413, "too_many_images"),
    ("multipart-no-file", "post", "/v1/predict", dict(data={"adapter": "base"}, files={"other": ("x.txt", b"x")}), 422, "invalid_request"),
    ("bad-timeout-header", "post", "/v1/predict", dict(json={"adapter": "base", "images": ["AAAA"]}, headers={"X-Timeout-Ms": "soon"}), 422, "invalid_timeout"),
    ("knn-images-and-vectors", "post", "/v1/knn", dict(json={"adapter": "alpha", "images": ["AAAA"], "vectors": [[1.0]]}), 422, "invalid_request"),
    ("knn-wrong-dim", "post", "/v1/knn", dict(json={"adapter": "alpha", "vectors": [[1.0, 2.0]]}), 422, "dim_mismatch"),
    ("knn-nan", "post", "/v1/knn", dict(content=b'{"adapter": "alpha", "vectors": [[NaN' + b", 1.0" * 1279 + b"]]}", headers={"content-type": "application/json"}), 422, "invalid_vector"),
    ("knn-base", "post", "/v1/knn", dict(json={"adapter": "base", "vectors": [[1.0]]}), 422, "no_gallery"),
    ("knn-empty-gallery", "post", "/v1/knn", dict(json={"adapter": "gamma", "vectors": [[1.0] * 1280]}), 409, "gallery_empty"),
    ("knn-k-zero", "post", "/v1/knn", dict(json={"adapter": "alpha", "vectors": [[1.0] * 1280], "k": 0}), 422, "invalid_request"),
    ("corrupt-bundle", "post", "/v1/predict", dict(json={"adapter": "broken", "images": [_b64(_png(Image.new("RGB", (32, 32), "blue")))]}), 409, "checksum_mismatch"),
    ("corrupt-bundle-load", "post", "/v1/adapters/broken/load", dict(headers={"Authorization": f"Bearer {TOKEN}"}), 409, "checksum_mismatch"),
    ("unload-not-loaded", "post", "/v1/adapters/broken/unload", dict(headers={"Authorization": f"Bearer {TOKEN}"}), 404, "not_loaded"),
    ("gallery-unknown-label", "put", "/v1/adapters/alpha/gallery/q1", dict(json={"label": "zebra", "vector": [1.0] * 1280}, headers={"Authorization": f"Bearer {TOKEN}"}), 422, "unknown_label"),
    ("gallery-bad-id", "put", "/v1/adapters/alpha/gallery/..bad", dict(json={"label": "a0", "vector": [1.0] * 1280}, headers={"Authorization": f"Bearer {TOKEN}"}), 422, "invalid_request"),
    ("gallery-delete-missing", "delete", "/v1/adapters/alpha/gallery/ghost", dict(headers={"Authorization": f"Bearer {TOKEN}"}), 404, "unknown_item"),
    ("gallery-batch-too-many", "post", "/v1/adapters/alpha/gallery", dict(json={"items": [{"id": f"b{i}", "label": "a0", "vector": [1.0]} for i in range(5)]}, headers={"Authorization": f"Bearer {TOKEN}"}), 413, "too_many_items"),
    ("gallery-batch-duplicate", "post", "/v1/adapters/alpha/gallery", dict(json={"items": [{"id": "b1", "label": "a0", "vector": [1.0] * 1280}] * 2}, headers={"Authorization": f"Bearer {TOKEN}"}), 422, "duplicate_id"),
    ("gallery-batch-bad-vector", "post", "/v1/adapters/alpha/gallery", dict(json={"items": [{"id": "b1", "label": "a0", "vector": [1.0] * 1280}, {"id": "b2", "label": "a0", "vector": [0.0] * 1280}]}, headers={"Authorization": f"Bearer {TOKEN}"}), 422, "invalid_vector"),
    ("gallery-batch-empty", "post", "/v1/adapters/alpha/gallery", dict(json={"items": []}, headers={"Authorization": f"Bearer {TOKEN}"}), 422, "invalid_request"),
    ("gallery-batch-no-token", "post", "/v1/adapters/alpha/gallery", dict(json={"items": [{"id": "b1", "label": "a0", "vector": [1.0] * 1280}]}), 401, "unauthorized"),
    ("unknown-route", "get", "/v1/nothing", {}, 404, "not_found"),
    ("wrong-method", "get", "/v1/predict", {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize("method,path,kw,status,code", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input_gets_its_status_and_code(server, method, path, kw, status, code):
    with server.client() as c:
        r = getattr(c, method)(path, **kw) if method != "delete" else c.request("DELETE", path, **kw)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code and body["error"]["message"]


def test_streamed_body_over_the_limit_is_413(server):
    def chunks():  # no Content-Length: the limit must hold on the streamed size
        yield b'{"adapter": "base", "images": ["'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"A" * 65536
        yield b'"]}'

    with server.client() as c:
        r = c.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_multipart_with_too_many_files_is_refused(server, images):
    with server.client() as c:
        r = c.post("/v1/predict", files=[("images", (f"{i}.png", images[0])) for i in range(9)], data={"adapter": "base"})
        many = c.post("/v1/predict", files=[("images", (f"{i}.png", images[0])) for i in range(30)], data={"adapter": "base"})
    # one over max_images (8) is the data plane's 413, as for JSON; far over it the form parser stops reading
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images", r.text
    assert many.status_code in (413, 422) and many.json()["error"]["code"] in ("too_many_images", "invalid_multipart"), many.text


def test_server_stays_healthy_after_bad_inputs(server, images):
    with server.client() as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        r = c.post("/v1/predict", json={"adapter": ["alpha", "gamma"], "images": [_b64(images[0])]})
        assert r.status_code == 200 and len(r.json()["results"]) == 2
    metrics = server.metrics()
    assert not [k for k, v in metrics.items() if k[0] == "metalora_requests_total" and dict(k[1])["code"] == "500" and v]
    labels = {dict(k[1]).get("adapter") for k in metrics if k[0] == "metalora_requests_total"}
    assert "nope" not in labels and "other" in labels and {"alpha", "base"} <= labels  # unknown names never get a series


@pytest.mark.slow
def test_gallery_add_remove_persists_across_restart(server, images):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with server.client(headers=auth) as c:
        assert c.get("/v1/adapters/alpha/gallery").json()["items"] == 6
        r = c.put("/v1/adapters/alpha/gallery/cat-photo", json={"label": "a2", "image": _b64(images[0])})
        assert r.status_code == 200 and r.json()["created"] and r.json()["items"] == 7
        assert c.request("DELETE", "/v1/adapters/alpha/gallery/seed0").json()["items"] == 6
        hit = c.post("/v1/knn", json={"adapter": "alpha", "images": [_b64(images[0])], "k": 3}).json()["results"][0]
        assert hit["neighbors"][0]["id"] == "cat-photo" and hit["neighbors"][0]["score"] > 0.999
        assert sum(hit["votes"].values()) == 3 and hit["label"] in hit["votes"]
    server.stop()
    server.start()
    with server.client() as c:
        info = c.get("/v1/adapters/alpha/gallery").json()
        assert info["items"] == 6 and info["source"] == "edited" and info["labels"]["a2"] == 2
        vec = c.post("/v1/embed", json={"adapter": "alpha", "images": [_b64(images[0])]}).json()["results"][0]["embedding"]
        hits = c.post("/v1/knn", json={"adapter": "alpha", "vectors": [vec], "k": 10}).json()["results"][0]["neighbors"]
        assert hits[0]["id"] == "cat-photo" and "seed0" not in {h["id"] for h in hits} and len(hits) == 6


@pytest.fixture(scope="module")
def tight_server(store, tmp_path_factory):
    """A 4-image queue and a 1.5 s batching delay: overload, deadlines and deferred unloads on demand."""
    srv = Server(store, store.parent / "tight.log", admin_token=TOKEN, max_queue=4, max_delay_ms=1500, max_batch_size=64, adapters="alpha", gallery_dir=tmp_path_factory.mktemp("g2")).start()
    yield srv
    srv.stop()


def test_admin_routes_refused_without_configured_token(tmp_path):
    """A server with no token (uvicorn in a thread, a store with no adapters) refuses admin routes with 403."""
    import uvicorn

    from service.http.app import create_app
    from service.settings import Settings

    shutil.copytree(ROOT / "model_store" / "backbones", tmp_path / "backbones")
    port = free_port()
    settings = Settings(store=tmp_path, port=port, grpc_port=0, device="cpu", backend="torch", admin_token=None, warmup=False, gallery_dir=tmp_path / "g")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        r = httpx.post(url + "/v1/adapters/alpha/load", headers={"Authorization": "Bearer anything-at-all-here"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        r = httpx.request("DELETE", url + "/v1/adapters/alpha/gallery/x")
        assert r.status_code == 403
        assert httpx.get(url + "/readyz").json()["loaded"] == []  # zero adapters: base only
    finally:
        server.should_exit = True
        thread.join(30)


def test_unload_of_a_busy_adapter_is_deferred_and_the_request_succeeds(tight_server, images):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with tight_server.client(headers=auth) as c:
        assert c.post("/v1/adapters/alpha/load").status_code == 200
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(c.post, "/v1/predict", json={"adapter": "alpha", "images": [_b64(images[1])]})
            time.sleep(0.5)  # the request now waits in the batcher (1.5 s delay)
            r = c.post("/v1/adapters/alpha/unload")
            assert r.status_code == 200 and r.json()["deferred"] is True
            res = fut.result()
        assert res.status_code == 200 and res.json()["results"][0]["adapter"] == "alpha"
        assert "alpha@1" not in c.get("/readyz").json()["loaded"]  # gone once the request was done


def test_deadline_expired_is_504_and_never_computed(tight_server, images):
    before = tight_server.metrics()
    with tight_server.client() as c:
        r = c.post("/v1/predict", json={"adapter": "alpha", "images": [_b64(images[0])]}, headers={"X-Timeout-Ms": "200"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    after = tight_server.metrics()
    key = ("metalora_rejected_total", (("reason", "deadline"),))
    assert after[key] - before.get(key, 0) == 1
    batches = ("metalora_batch_size_count", ())
    assert after[batches] == before[batches], "an expired item reached the engine"


def test_full_queue_answers_503_with_retry_after(tight_server, images):
    def one(i):
        with tight_server.client() as c:
            return c.post("/v1/predict", json={"adapter": "alpha", "images": [_b64(images[i % 4])]})

    with ThreadPoolExecutor(10) as pool:
        rs = list(pool.map(one, range(10)))
    codes = sorted(r.status_code for r in rs)
    assert set(codes) <= {200, 503} and 1 <= codes.count(200) <= 4 and codes.count(503) >= 6, codes
    full = [r for r in rs if r.status_code == 503]
    assert all(r.headers.get("retry-after") == "1" and r.json()["error"]["code"] == "overloaded" for r in full)
    with tight_server.client() as c:  # and it recovers
        assert c.post("/v1/predict", json={"adapter": "alpha", "images": [_b64(images[0])]}).status_code == 200


def test_lru_evicts_least_recently_used_never_pinned_or_busy(store):
    """The registry over a real Runtime: capacity 2, one pinned; eviction order, deferral and revival."""
    import asyncio

    from service.adapters import AdapterRegistry
    from service.metrics import Metrics

    async def scenario():
        reg = AdapterRegistry(Runtime(store, "cpu"), Metrics(), capacity=2)
        await reg.load("alpha", pin=True)
        beta = await reg.acquire("beta@1", 1)  # busy: one image in flight
        assert reg.loaded() == ["alpha@1", "beta@1"]
        await reg.acquire("gamma", 1)  # over capacity: alpha is pinned, beta busy -> beta goes when done
        assert set(reg.loaded()) == {"alpha@1", "beta@1", "gamma@1"} and beta.unload_pending
        assert "beta@1" in reg.runtime.model.adapters
        reg.release(beta)
        assert set(reg.loaded()) == {"alpha@1", "gamma@1"} and "beta@1" not in reg.runtime.model.adapters
        await reg.acquire("beta@2", 1)  # gamma (busy) is the only unpinned candidate: deferred
        assert reg.entries["gamma@1"].unload_pending
        await reg.acquire("gamma", 1)  # used again before it went: the eviction is called off
        assert not reg.entries["gamma@1"].unload_pending
        entry, deferred = reg.unload("alpha")
        assert not deferred and "alpha@1" not in reg.loaded()

    asyncio.run(scenario())


def test_knn_vote_is_similarity_weighted():
    from service.knn import Hit, vote

    hits = [Hit("a", "cat", 0.9), Hit("b", "dog", 0.3), Hit("c", "dog", 0.3), Hit("d", "cat", 0.2)]
    assert vote(hits) == ("cat", {"cat": 2, "dog": 2})
    assert vote([Hit("a", "cat", 0.5), Hit("b", "dog", 0.3), Hit("c", "dog", 0.3)])[0] == "dog"
    assert vote([]) == (None, {})


@pytest.mark.parametrize("exact_max,kind", [(1000, "flat"), (10, "hnsw")])
def test_knn_index_exact_then_approximate_above_the_threshold(exact_max, kind):
    from service.knn import KnnIndex

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((200, 32)).astype(np.float32)
    g = Gallery(torch.from_numpy(vecs), torch.from_numpy(rng.integers(0, 3, 200)), [f"i{j}" for j in range(200)])
    index = KnnIndex("toy@1", ["a", "b", "c"], g, 32, exact_max, "bundle")
    assert index.kind == kind
    hits = index.search(vecs[[5, 17]] * 3.0, 4)  # any norm: queries are normalised
    assert [h[0].id for h in hits] == ["i5", "i17"] and all(abs(h[0].score - 1) < 1e-5 for h in hits)
    assert all(h[i].score >= h[i + 1].score for h in hits for i in range(3))
    assert index.apply([("new", 2, vecs[0] + 0.01)]) == [True] and len(index) == 201
    index.wait_compaction()
    assert index.kind == kind
    index.apply(deletes=["i5"])
    assert index.search(vecs[5:6], 1)[0][0].id != "i5" and len(index) == 200
