"""Error bodies: no server path reaches a client (over HTTP and gRPC; `public_message`), and a
gallery batch's error names the bad item as it was sent.

Against the session's shared `small_server` (tests/conftest.py): a throw-away store with a tiny
adapter with a gallery and a corrupt bundle, torch on CPU, the admin token set.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from .conftest import SMALL_TOKEN as TOKEN
from .conftest import small_png as _image

AUTH = {"Authorization": f"Bearer {TOKEN}"}
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def store(small_store):
    return small_store


@pytest.fixture(scope="module")
def server(small_server):
    return small_server


@pytest.mark.slow  # a real server
def test_error_bodies_do_not_show_the_store_path(server, store):
    """A corrupt bundle's 409 (and an unknown adapter's 404, /readyz's `failed`, the adapter's
    `error`) carried the store's absolute path; they name the bundle `name@version` instead."""
    pixel = _image("blue")
    answers = {
        "load": httpx.post(server.url + "/v1/adapters/broken/load", headers=AUTH, timeout=60),
        "predict": httpx.post(server.url + "/v1/predict", json={"adapter": "broken", "images": [pixel]}, timeout=60),
        "v2 infer": httpx.post(server.url + "/v2/models/broken/infer", json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [pixel]}]}, timeout=60),
    }
    for what, r in answers.items():
        code = r.json()["code"] if what.startswith("v2") else r.json()["error"]["code"]
        assert r.status_code == 409 and code == "checksum_mismatch", (what, r.text)
    answers["unknown"] = httpx.get(server.url + "/v1/adapters/nope")
    assert answers["unknown"].status_code == 404
    answers["readyz"] = httpx.get(server.url + "/readyz")
    answers["info"] = httpx.get(server.url + "/v1/adapters/broken")
    answers["v2 index"] = httpx.post(server.url + "/v2/repository/index", headers=AUTH)
    for what, r in answers.items():
        for path in {str(store), str(store.resolve())}:
            assert path not in r.text, (what, r.text)
    assert "broken@1/weights.safetensors" in answers["load"].json()["error"]["message"]
    assert answers["readyz"].json()["failed"]["broken"].startswith("checksum_mismatch: broken@1/")
    assert answers["info"].json()["versions"][0]["error"].startswith("checksum_mismatch: broken@1/")
    assert str(store) in server.log()  # the operator still sees where


@pytest.mark.slow  # a real server
def test_grpc_errors_do_not_show_the_store_path(server, store):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:
        grpcclient.InferenceServerClient(server.grpc_url).load_model("broken", headers={"authorization": f"Bearer {TOKEN}"})
    assert "checksum_mismatch: broken@1/weights.safetensors" in e.value.message() and str(store) not in e.value.message()


@pytest.mark.parametrize(
    "message,public",
    [
        ("/srv/store/adapters/cat-s/2/weights.safetensors: sha256 differs", "cat-s@2/weights.safetensors: sha256 differs"),
        ("/srv/store/adapters/cat-s/2: no manifest.json", "cat-s@2: no manifest.json"),
        ("adapter 'x' is not in the store /srv/store", "adapter 'x' is not in the store store"),
        ("the gallery directory /srv/store/galleries is not writable", "the gallery directory galleries is not writable"),
        ("gallery database /srv/store/galleries/galleries.sqlite3: locked", "gallery database galleries.sqlite3: locked"),
        ("/srv/store2/adapters/a/1 and /x/srv/store/adapters/a/1", "/srv/store2/adapters/a/1 and /x/srv/store/adapters/a/1"),  # other paths
    ],
)
def test_public_message_rewrites_only_the_server_directories(message, public):
    from service.errors import public_message

    assert public_message(message, [Path("/srv/store"), Path("/srv/store/galleries/")]) == public


@pytest.mark.slow  # a real server
def test_gallery_batch_names_the_bad_item_as_sent(server):
    """An image that does not decode was named by its place among the batch's images (`images[1]`
    for the third item below); the error names `items[i]` and its id, and nothing is written."""
    url = server.url + "/v1/adapters/alpha/gallery"
    size = httpx.get(url).json()["items"]
    not_an_image = base64.b64encode(b"this is not a picture").decode()
    for bad, code in ((not_an_image, "undecodable_image"), ("not base64 !", "invalid_base64")):
        items = [
            {"id": "b-vec", "label": "cat", "vector": [0.5] * 1280},
            {"id": "b-ok", "label": "dog", "image": _image("green")},
            {"id": "b-bad", "label": "fox", "image": bad},
        ]
        r = httpx.post(url, headers=AUTH, json={"items": items}, timeout=60)
        assert 400 <= r.status_code < 500 and r.json()["error"]["code"] == code, r.text
        message = r.json()["error"]["message"]
        assert message.startswith("items[2].image (id 'b-bad')") and "images[" not in message, message
    assert httpx.get(url).json()["items"] == size  # all or none
    r = httpx.put(url + "/b-one", headers=AUTH, json={"label": "cat", "image": not_an_image}, timeout=60)
    assert r.json()["error"]["code"] == "undecodable_image" and r.json()["error"]["message"].startswith("image: "), r.text
