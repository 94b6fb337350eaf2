"""Gallery items over HTTP on the shipped store: bundle item ids (`train/cat/0377.jpg`) are taken
with a literal '/' or as %2F by PUT and DELETE, and the item routes are counted under their
zero-initialised metric series.

These tests edit cifar10's gallery, so they have a server of their own (not the session's shared
`shipped_server`, whose users read that gallery).
"""

from __future__ import annotations

import re

import httpx
import pytest

from service.launch import ServerProcess

from .conftest import ROOT

TOKEN = "findings-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    gal = tmp_path_factory.mktemp("galleries")
    srv = ServerProcess(ROOT / "model_store", gal.parent / "gallery-items-server.log", admin_token=TOKEN, gallery_dir=gal, adapters="cifar10", grpc_port=0).start()
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
