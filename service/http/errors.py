"""HTTP's side of errors: domain errors -> status, headers and the JSON error shape.

`/v1` answers `{"error": {"code": "...", "message": "..."}}` with the status of `V1_STATUS`;
`/v2` answers the Open Inference Protocol's `{"error": "<message>", "code": "..."}` with the
status of `service.oip.status`. Client mistakes are 4xx, overload 503 with Retry-After, a missed
deadline 504; a 500 is always a bug.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LIBRARY_ERRORS, DomainError, Kind, from_library
from ..oip import status as oip_status

log = logging.getLogger("metalora.service")

V1_STATUS = {
    Kind.INVALID: 422,
    Kind.UNSUPPORTED: 415,
    Kind.TOO_LARGE: 413,
    Kind.UNAUTHENTICATED: 401,
    Kind.PERMISSION_DENIED: 403,
    Kind.NOT_FOUND: 404,
    Kind.CONFLICT: 409,
    Kind.UNAVAILABLE: 503,
    Kind.DEADLINE_EXCEEDED: 504,
    Kind.CANCELLED: 499,  # nginx's "client closed request": nobody reads it, the log and metrics do
}
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def headers(e: DomainError) -> dict[str, str] | None:
    """The headers an error carries: Retry-After (seconds) on UNAVAILABLE, the bearer challenge on
    UNAUTHENTICATED, the encodings spoken on an unsupported Content-Encoding."""
    h = {}
    if e.retry_after_s is not None:
        h["Retry-After"] = str(int(e.retry_after_s)) if float(e.retry_after_s).is_integer() else str(e.retry_after_s)
    if e.kind is Kind.UNAUTHENTICATED:
        h["WWW-Authenticate"] = "Bearer"
    if "accept_encoding" in e.details:
        h["Accept-Encoding"] = e.details["accept_encoding"]
    return h or None


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def v1_response(e: DomainError, public) -> JSONResponse:
    return error_response(V1_STATUS[e.kind], e.code, public(e.message), headers(e))


def v2_response(e: DomainError, public) -> JSONResponse:
    return JSONResponse({"error": public(e.message), "code": e.code}, status_code=oip_status.status(e), headers=headers(e))


def v2_error(e: Exception) -> DomainError:
    """Any error of a /v2 route as a domain error (a body that fails validation is INVALID `invalid_request`)."""
    if isinstance(e, RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(p) for p in err.get("loc", ()))
        return DomainError(Kind.INVALID, "invalid_request", f"{loc}: {err.get('msg', 'invalid request')}")
    return from_library(e)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the one error shape."""

    @app.exception_handler(DomainError)
    async def _domain(request: Request, e: DomainError):
        return v1_response(e, request.app.state.dataplane.public)

    for cls in LIBRARY_ERRORS:
        @app.exception_handler(cls)
        async def _library(request: Request, e: Exception):
            return v1_response(from_library(e), request.app.state.dataplane.public)

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
