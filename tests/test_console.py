"""The web console (issue 15): gallery thumbnails in bundles and over HTTP, `include_seed`, and the
page itself driven in a real Chromium (Debian's package) by Playwright, against a real server on
the shipped model store.

Set METALORA_UPDATE_SCREENSHOT=1 to write the README's screenshot (docs/console.png) from the run.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clients import MetaLoRAClient
from metalora.bundle import BundleError, Gallery, load_gallery, read_manifest, verify_files
from metalora.runtime import Runtime
from metalora.thumbnails import THUMBNAIL_SIZE, make_thumbnail
from service.launch import ServerProcess

from .conftest import run_metalora

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "model_store"
# Where the shipped manifests say cifar10's training images are (relative to the repository root):
# `metalora thumbnails` makes the gallery pictures from there. Without it there are no pictures.
CIFAR_TRAIN = ROOT.parent / "shared" / "data" / "cifar10" / "train.zip"
HAVE_PICTURES = CIFAR_TRAIN.is_file()


def _latest(name: str) -> tuple[str, Path]:
    """(version, path) of the version a plain `name` resolves to in the shipped store."""
    from metalora.store import ModelStore

    _, version, path = ModelStore(STORE).resolve(name)
    return version, path
TOKEN = "console-test-token-0123456789"
CAT_CLASSES = {"tiger cat", "Egyptian cat", "tabby", "Persian cat", "Siamese cat"}  # ImageNet-1k's domestic cats
pytestmark = pytest.mark.timeout(600)


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cat() -> bytes:
    import skimage.data

    return _jpeg(skimage.data.chelsea())  # (300, 451, 3): the README's cat


# ------------------------------------------------------------------------ the bundle format
def test_gallery_thumbnails_round_trip_and_old_galleries_still_load(tmp_path):
    emb, labels = torch.randn(3, 4), torch.tensor([0, 1, 0])
    thumbs = [make_thumbnail(Image.new("RGB", (100, 50), "red")), None, make_thumbnail(Image.new("RGB", (10, 10), "blue"))]
    g = Gallery.from_tensors(Gallery(emb, labels, ["a", "b/c", "d"], thumbs).to_tensors())
    assert g.thumbnails == thumbs and g.ids == ["a", "b/c", "d"]
    im = Image.open(io.BytesIO(g.thumbnails[0]))
    assert im.format == "WEBP" and im.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE // 2)  # aspect kept, long side 64
    assert Image.open(io.BytesIO(g.thumbnails[2])).size == (10, 10)  # never enlarged
    old = Gallery(emb, labels, ["a", "b", "c"]).to_tensors()  # the layout before thumbnails
    assert set(old) == {"embeddings", "labels", "ids_utf8"} and Gallery.from_tensors(old).thumbnails is None
    bad = Gallery(emb, labels, ["a", "b", "c"], thumbs).to_tensors()
    bad["thumbnail_offsets"][1] = 10**9  # an offset past the blob
    with pytest.raises(BundleError, match="thumbnails"):
        Gallery.from_tensors(bad)


SHIPPED = sorted(str(p.relative_to(STORE / "adapters")) for p in (STORE / "adapters").glob("*/*") if (p / "manifest.json").is_file())


@pytest.mark.parametrize("bundle", SHIPPED)
def test_shipped_galleries_carry_no_dataset_images(bundle):
    """The repository holds no copies of the data sets' images: shipped galleries carry embeddings,
    labels and ids only; `metalora thumbnails` makes the pictures at install time."""
    path = STORE / "adapters" / bundle
    manifest = read_manifest(path)
    verify_files(path, manifest)  # the manifest's sha256 covers the rewritten gallery
    g = load_gallery(path, manifest)
    assert g.thumbnails is None and len(g.ids) == manifest["training"]["gallery_items"]


@pytest.mark.slow
def test_thumbnails_command_writes_sidecars_from_the_training_data(tmp_path):
    """`metalora thumbnails` on the shipped digits bundle (its data is scikit-learn's, on every
    machine): one WebP per gallery item, the item's own image; files already there are kept."""
    from metalora.data import DataSpec, list_items
    from metalora.thumbnails import sidecar_path

    version, path = _latest("digits")
    manifest = read_manifest(path)
    ids = load_gallery(path, manifest).ids
    root = tmp_path / "galleries"
    kept = sidecar_path(root, "digits", version, ids[3])
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"")  # a tombstone the service wrote: the item was replaced by a bare vector
    r = run_metalora("thumbnails", "digits", "--gallery-dir", str(root))
    assert r.returncode == 0, r.stderr
    assert f"digits@{version}: {len(ids) - 1} written, 1 kept, 0 not found" in r.stdout
    assert kept.read_bytes() == b""
    src = {it.id: it.read() for it in list_items(DataSpec.parse(manifest["training"]["data"][0]))}
    for item_id in ids[::50]:
        if item_id == ids[3]:
            continue
        im = Image.open(sidecar_path(root, "digits", version, item_id))
        assert im.format == "WEBP"
        small = np.asarray(im.convert("L"), dtype=float)
        want = np.asarray(Image.open(io.BytesIO(src[item_id])).convert("L"), dtype=float)
        assert small.shape == want.shape == (8, 8) and np.abs(small - want).mean() < 20, item_id
    again = run_metalora("thumbnails", "digits", "--gallery-dir", str(root))
    assert again.returncode == 0 and "up to date" in again.stdout
    # A bundle whose data is not on this machine: a clear error, or a skip when asked.
    missing = run_metalora("thumbnails", "cifar10", "--gallery-dir", str(root), "--data-root", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    skipped = run_metalora("thumbnails", "cifar10", "--gallery-dir", str(root), "--data-root", str(tmp_path / "nowhere"), "--if-available")
    assert skipped.returncode == 0 and "skipped" in skipped.stdout
    assert run_metalora("thumbnails", "../etc", "--gallery-dir", str(root)).returncode != 0
    # Where it cannot write, and a store that is not one (also through METALORA_STORE, as the service reads it).
    afile = tmp_path / "afile"
    afile.write_text("x")
    blocked = run_metalora("thumbnails", "digits", "--gallery-dir", str(afile))
    assert blocked.returncode == 1 and "cannot write thumbnails" in blocked.stderr and "Traceback" not in blocked.stderr + blocked.stdout
    blocked = run_metalora("thumbnails", "digits", "--gallery-dir", str(afile), "--if-available")
    assert blocked.returncode == 1 and "cannot write thumbnails" in blocked.stderr  # not "data missing": the data is here
    for how in ({"args": ("--store", str(tmp_path / "nostore"))}, {"env": {"METALORA_STORE": str(tmp_path / "nostore")}}):
        r = run_metalora("thumbnails", *how.get("args", ()), "--gallery-dir", str(root), env=how.get("env"))
        assert r.returncode == 1 and "is not a model store" in r.stderr, how


def test_shipped_store_fits_its_size_limit():
    total = sum(f.stat().st_size for f in STORE.rglob("*") if f.is_file() and "galleries" not in f.parts)
    assert total <= 60_000_000, f"model_store holds {total / 1e6:.1f} MB, the limit is 60 MB"


# ------------------------------------------------------------------------ one real server on the shipped store
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    # backend onnx: the seed test checks OrtRunner's seeds here (tests/test_service.py checks the torch backend's)
    if HAVE_PICTURES:  # the install step that gives cifar10's gallery items their pictures
        r = run_metalora("thumbnails", "cifar10", "--gallery-dir", str(tmp / "galleries"))
        assert r.returncode == 0, r.stderr
    srv = ServerProcess(STORE, tmp / "server.log", backend="onnx", gallery_dir=tmp / "galleries", admin_token=TOKEN, adapters="cifar10,mnist,mixed", lru_capacity=4)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference() -> Runtime:
    return Runtime(STORE, "cpu")


def _seed_reference(rt: Runtime, key: str, image: bytes) -> dict[str, list[float]]:
    """c(x) straight from the adapter's mapping network (the library's reference path)."""
    rt.load(key)
    adapter = rt.model.adapters[key]
    bb = rt.backbone.at_cut(adapter.split)  # the cut the bundle was trained at (the store's prefix may end earlier)
    with torch.inference_mode():
        h = bb.prefix(rt.preprocess([image]))  # (1, C, H, W)
        return {k: v[0].tolist() for k, v in adapter.seeds(bb.pool_prefix(h)).items()}


@pytest.mark.slow
def test_include_seed_per_layer_matches_the_mapping_network(server, reference, cat):
    adapters = ["base", "cifar10", "mnist", "mixed"]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        assert {k: c.get("/readyz").json()[k] for k in ("backend", "precision")} == {"backend": "onnx", "precision": "fp32"}  # the default
        plain = c.post("/v1/predict", json={"adapter": "cifar10", "images": [base64.b64encode(cat).decode()]}).json()
        assert "seed" not in plain["results"][0]  # only when asked for
        for route in ("/v1/predict", "/v1/embed"):
            r = c.post(route, files=[("images", ("cat.jpg", cat, "image/jpeg"))], data={"adapter": adapters, "include_seed": "true"})
            assert r.status_code == 200, r.text
            got = {res["adapter"]: res["seed"] for res in r.json()["results"]}
            assert got["base"] is None  # the frozen backbone has no mapping network
            for name in ("cifar10", "mnist", "mixed"):
                version, path = _latest(name)
                manifest = read_manifest(path)
                want = _seed_reference(reference, f"{name}@{version}", cat)
                assert list(got[name]) == manifest["resolved_targets"]  # named, in target order
                fmt, ranks = manifest["adapter"]["format"], manifest["adapter"]["ranks"]
                per_layer = ranks[2] * ranks[0] if fmt == "tr" else ranks[0]  # DESIGN.md §2: C is R3×R1; cp: R
                for layer, vals in got[name].items():
                    assert len(vals) == per_layer
                    np.testing.assert_allclose(vals, want[layer], atol=2e-3, rtol=1e-3)
    # The Python client: the same seeds with include_seed=True, and none without.
    with MetaLoRAClient(server.url) as client:
        seeded = client.embed(cat, adapter=["cifar10", "base"], include_seed=True)
        assert seeded[0].seed == got["cifar10"] and seeded[1].seed is None and "seed" in seeded[1].model_dump()
        assert "seed" not in client.predict(cat, adapter="cifar10")[0].model_dump()


@pytest.mark.slow
def test_thumbnail_route_etag_and_gallery_edits(server, cat):
    version, path = _latest("cifar10")
    g = load_gallery(path, read_manifest(path))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        r = c.get(f"/v1/adapters/cifar10/gallery/{g.ids[7]}/thumbnail")  # ids hold '/': train/<class>/<file>
        if HAVE_PICTURES:  # the picture `metalora thumbnails` made: that training image, at 32 px
            assert r.status_code == 200 and r.headers["content-type"] == "image/webp", r.text
            with zipfile.ZipFile(CIFAR_TRAIN) as z:
                want = np.asarray(Image.open(io.BytesIO(z.read(g.ids[7]))).convert("RGB"), dtype=float)
            got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=float)
            assert got.shape == want.shape == (32, 32, 3) and np.abs(got - want).mean() < 12
            assert "max-age" in r.headers["cache-control"] and r.headers["etag"]
            again = c.get(f"/v1/adapters/cifar10@{version}/gallery/{g.ids[7].replace('/', '%2F')}/thumbnail", headers={"If-None-Match": r.headers["etag"]})
            assert again.status_code == 304 and not again.content
        else:  # no install step without the data: the item is there, its picture is not
            assert r.status_code == 404 and r.json()["error"]["code"] == "no_thumbnail"
        missing = c.get("/v1/adapters/cifar10/gallery/train/cat/nope.jpg/thumbnail")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_item"
        assert c.get("/v1/adapters/base/gallery/x/thumbnail").json()["error"]["code"] == "no_gallery"

        put = c.put("/v1/adapters/cifar10/gallery/my-cat", headers=auth, json={"label": "cat", "image": base64.b64encode(cat).decode()})
        assert put.status_code == 200, put.text
        t = c.get("/v1/adapters/cifar10/gallery/my-cat/thumbnail")
        assert t.status_code == 200
        small = Image.open(io.BytesIO(t.content)).convert("RGB")
        assert small.size == (64, 43)  # 451×300 scaled to fit 64 px
        ref = np.asarray(Image.open(io.BytesIO(cat)).convert("RGB").resize(small.size, Image.Resampling.LANCZOS), dtype=float)
        assert np.abs(np.asarray(small, dtype=float) - ref).mean() < 12  # the cat, up to WebP's loss

        vec = c.post("/v1/embed", json={"adapter": "cifar10", "images": [base64.b64encode(cat).decode()]}).json()["results"][0]["embedding"]
        assert c.put("/v1/adapters/cifar10/gallery/my-cat", headers=auth, json={"label": "cat", "vector": vec}).status_code == 200
        none = c.get("/v1/adapters/cifar10/gallery/my-cat/thumbnail")  # replaced by a bare vector: no picture
        assert none.status_code == 404 and none.json()["error"]["code"] == "no_thumbnail"
        assert c.delete("/v1/adapters/cifar10/gallery/my-cat", headers=auth).status_code == 200
        assert c.get("/v1/adapters/cifar10/gallery/my-cat/thumbnail").json()["error"]["code"] == "unknown_item"


