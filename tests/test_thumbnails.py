"""Gallery thumbnails over HTTP: validators (`If-None-Match`, weak comparison) and a gallery write
where the thumbnail directory cannot be written (pictures served from memory).

The validator test runs against the session's shared `small_server` (tests/conftest.py) and writes
only its own item; the read-only deployment starts its own server on a private PostgreSQL.
"""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from service.launch import ServerProcess

from .conftest import ROOT
from .conftest import SMALL_TOKEN as TOKEN
from .conftest import small_png as _image

AUTH = {"Authorization": f"Bearer {TOKEN}"}
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture(scope="module")
def server(small_server):
    return small_server


def test_thumbnail_if_none_match_uses_the_weak_comparison(server):
    """A weak validator (what proxies and browsers send back) and `*` answer 304 too (RFC 9110
    §13.1.2); only the strong tag did."""
    r = httpx.put(server.url + "/v1/adapters/alpha/gallery/etag-probe", headers=AUTH, json={"label": "cat", "image": _image("orange")}, timeout=60)
    assert r.status_code == 200, r.text
    url = server.url + "/v1/adapters/alpha/gallery/etag-probe/thumbnail"
    first = httpx.get(url)
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"')
    for header in (etag, f"W/{etag}", "*", f'"other", W/{etag}', f'W/"nope",{etag}'):
        again = httpx.get(url, headers={"If-None-Match": header})
        assert again.status_code == 304 and again.content == b"", header
        assert again.headers["etag"] == etag
    for header in ('"other"', 'W/"other"', etag[:-2] + '"'):
        assert httpx.get(url, headers={"If-None-Match": header}).status_code == 200, header


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
