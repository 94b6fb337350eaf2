"""Regressions for what a fresh user found (a review of the merged service, issue work of 9-16):
wrong answers with 200, 500s, and docs that did not match. Real servers on the shipped store.
"""

from __future__ import annotations

import base64
import io
import re

import httpx
import pytest
from PIL import Image

from service.launch import ServerProcess, free_port

from .conftest import ROOT, needs_shared, run_metalora

TOKEN = "findings-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture(scope="module")
def cat() -> bytes:
    import skimage.data

    b = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(b, "JPEG")
    return b.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    gal = tmp_path_factory.mktemp("galleries")
    srv = ServerProcess(ROOT / "model_store", gal.parent / "findings-server.log", admin_token=TOKEN, gallery_dir=gal, adapters="cifar10", grpc_port=0).start()
    yield srv
    srv.stop()


def test_bundle_gallery_items_can_be_replaced_and_deleted(server):
    """Bundle item ids name their source file (train/cat/0377.jpg): PUT and DELETE take them with
    a literal '/' or as %2F, like added items."""
    probe = httpx.post(server.url + "/v1/knn", json={"adapter": "cifar10", "vectors": [[1.0] * 1280], "k": 2}).json()
    first, second = (n["id"] for n in probe["results"][0]["neighbors"])
    assert "/" in first and "/" in second
    key = f'cifar10@{probe["results"][0]["version"]}'
    r = httpx.put(f"{server.url}/v1/adapters/{key}/gallery/{first}", headers=AUTH, json={"label": "cat", "vector": [0.5] * 1280})
    assert r.status_code == 200 and r.json()["id"] == first and r.json()["created"] is False, r.text
    r = httpx.delete(f"{server.url}/v1/adapters/{key}/gallery/{second.replace('/', '%2F')}", headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == second, r.text
    again = httpx.post(server.url + "/v1/knn", json={"adapter": key, "vectors": [[1.0] * 1280], "k": 3}).json()
    ids = [n["id"] for n in again["results"][0]["neighbors"]]
    assert second not in ids and ids[0] == first  # replaced by the all-0.5 vector: now the exact match
    for bad in ("a//b", "a/../b", "a/.hidden", "/lead"):
        r = httpx.put(f"{server.url}/v1/adapters/{key}/gallery/{bad.replace('/', '%2F')}", headers=AUTH, json={"label": "cat", "vector": [0.5] * 1280})
        assert r.status_code in (404, 422), (bad, r.text)


def test_query_parameters_are_refused_not_ignored(server, cat):
    """`/v1/predict?adapter=cifar10` used to answer 200 for `base` (the query string was ignored)."""
    r = httpx.post(server.url + "/v1/predict?adapter=cifar10&top_k=1", files=[("images", ("c.jpg", cat))])
    assert r.status_code == 422 and r.json()["error"]["code"] == "unexpected_query", r.text
    assert "adapter" in r.json()["error"]["message"]


def test_invalid_adapter_name_in_the_body_is_invalid_name(server, cat):
    for bad in ("../etc", "CIFAR10", "cifar10@", ["cifar10", "Bad"]):
        r = httpx.post(server.url + "/v1/predict", json={"adapter": bad, "images": [base64.b64encode(cat).decode()]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_name", (bad, r.text)
    r = httpx.post(server.url + "/v1/predict", files=[("images", ("c.jpg", cat))], data={"adapter": "base,cifar10"})
    assert r.json()["error"]["code"] == "invalid_name", r.text


def test_line_wrapped_base64_gives_the_same_answer(server, cat):
    """`base64 cat.jpg` (GNU wraps at 76) and Python's encodebytes: accepted, same scores as -w0."""
    flat = httpx.post(server.url + "/v1/predict", json={"adapter": "base", "images": [base64.b64encode(cat).decode()], "top_k": 3}).json()
    wrapped = httpx.post(server.url + "/v1/predict", json={"adapter": "base", "images": [base64.encodebytes(cat).decode()], "top_k": 3})
    assert wrapped.status_code == 200, wrapped.text
    assert wrapped.json()["results"] == flat["results"]
    junk = httpx.post(server.url + "/v1/predict", json={"adapter": "base", "images": [base64.b64encode(cat).decode()[:100] + " !" + "AAAA"]})
    assert junk.status_code == 422 and junk.json()["error"]["code"] == "invalid_base64"


def test_metrics_count_thumbnails_and_deletes_under_the_zero_initialised_series(server):
    before = httpx.get(server.url + "/metrics").text
    endpoints = set(re.findall(r'endpoint="([^"]*thumbnail)"', before))
    assert len(endpoints) == 1, endpoints
    httpx.get(server.url + "/v1/adapters/cifar10/gallery/nope/thumbnail")
    httpx.put(server.url + "/v1/adapters/cifar10/gallery/metric-probe", headers=AUTH, json={"label": "cat", "vector": [0.25] * 1280})
    assert httpx.delete(server.url + "/v1/adapters/cifar10/gallery/metric-probe", headers=AUTH).status_code == 200
    after = httpx.get(server.url + "/metrics").text
    assert set(re.findall(r'endpoint="([^"]*thumbnail)"', after)) == endpoints
    deletes = re.findall(r'metalora_requests_total\{adapter="([^"]*)",code="200",endpoint="/v1/adapters/\{name\}/gallery/\{item_id\}"\} (\S+)', after)
    assert ("cifar10", "2.0") in deletes or any(a == "cifar10" and float(v) >= 1 for a, v in deletes), deletes


@needs_shared("cifar10", "train.zip")
def test_readme_thumbnail_example_answers_a_picture(server):
    """The README's example, after the install step it names (`metalora thumbnails`, which
    `scripts/serve.sh` runs): the shipped bundles carry no pictures of their own."""
    readme = (ROOT / "README.md").read_text()
    path = re.search(r"localhost:8000(/v1/adapters/\S+/thumbnail)", readme).group(1)
    ref = re.search(r"/v1/adapters/([^/]+)/gallery", path).group(1)
    made = run_metalora("thumbnails", ref, "--gallery-dir", server.env["METALORA_GALLERY_DIR"])
    assert made.returncode == 0, made.stderr
    r = httpx.get(server.url + path)
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp", r.text


def test_predict_answers_without_unknown_while_the_gallery_database_is_down(tmp_path, cat):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with ServerProcess(ROOT / "model_store", tmp_path / "s.log", gallery_dsn=dead, gallery_dir=tmp_path / "g", adapters="cifar10", grpc_port=0) as srv:
        r = httpx.post(srv.url + "/v1/predict", files=[("images", ("c.jpg", cat))], data={"adapter": "cifar10", "top_k": "1"}, timeout=30)
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["predictions"][0]["label"] == "cat" and "unknown" not in res
        assert httpx.post(srv.url + "/v1/knn", files=[("images", ("c.jpg", cat))], data={"adapter": "cifar10"}, timeout=30).json()["error"]["code"] == "gallery_unavailable"


def test_image_put_with_an_unwritable_thumbnail_directory_succeeds(tmp_path, cat):
    """The shipped Kubernetes Deployment: read-only root, galleries in PostgreSQL, no gallery volume.
    The write succeeds; the thumbnail is served from memory."""
    from service.galleries.pgcluster import PostgresCluster, find_bindir

    if find_bindir() is None:
        pytest.skip("needs PostgreSQL's initdb/pg_ctl (Debian package postgresql)")
    with PostgresCluster() as pg:
        with ServerProcess(ROOT / "model_store", tmp_path / "s.log", gallery_dsn=pg.dsn, gallery_dir="/proc/metalora-ro", admin_token=TOKEN, adapters="cifar10", grpc_port=0) as srv:
            r = httpx.put(srv.url + "/v1/adapters/cifar10/gallery/k8s-cat", json={"label": "cat", "image": base64.b64encode(cat).decode()}, headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
            t = httpx.get(srv.url + "/v1/adapters/cifar10/gallery/k8s-cat/thumbnail")
            assert t.status_code == 200 and Image.open(io.BytesIO(t.content)).format == "WEBP"
            assert httpx.delete(srv.url + "/v1/adapters/cifar10/gallery/k8s-cat", headers=AUTH).status_code == 200
            assert httpx.get(srv.url + "/v1/adapters/cifar10/gallery/k8s-cat/thumbnail").status_code == 404


@pytest.mark.parametrize("token", ["changemechangeme", "aaaaaaaaaaaaaaaaaaaa", "local-dev-token-0123456789", "short"])
def test_placeholder_admin_tokens_are_refused(token):
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="METALORA_ADMIN_TOKEN"):
        Settings(admin_token=token)
    assert Settings(admin_token="3f9c1b7e2a8d4c6f0e1a2b3c4d5e6f70").admin_token is not None


def test_openapi_docs_page_loads_without_a_cdn(server):
    html = httpx.get(server.url + "/docs").text
    assert "cdn." not in html and "swagger-ui-bundle.js" in html
    js = re.search(r'src="([^"]*swagger-ui-bundle\.js)"', html).group(1)
    assert httpx.get(server.url + js).status_code == 200
