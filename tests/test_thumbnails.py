"""Gallery thumbnails over HTTP: validators (`If-None-Match`, weak comparison).

Against the session's shared `small_server` (tests/conftest.py); the test writes only its own item.
"""

from __future__ import annotations

import httpx
import pytest

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

