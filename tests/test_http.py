"""HTTP semantics of the service: HEAD answers the probes, query parameters are refused rather than
ignored, adapter names in a body or form are checked as names, line-wrapped base64 is accepted,
and the OpenAPI docs page needs no CDN.

Against the session's shared server on the shipped store (`shipped_server`, tests/conftest.py).
"""

from __future__ import annotations

import base64
import re

import httpx
import pytest

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture(scope="module")
def server(shipped_server):
    return shipped_server


def test_probes_answer_head_like_get_without_a_body(server):
    """Load balancers and uptime checkers send HEAD; it was 405."""
    for path in ("/healthz", "/readyz"):
        get, head = httpx.get(server.url + path), httpx.head(server.url + path)
        assert get.status_code == 200 and head.status_code == 200, (path, head.text)
        assert head.content == b""
        for h in ("content-type", "content-length"):
            assert head.headers[h] == get.headers[h], (path, h)


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


def test_openapi_docs_page_loads_without_a_cdn(server):
    html = httpx.get(server.url + "/docs").text
    assert "cdn." not in html and "swagger-ui-bundle.js" in html
    js = re.search(r'src="([^"]*swagger-ui-bundle\.js)"', html).group(1)
    assert httpx.get(server.url + js).status_code == 200
