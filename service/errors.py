"""One JSON error shape for every failure: `{"error": {"code": "...", "message": "..."}}`.

Codes are stable and machine-readable; the message is for people. Client mistakes are 4xx,
overload is 503 with Retry-After, a missed deadline 504; a 500 is always a bug.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from metalora.bundle import BundleError
from metalora.images import ImageError

log = logging.getLogger("metalora.service")

# BundleError codes that mean "the client named something wrong" rather than "the bundle is bad".
_BUNDLE_STATUS = {"unknown_adapter": 404, "invalid_name": 422}
# Any other BundleError (checksum_mismatch, bad_manifest, backbone_mismatch, ...) is a bundle
# that cannot be served: 409, the store's state conflicts with the request.
BUNDLE_CONFLICT = 409


class ServiceError(Exception):
    """An error with its HTTP status, stable code and optional headers (e.g. Retry-After)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    @classmethod
    def from_bundle(cls, e: BundleError) -> "ServiceError":
        return cls(_BUNDLE_STATUS.get(e.code, BUNDLE_CONFLICT), e.code, str(e))

    @classmethod
    def from_image(cls, e: ImageError, where: str | None = None) -> "ServiceError":
        """The image error, its message led by the image's name in the request (`images[3]: ...`)."""
        return cls(e.status, e.code, f"{where}: {e}" if where else str(e))


def public_message(message: str, roots: Iterable[Path]) -> str:
    """`message` as a client may read it, without the server's directories: under each root (the
    model store, the gallery directory) a bundle directory `adapters/<name>/<version>` becomes
    `name@version`, any other path is written relative to the root, and the root itself by its
    name. The server's log keeps the full paths."""
    for root in sorted({str(r).rstrip("/") for r in roots}, key=len, reverse=True):  # a root inside another first
        r = rf"(?<![\w./-]){re.escape(root)}"
        message = re.sub(rf"{r}/adapters/([a-z0-9][a-z0-9._-]*)/([a-z0-9][a-z0-9._-]*)", r"\1@\2", message)
        message = re.sub(rf"{r}/", "", message)
        message = re.sub(rf"{r}(?![\w.-])", lambda _, name=Path(root).name: name, message)
    return message


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the one error shape."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, e: ServiceError):
        return error_response(e.status, e.code, request.app.state.service.public(e.message), e.headers)

    @app.exception_handler(BundleError)
    async def _bundle(request: Request, e: BundleError):
        se = ServiceError.from_bundle(e)
        return error_response(se.status, se.code, request.app.state.service.public(se.message))

    @app.exception_handler(ImageError)
    async def _image(request: Request, e: ImageError):
        return error_response(e.status, e.code, str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        types = {err.get("type") for err in e.errors()}
        code = "invalid_json" if "json_invalid" in types else "invalid_name" if "invalid_name" in types else "invalid_request"
        return error_response(422, code, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = _HTTP_CODES.get(e.status_code, f"http_{e.status_code}")
        if request.url.path == "/v2" or request.url.path.startswith("/v2/"):
            # an unmatched /v2 route or method: the Open Inference Protocol's shape, `"error": "<string>"`
            # (tritonclient's exceptions fail on the /v1 object), as the /v2 routes' own errors
            message = f"{e.detail}: {request.method} {request.url.path} (no such Open Inference Protocol route here)"
            return JSONResponse({"error": message, "code": code}, status_code=e.status_code, headers=getattr(e, "headers", None))
        return error_response(e.status_code, code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error ({type(e).__name__}); this is a bug, please report it")
