"""HTTP request parsing for `/v1`: a JSON body (base64 images) or a multipart form (image files +
fields) -> the route's pydantic request and the raw images; and each request's `Deadline`.

Only translation lives here: what the fields mean, and every limit, is the data plane's.
"""

from __future__ import annotations

import math

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from metalora.refs import AdapterRef

from ..dataplane import DataPlane
from ..deadline import Deadline
from ..errors import DomainError, Kind, invalid
from ..metrics import FANOUT
from .schemas import ImagesRequest

TIMEOUT_HEADER = "x-timeout-ms"
ARRIVED = "arrived"  # scope["state"] key: time.monotonic() when the request reached the server (set by the middleware)


def deadline(request: Request, dp: DataPlane) -> Deadline:
    """The request's deadline, counted from its arrival, shortened by `X-Timeout-Ms`; it also
    notices the client hanging up. Wait on it only after the body is read: it listens on the
    request's receive channel meanwhile."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    arrived = request.scope.get("state", {}).get(ARRIVED)
    return dp.deadline(timeout_s(request.headers.get(TIMEOUT_HEADER)), arrived=arrived, gone=gone)


def timeout_s(header: str | None) -> float | None:
    """`X-Timeout-Ms` -> seconds (None without one); INVALID `invalid_timeout` unless a positive number."""
    if header is None:
        return None
    try:
        ms = float(header)
    except ValueError:
        ms = float("nan")
    if not math.isfinite(ms) or ms <= 0:
        raise invalid("invalid_timeout", f"{TIMEOUT_HEADER} must be a positive number of milliseconds, got {header!r}")
    return ms / 1000


def refs(names: list[str]) -> list[AdapterRef]:
    return [AdapterRef.parse(n) for n in names]


async def images_body(request: Request, model: type[ImagesRequest], max_images: int) -> tuple[ImagesRequest, list[bytes | str]]:
    """A JSON body (base64 images) or a multipart form (image files + fields) -> (request, raw images)."""
    if request.query_params:  # every option travels in the body; a query string would be silently ignored
        names = ", ".join(sorted(set(request.query_params)))
        raise invalid("unexpected_query", f"query parameters are not read here ({names}); send them as JSON fields or multipart form fields")
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images + 1, max_fields=64)  # one more: the data plane's count check answers (413), as for JSON
        except StarletteHTTPException as e:  # the multipart parser's own limits and syntax errors
            raise invalid("invalid_multipart", f"multipart body refused: {e.detail}") from None
        files = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
        fields: dict = {}
        for key in {k for k in form.keys() if k != "images"}:
            vals = [v for v in form.getlist(key) if isinstance(v, str)]
            fields[key] = vals if key == "adapter" and len(vals) > 1 else (vals[0] if vals else None)
        fields["images"] = [""] * len(files) if files else None
        raws: list[bytes | str] = [await f.read() for f in files]
        data = fields
    elif ctype in ("application/json", "text/json") or ctype.endswith("+json"):
        data = await request.body()
        raws = []
    else:
        raise DomainError(Kind.UNSUPPORTED, "unsupported_media_type", f"send application/json or multipart/form-data, not {ctype!r}")
    try:
        req = model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    if isinstance(data, bytes):
        raws = list(req.images or [])
    request.state.adapter = req.adapters[0] if len(req.adapters) == 1 else FANOUT
    return req, raws


def openapi_body(model: type[BaseModel]) -> dict:
    """OpenAPI request body for routes that take JSON or a multipart form."""
    schema = model.model_json_schema()
    form = {
        "type": "object",
        "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "adapter": {"type": "array", "items": {"type": "string"}},
            **{k: v for k, v in schema["properties"].items() if k in ("top_k", "k", "include_seed")},
        },
        "required": ["images"],
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": form}}}}
