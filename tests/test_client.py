"""The Python client, CLI and load generator against a real `metalora serve` on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from bench.server import ServerProcess, build_store
from clients import APIError, AsyncMetaLoRAClient, MetaLoRAClient, OverloadedError, TransportError
from clients.cli import app as cli_app
from clients.cli import synthetic_images
from clients.loadgen import LoadSpec, parse_mix, run_load_sync

pytestmark = pytest.mark.timeout(600)
TOKEN = "client-test-token-0123456789"
ADAPTERS = {"alpha": ("cp", (4,), 5), "beta": ("lora", (4,), 3), "gamma": ("tr", (2, 2, 2), 4)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("clientstore"), ADAPTERS, gallery={"alpha": 12})


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    gal = tmp_path_factory.mktemp("galleries")
    with ServerProcess(store, backend="torch", admin_token=TOKEN, gallery_dir=gal, max_delay_ms=20, max_images=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def images():
    return synthetic_images(3)


def _raw(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=120)
    return r.status_code, r.json()


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def test_sync_results_equal_what_the_server_returns(server, images):
    with MetaLoRAClient(server.url) as c:
        got = c.predict(images, adapter=["alpha", "beta"], top_k=3)
        emb = c.embed(images[:2], adapter="gamma")
        knn = c.knn(images[:1], adapter="alpha", k=4)
    _, want = _raw(server, "/v1/predict", {"adapter": ["alpha", "beta"], "images": [_b64(i) for i in images], "top_k": 3})
    assert [r.model_dump() for r in got] == want["results"]
    assert len(got) == 6 and [r.adapter for r in got[:2]] == ["alpha", "beta"]
    _, want = _raw(server, "/v1/embed", {"adapter": "gamma", "images": [_b64(i) for i in images[:2]]})
    assert [r.model_dump() for r in emb] == want["results"] and emb[0].dim == 1280
    _, want = _raw(server, "/v1/knn", {"adapter": "alpha", "images": [_b64(images[0])], "k": 4})
    assert [r.model_dump() for r in knn] == want["results"] and len(knn[0].neighbors) == 4


def test_async_client_matches_sync(server, images, tmp_path):
    paths = []
    for i, b in enumerate(images):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(b)
        paths.append(p)

    async def go():
        async with AsyncMetaLoRAClient(server.url) as c:
            return await asyncio.gather(c.predict(paths, adapter="beta"), c.embed(paths[0], adapter="alpha"), c.ready(), c.adapters())

    pred, emb, ready, listing = asyncio.run(go())
    # The async calls ran concurrently and may share a batch: equal up to float rounding.
    with MetaLoRAClient(server.url) as c:
        sync_pred = c.predict(images, adapter="beta")
        sync_emb = c.embed(images[0], adapter="alpha")[0].embedding
    for a, b in zip(pred, sync_pred, strict=True):
        assert (a.adapter, a.version, [p.index for p in a.predictions]) == (b.adapter, b.version, [p.index for p in b.predictions])
        assert [p.score for p in a.predictions] == pytest.approx([p.score for p in b.predictions], abs=1e-5)
    assert emb[0].embedding == pytest.approx(sync_emb, abs=1e-5)
    assert ready.ready and {a.name for a in listing.adapters} == set(ADAPTERS)


def test_file_objects_and_pil_images_are_one_image_each(server, images, tmp_path):
    """A binary file object used to be iterated line by line (413 too_many_images), a PIL image
    raised 'not iterable'; now each is one image, and the server answers as for its bytes."""
    import io

    from PIL import Image

    with MetaLoRAClient(server.url) as c:
        want = c.predict(images[0], adapter="alpha", top_k=3)
        assert len(want) == 1
        got = c.predict(io.BytesIO(images[0]), adapter="alpha", top_k=3)
        assert [r.model_dump() for r in got] == [r.model_dump() for r in want]  # same batch of one: bit for bit
        p = tmp_path / "one.jpg"
        p.write_bytes(images[0])
        with open(p, "rb") as f:
            got = c.predict([f, str(p), p, bytearray(images[0])], adapter="alpha", top_k=3)
        assert len(got) == 4
        for r in got:  # a batch of four: equal up to float rounding
            assert [p.index for p in r.predictions] == [p.index for p in want[0].predictions]
            assert [p.score for p in r.predictions] == pytest.approx([p.score for p in want[0].predictions], abs=1e-5)
        pil = Image.open(io.BytesIO(images[1]))
        got = c.embed(pil, adapter="alpha")
        png = io.BytesIO()
        pil.save(png, "PNG")  # the client sends a PIL image as PNG (lossless)
        assert len(got) == 1 and got[0].embedding == pytest.approx(c.embed(png.getvalue(), adapter="alpha")[0].embedding, abs=1e-6)
        assert len(c.knn((io.BytesIO(images[0]), pil), adapter="alpha", k=2)) == 2


@pytest.mark.parametrize(
    "bad,words",
    [(3, "builtins.int"), ({"a": b""}, "builtins.dict"), ([1.5], "builtins.float"), ("io.StringIO", "binary mode")],
)
def test_anything_else_is_a_type_error_naming_it(server, bad, words):
    import io

    bad = io.StringIO("x") if bad == "io.StringIO" else bad
    with MetaLoRAClient(server.url) as c, pytest.raises(TypeError, match=words):
        c.predict(bad, adapter="alpha")


def test_gallery_vectors_and_adapter_admin(server):
    with MetaLoRAClient(server.url, admin_token=TOKEN) as c:
        info = c.adapter("alpha")
        assert info.versions[0].format == "cp" and info.versions[0].num_classes == 5
        before = c.gallery("alpha").items
        vec = [0.0] * 1280
        vec[7] = 1.0
        added = c.gallery_add("alpha", "probe-1", "c2", vector=vec)
        assert added.created and added.items == before + 1
        hits = c.knn(vectors=vec, adapter="alpha", k=3)[0]
        assert hits.neighbors[0].id == "probe-1" and hits.neighbors[0].score == pytest.approx(1.0, abs=1e-3)
        assert c.gallery_remove("alpha", "probe-1").items == before
        assert c.unload("gamma").unloaded
        assert "gamma@1" not in c.ready().loaded
        loaded = c.load("gamma")
        assert loaded.loaded and loaded.version == "1"


@pytest.mark.parametrize(
    "call,status,code",
    [
        (lambda c, im: c.predict(im, adapter="nope"), 404, "unknown_adapter"),
        (lambda c, im: c.predict([b"not an image"], adapter="alpha"), None, None),
        (lambda c, im: c.predict(im, adapter="alpha", top_k=10_000), 422, "invalid_top_k"),
        (lambda c, im: c.knn(vectors=[[1.0, 2.0]], adapter="alpha"), 422, "dim_mismatch"),
        (lambda c, im: c.load("alpha"), 401, None),
    ],
    ids=["unknown-adapter", "bad-image", "top-k", "vector-dim", "no-token"],
)
def test_errors_carry_the_servers_code_and_status(server, images, call, status, code):
    with MetaLoRAClient(server.url, admin_token="") as c:
        with pytest.raises(APIError) as ei:
            call(c, images[:1])
    e = ei.value
    assert 400 <= e.status < 500 and e.code and e.message
    assert e.body["error"]["code"] == e.code
    if status is not None:
        assert e.status == status
    if code is not None:
        assert e.code == code


def test_transport_error_when_nothing_listens():
    from bench.server import free_port

    with MetaLoRAClient(f"http://127.0.0.1:{free_port()}", timeout=2) as c:
        with pytest.raises(TransportError):
            c.health()


@pytest.fixture(scope="module")
def tight_server(store, tmp_path_factory):
    """A 2-image queue and a 1.5 s batching delay: the queue fills on demand; Retry-After is 1 s."""
    with ServerProcess(store, backend="torch", max_queue=2, max_delay_ms=1500, max_batch_size=64, retry_after_s=1, adapters="alpha", gallery_dir=tmp_path_factory.mktemp("g2")) as srv:
        yield srv


def _fill(server, images, n=2):
    """Occupy the queue with `n` raw requests (in threads) and wait until they are queued."""
    ts = [threading.Thread(target=_raw, args=(server, "/v1/predict", {"adapter": "alpha", "images": [_b64(images[0])]})) for _ in range(n)]
    for t in ts:
        t.start()
    time.sleep(0.5)
    return ts


def test_503_without_retries_raises_overloaded_with_retry_after(tight_server, images):
    ts = _fill(tight_server, images)
    with MetaLoRAClient(tight_server.url, retries=0) as c:
        with pytest.raises(OverloadedError) as ei:
            c.predict(images[:1], adapter="alpha")
    for t in ts:
        t.join()
    assert ei.value.status == 503 and ei.value.code == "overloaded" and ei.value.retry_after == 1.0


def test_503_is_retried_honouring_retry_after(tight_server, images):
    ts = _fill(tight_server, images)
    seen = []
    with MetaLoRAClient(tight_server.url, retries=8, backoff_s=0.05, on_retry=seen.append) as c:
        t0 = time.monotonic()
        res = c.predict(images[:1], adapter="alpha")
        elapsed = time.monotonic() - t0
    for t in ts:
        t.join()
    assert res[0].adapter == "alpha"
    assert seen, "the first attempt must have met a full queue"
    assert all(r.status == 503 and r.retry_after == 1.0 and r.wait_s >= 1.0 for r in seen)
    assert elapsed >= len(seen) * 1.0


def test_cli_predict_json_is_the_body_and_table_lists_adapters(server, images, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, b in enumerate(images):
        (d / f"{i}.jpg").write_bytes(b)
    (d / "notes.txt").write_text("not an image; directories only yield image files")
    r = CliRunner().invoke(cli_app, ["predict", "--url", server.url, "--adapter", "alpha", "--json", str(d)])
    assert r.exit_code == 0, r.output
    _, want = _raw(server, "/v1/predict", {"adapter": "alpha", "images": [_b64(b) for b in images], "top_k": 3})
    assert json.loads(r.output) == want
    r = CliRunner().invoke(cli_app, ["adapters", "--url", server.url])
    assert r.exit_code == 0 and all(n in r.output for n in ADAPTERS)
    r = CliRunner().invoke(cli_app, ["knn", "--url", server.url, "--adapter", "alpha", str(d / "0.jpg")])
    assert r.exit_code == 0 and "item" in r.output
    # every table names the version that answered, as predict's does
    version = _raw(server, "/v1/knn", {"adapter": "alpha", "images": [_b64(images[0])], "k": 1})[1]["results"][0]["version"]
    for cmd in ("knn", "embed", "predict"):
        r = CliRunner(env={"COLUMNS": "200"}).invoke(cli_app, [cmd, "--url", server.url, "--adapter", "alpha", str(d / "0.jpg")])
        assert r.exit_code == 0 and f"alpha@{version}" in r.output, (cmd, r.output)
    r = CliRunner(env={"METALORA_URL": server.url}).invoke(cli_app, ["predict", "--adapter", "nope", str(d / "0.jpg")])
    assert r.exit_code == 2 and "unknown_adapter" in r.output


def test_loadgen_closed_and_open_loop_report(server, images):
    closed = run_load_sync(LoadSpec(url=server.url, images=images, adapters=parse_mix(["alpha:3", "beta"]), concurrency=3, requests=9, duration_s=None))
    assert closed["ok"] == closed["sent"] == 9 and closed["errors"] == {} and closed["mode"] == "closed"
    lat = closed["latency_s"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and closed["throughput_rps"] > 0
    opened = run_load_sync(LoadSpec(url=server.url, images=images, adapters={"nope": 1.0}, concurrency=None, rate=20, requests=5, duration_s=None))
    assert opened["mode"] == "open" and opened["ok"] == 0 and opened["errors"] == {"404": 5}
    with pytest.raises(ValueError):
        LoadSpec(url=server.url, images=images, concurrency=2, rate=3.0)
