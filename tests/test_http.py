"""HTTP semantics of the service: HEAD answers the probes as GET does.

Against the session's shared server on the shipped store (`shipped_server`, tests/conftest.py).
"""

from __future__ import annotations

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

