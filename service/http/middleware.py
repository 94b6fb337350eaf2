"""ASGI middleware: the body-size limit (declared or streamed) and the per-request metrics."""

from __future__ import annotations

import re
import time

from starlette.responses import JSONResponse

from ..container import Service
from ..metrics import UNCOUNTED
from . import errors
from .parse import ARRIVED

_CONVERTER = re.compile(r":[a-z]+}")  # a path converter in a route template


class _BodyTooLarge(Exception):
    pass


def _refusal(scope, status: int, code: str, message: str):
    """The middleware's own error, in the shape of the API the path belongs to (`/v2`: the Open
    Inference Protocol's `{"error": "..."}`)."""
    if scope.get("path", "").startswith("/v2"):
        return JSONResponse({"error": message, "code": code}, status_code=status)
    return errors.error_response(status, code, message)


class LimitsAndMetrics:
    """ASGI middleware: refuses bodies over the limit (header or streamed) and records request metrics."""

    def __init__(self, app, service: Service):
        self.app, self.svc = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.svc.settings.max_body_bytes
        t0 = time.perf_counter()
        status = {"code": 500, "started": False}
        state = scope.setdefault("state", {})
        state[ARRIVED] = time.monotonic()  # the request's deadline counts from here, decode included
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            code = "body_too_large" if length.isdigit() else "bad_content_length"
            resp = _refusal(scope, 413 if length.isdigit() else 400, code, f"request body is over the {limit}-byte limit" if length.isdigit() else "bad Content-Length")
            self.svc.metrics.rejected.labels("body_too_large").inc()
            await resp(scope, receive, send)
            self._observe(scope, state, resp.status_code, t0)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return msg

        async def tracking_send(msg):
            if msg["type"] == "http.response.start":
                status["code"], status["started"] = msg["status"], True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            self.svc.metrics.rejected.labels("body_too_large").inc()
            if not status["started"]:
                status["code"] = 413
                await _refusal(scope, 413, "body_too_large", f"request body is over the {limit}-byte limit")(scope, receive, send)
        self._observe(scope, state, status["code"], t0)

    def _observe(self, scope, state, code, t0):
        route = scope.get("route")
        endpoint = _CONVERTER.sub("}", getattr(route, "path", None) or "unmatched")  # "{item_id:path}" -> "{item_id}", as in the OpenAPI paths
        if endpoint in UNCOUNTED:
            return  # probes and scrapes would drown the request counts
        adapter = self.svc.metrics.label(state.get("adapter"))
        self.svc.metrics.requests.labels(endpoint, adapter, str(code)).inc()
        self.svc.metrics.request_duration.labels(endpoint, adapter).observe(time.perf_counter() - t0)