@pytest.mark.slow
def test_bundle_items_replaced_by_a_vector_or_deleted_get_no_picture_back(server):
    """Replacing a bundle item by a vector, or deleting it, before `metalora thumbnails` runs: the
    run must not give either its old picture back (digits: its data is scikit-learn's, no ../shared)."""
    version, path = _latest("digits")
    ids = load_gallery(path, read_manifest(path)).ids
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        label = next(iter(c.get("/v1/adapters/digits/gallery").json()["labels"]))
        assert c.put(f"/v1/adapters/digits/gallery/{ids[5]}", headers=auth, json={"label": label, "vector": [1.0] * 1280}).status_code == 200
        assert c.delete(f"/v1/adapters/digits/gallery/{ids[6]}", headers=auth).status_code == 200
        made = run_metalora("thumbnails", "digits", "--gallery-dir", server.env["METALORA_GALLERY_DIR"])
        assert made.returncode == 0, made.stderr
        assert c.get(f"/v1/adapters/digits/gallery/{ids[5]}/thumbnail").json()["error"]["code"] == "no_thumbnail"
        assert c.get(f"/v1/adapters/digits/gallery/{ids[6]}/thumbnail").json()["error"]["code"] == "unknown_item"
        r = c.get(f"/v1/adapters/digits/gallery/{ids[7]}/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/webp"


def test_console_page_and_static_files_are_served(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and "/static/console.js" in page.text
        assert c.get("/static/console.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/static/nope.js").status_code == 404
        assert c.get("/docs").status_code == 200  # the OpenAPI docs stay where they were


# ------------------------------------------------------------------------ the page in a real browser
def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


@pytest.fixture(scope="module")
def browser():
    pw_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) is not installed")
    exe = _chromium()
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    with pw_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1100, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    ctx.close()


@contextmanager
def screenshot_on_failure(page, name: str):
    """Save a full-page screenshot when the block fails, and name it in the failure."""
    try:
        yield
    except BaseException as e:
        shot = Path(os.environ.get("METALORA_TEST_ARTIFACTS", tempfile.gettempdir())) / f"console-{name}-failure.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        try:
            page.screenshot(path=str(shot), full_page=True)
        except Exception:  # a crashed page cannot be photographed; the original failure matters more
            raise e from None
        raise AssertionError(f"{e!r}; screenshot of the page: {shot}") from e


@pytest.fixture(scope="module")
def files(tmp_path_factory, cat) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("upload")
    (d / "cat.jpg").write_bytes(cat)
    import skimage.data

    (d / "coffee.jpg").write_bytes(_jpeg(skimage.data.coffee()))
    (d / "notes.jpg").write_bytes(b"this is not an image, whatever its name says\n")
    return {"cat": d / "cat.jpg", "coffee": d / "coffee.jpg", "bad": d / "notes.jpg"}


def _choose(page, names: set[str]) -> None:
    page.wait_for_selector("#adapters input[type=checkbox][value=cifar10]")
    for box in page.query_selector_all("#adapters input[type=checkbox]"):
        box.set_checked(box.get_attribute("value") in names)


def _loaded_thumbnails(panel) -> int:
    return panel.evaluate("p => [...p.querySelectorAll('.neighbours img')].filter(i => i.complete && i.naturalWidth > 0).length")


@pytest.mark.slow
def test_console_in_chromium(server, page, files):
    with screenshot_on_failure(page, "chromium"):
        page.goto(server.url + "/")
        _choose(page, {"base", "cifar10"})
        page.set_input_files("#files", str(files["cat"]))  # choosing a file runs the request
        cifar = page.locator("section.answer[data-adapter=cifar10]")
        base = page.locator("section.answer[data-adapter=base]")
        cifar.locator(".neighbours figure").first.wait_for()
        if HAVE_PICTURES:
            page.wait_for_function("() => [...document.querySelectorAll('section.answer[data-adapter=cifar10] .neighbours img')]"
                                   ".filter(i => i.complete && i.naturalWidth > 0).length >= 5")
        else:  # no pictures made: a labelled placeholder for each neighbour
            cifar.locator(".neighbours .placeholder").first.wait_for()

        base_labels = base.locator(".bars .name").all_inner_texts()
        assert base_labels and base_labels[0] in CAT_CLASSES, base_labels  # the README's answer: a cat
        assert "cat" in cifar.locator(".bars .name").all_inner_texts()
        assert _loaded_thumbnails(cifar.element_handle()) >= (5 if HAVE_PICTURES else 0)
        manifest = read_manifest(_latest("cifar10")[1])
        r1, _, r3 = manifest["adapter"]["ranks"]
        assert cifar.locator("svg.seed-chart rect").count() == len(manifest["resolved_targets"]) * r3 * r1  # one bar per seed number
        assert base.locator("svg.seed-chart").count() == 0 and "no seed" in base.inner_text()
        if os.environ.get("METALORA_UPDATE_SCREENSHOT"):
            page.screenshot(path=str(ROOT / "docs" / "console.png"), full_page=True)

        # A bare-vector item (the photo's own embedding, so it is the nearest) has no picture: a placeholder.
        auth = {"Authorization": f"Bearer {TOKEN}"}
        vec = httpx.post(server.url + "/v1/embed", json={"adapter": "cifar10", "images": [base64.b64encode(files["cat"].read_bytes()).decode()]}).json()["results"][0]["embedding"]
        assert httpx.put(server.url + "/v1/adapters/cifar10/gallery/bare-cat", headers=auth, json={"label": "cat", "vector": vec}).status_code == 200
        page.click("#run")
        bare = cifar.locator('figure[data-id="bare-cat"]')
        bare.locator(".placeholder").wait_for()
        assert bare.locator("img").count() == 0
        assert httpx.delete(server.url + "/v1/adapters/cifar10/gallery/bare-cat", headers=auth).status_code == 200

        # With the token: add the photo to cifar10's gallery; it comes back as its own nearest neighbour.
        page.locator("#admin summary").click()
        page.fill("#token", TOKEN)
        add = cifar.locator(".add")
        add.locator("select option[value=cat]").wait_for(state="attached")
        add.locator("select").select_option("cat")
        add.locator("input[type=text]").fill("console-cat")
        add.locator("button").click()
        me = cifar.locator('figure[data-id="console-cat"]')
        me.wait_for()
        assert float(me.locator(".score").inner_text()) >= 0.99  # the same image: cosine ~1
        page.wait_for_function("() => { const i = document.querySelector('figure[data-id=\"console-cat\"] img'); return i && i.complete && i.naturalWidth > 0; }")
        # ... and remove it again.
        me.locator("button").click()
        me.wait_for(state="detached")
        page.wait_for_selector("section.answer[data-adapter=cifar10] .neighbours figure")

        # Load and unload from the page (digits is in the store, not loaded by this server).
        digits = f"digits@{_latest('digits')[0]}"
        page.click("button[aria-label='load digits']")
        page.wait_for_selector("button[aria-label='unload digits']")
        assert digits in httpx.get(server.url + "/readyz").json()["loaded"]
        page.click("button[aria-label='unload digits']")
        page.wait_for_selector("button[aria-label='load digits']")
        assert digits not in httpx.get(server.url + "/readyz").json()["loaded"]

        # A file that is not an image: the page shows the server's own error message.
        want = httpx.post(server.url + "/v1/predict", files=[("images", ("notes.jpg", files["bad"].read_bytes(), "image/jpeg"))], data={"adapter": ["base", "cifar10"], "top_k": "5", "include_seed": "true"}).json()["error"]
        page.set_input_files("#files", str(files["bad"]))
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error") == f"{want['code']}: {want['message']}"


@pytest.mark.slow
def test_console_is_keyboard_usable_and_fits_400px(server, page, files):
    with screenshot_on_failure(page, "400px"):
        # Subscribe to file choosers before the page loads: Playwright turns interception on with a
        # fire-and-forget message, so a listener added only by expect_file_chooser can lose the race
        # with the key press on a loaded machine (the dialog then opens natively and never reports).
        page.on("filechooser", lambda _chooser: None)
        page.set_viewport_size({"width": 400, "height": 800})
        page.goto(server.url + "/")
        _choose(page, {"base", "cifar10"})
        page.focus("#drop")
        assert page.evaluate("() => document.activeElement.id") == "drop"
        with page.expect_file_chooser() as fc:
            page.keyboard.press("Enter")
        fc.value.set_files([str(files["cat"]), str(files["coffee"])])  # two images × two adapters
        page.wait_for_function("() => document.querySelectorAll('article.image-card').length === 2")
        page.locator("article.image-card").nth(1).locator("section.answer[data-adapter=cifar10] .neighbours img").first.wait_for()
        assert page.locator("section.answer").count() == 4
        assert page.locator("article.image-card").nth(1).locator("section.answer[data-adapter=base] .bars .name").first.inner_text() in {"espresso", "cup", "coffee mug"}  # skimage coffee: an espresso cup
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 400  # no sideways scrolling
        page.keyboard.press("Tab")
        assert page.evaluate("() => document.activeElement && document.activeElement !== document.body")


def test_thumbnail_writes_are_atomic_and_fall_back_to_memory_where_the_disk_refuses(tmp_path):
    """`atomic_write` leaves the old file or the whole new one and no temporary file; where the
    sidecar directory cannot be written, the service keeps the picture in memory (one warning)
    instead of failing the gallery write, and a tombstone hides the bundle's picture there too."""
    from metalora.store import ModelStore
    from metalora.thumbnails import atomic_write
    from service.thumbnails import ThumbnailStore

    f = tmp_path / "a.webp"
    atomic_write(f, b"one")
    atomic_write(f, b"two")
    assert f.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["a.webp"]
    with pytest.raises(OSError):
        atomic_write(tmp_path / "missing-dir" / "b.webp", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["a.webp"]

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the sidecar directory should be")  # mkdir under it fails, root or not
    thumbs = ThumbnailStore(ModelStore(ROOT / "model_store"), blocked)
    thumbs.put("digits@1", "img-1", b"RIFF-picture")
    thumbs.put("digits@1", "img-2", None)  # a tombstone
    assert thumbs.get("digits@1", "img-1") == b"RIFF-picture"
    assert thumbs.get("digits@1", "img-2") is None
    assert blocked.read_text().startswith("a file")
