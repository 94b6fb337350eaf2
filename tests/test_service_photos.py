"""Real photos against a real uvicorn (service/launch.py): what issue 10 found, as tests.

Each case's right value is the same picture stored plainly, sent through the same server:
a phone JPEG with EXIF Orientation 6 embeds like the upright picture, a 16-bit PNG like its 8-bit
twin, MPO/HEIC/AVIF are answered, a 1 x 6000 sliver is a 422 at once, a deadline passing during
decode is a 504 (never a late 200), a client that hangs up has its queued work dropped, and every
known metric series exists from start-up.
"""

from __future__ import annotations

import base64
import io
import shutil
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps
from prometheus_client.parser import text_string_to_metric_families

from metalora.images import SUPPORTED_FORMATS
from service.launch import ServerProcess
from service.metrics import REJECT_REASONS, STAGES

from .conftest import ROOT

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
DELAY_MS = 1000  # a batch waits this long to fill: long enough to hang up while an item is queued


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(ROOT / "model_store" / "backbones", root / "backbones")
    (root / "adapters").mkdir()
    srv = ServerProcess(root, root.parent / "server.log", device="cpu", backend="torch", max_delay_ms=DELAY_MS, max_batch_size=64).start()
    yield srv
    srv.stop()


def metrics(srv) -> dict:
    text = httpx.get(srv.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def embed(srv, *files: bytes) -> np.ndarray:
    r = httpx.post(srv.url + "/v1/embed", json={"adapter": "base", "images": [_b64(f) for f in files]}, timeout=120)
    assert r.status_code == 200, r.text
    return np.array([res["embedding"] for res in r.json()["results"]])  # (N, D), L2-normalised


def photo() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.chelsea())  # 451 x 300, asymmetric


def test_known_metric_series_exist_at_zero_from_start_up(server):
    """Before any request: every rejection reason and stage has its series, so alerts read 0, not 'no data'."""
    m = metrics(server)
    for reason in REJECT_REASONS:
        assert m[("metalora_rejected_total", (("reason", reason),))] == 0
    for stage in STAGES:  # the warm-up batch has run through forward (and prefix/adapters); nothing decoded yet
        assert m[("metalora_inference_seconds_count", (("stage", stage),))] == (0 if stage in ("decode", "knn") else m[("metalora_batch_size_count", ())])
    assert m[("metalora_requests_total", (("adapter", "none"), ("code", "200"), ("endpoint", "/v1/predict")))] == 0
    for fam in ("metalora_queue_depth", "metalora_batch_size_count", "metalora_queue_wait_seconds_count", "metalora_adapter_load_seconds_count"):
        assert (fam, ()) in m, fam


def test_phone_photo_orientation_is_applied(server):
    up = photo()
    a = np.asarray(up)
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(a, 1)))  # how a phone held in portrait stores it
    e = Image.Exif()
    e[0x0112] = 6
    tagged, untagged, upright = _save(stored, "JPEG", quality=90, exif=e.tobytes()), _save(stored, "JPEG", quality=90), _save(up, "JPEG", quality=90)
    v = embed(server, tagged, untagged, upright)
    assert v[0] @ v[2] > 0.99  # the picture a viewer shows
    assert v[0] @ v[1] < v[0] @ v[2] - 0.05  # not the stored pixels


def test_16_bit_grey_png_is_scaled_not_clipped(server):
    grey = photo().convert("L")
    g16 = _save(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "PNG")
    v = embed(server, g16, _save(grey, "PNG"), _save(Image.new("L", grey.size, 255), "PNG"))
    assert v[0] @ v[1] > 0.999
    assert v[0] @ v[2] < 0.9  # not a white page


@pytest.mark.parametrize("fmt", ["MPO", "HEIF", "AVIF"])
def test_camera_formats_are_answered(server, fmt):
    if fmt not in SUPPORTED_FORMATS:
        pytest.skip(f"{fmt} support is not installed")
    img = photo()
    kw = {"save_all": True, "append_images": [ImageOps.mirror(img)]} if fmt == "MPO" else {}
    v = embed(server, _save(img, fmt, quality=90, **kw), _save(img, "PNG"))
    assert v[0] @ v[1] > 0.98


def test_transparency_is_composited_over_white(server):
    rgba = photo().convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:, : a.shape[1] // 2, 3] = 0  # left half transparent (its colour channels still hold the cat)
    white = np.asarray(photo()).copy()
    white[:, : a.shape[1] // 2] = 255
    v = embed(server, _save(Image.fromarray(a, "RGBA"), "PNG"), _save(Image.fromarray(white), "PNG"))
    assert v[0] @ v[1] > 0.999


def test_sliver_is_refused_at_once(server):
    t = time.perf_counter()
    r = httpx.post(server.url + "/v1/embed", json={"adapter": "base", "images": [_b64(_save(Image.new("RGB", (1, 6000), "red"), "PNG"))]}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "extreme_aspect_ratio", r.text
    assert time.perf_counter() - t < 2.0


def test_deadline_passing_during_decode_is_504_at_the_deadline(server):
    rng = np.random.default_rng(0)
    big = _save(Image.fromarray(rng.integers(0, 256, (2000, 2500, 3), dtype=np.uint8)), "PNG", compress_level=1)  # 15 MB of noise: slow to inflate
    before = metrics(server)
    t = time.perf_counter()
    r = httpx.post(server.url + "/v1/embed", files=[("images", ("big.png", big))], data={"adapter": "base"}, headers={"X-Timeout-Ms": "100"}, timeout=60)
    took = time.perf_counter() - t
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    after = metrics(server)
    key = ("metalora_rejected_total", (("reason", "deadline"),))
    assert after[key] - before[key] == 1
    assert after[("metalora_batch_size_count", ())] == before[("metalora_batch_size_count", ())], "an expired image reached the engine"
    assert took < 0.1 + 1.5, took  # answered at its deadline (plus upload and parsing), not after the decode


def test_client_that_hangs_up_cancels_its_queued_work(server):
    before = metrics(server)
    body = ('{"adapter": "base", "images": ["%s"]}' % _b64(_save(photo(), "JPEG"))).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(DELAY_MS / 4000)  # decoded and queued; its batch waits DELAY_MS to fill
    key = ("metalora_rejected_total", (("reason", "cancelled"),))
    for _ in range(50):
        time.sleep(0.1)
        after = metrics(server)
        if after[key] > before[key]:
            break
    assert after[key] - before[key] == 1
    time.sleep(DELAY_MS / 1000 + 0.5)
    assert metrics(server)[("metalora_batch_size_count", ())] == before[("metalora_batch_size_count", ())], "cancelled work was computed"
