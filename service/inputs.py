"""Request parsing and image decoding: what every inference route does before it computes.

A body is JSON (base64 images) or a multipart form (image files + fields); `parse_images_body`
turns either into the route's pydantic request and the raw images, and `decode_one` turns one
raw image into the model's input tensor. The deadline header is read here too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import re
import time

import numpy as np
import torch
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from metalora.images import ImageError, Preprocessor

from .adapters import AdapterRegistry
from .errors import ServiceError
from .metrics import FANOUT
from .http.schemas import ImagesRequest
from .settings import Settings

TIMEOUT_HEADER = "x-timeout-ms"


def decode_one(preprocessor: Preprocessor, raw: bytes | str | np.ndarray, where: str, max_pixels: int, max_aspect_ratio: float) -> torch.Tensor:
    """One image (file bytes, base64 / a data: URL as str, or already-decoded RGB pixels as a
    (H, W, 3) uint8 array from the Open Inference Protocol) -> the model input (3, S, S).

    Raises ServiceError 422 `invalid_base64`, or the image error of `metalora.images` as a 4xx,
    naming the image `where` (as the request has it: `images[3]`, `items[1].image (id 'a2')`).
    Runs on the decoder pool, never on the event loop.
    """
    if isinstance(raw, np.ndarray):  # the caller checked shape, dtype and max_pixels
        return preprocessor(Image.fromarray(raw, "RGB"))
    if isinstance(raw, str):
        if raw.startswith("data:"):
            raw = raw.partition(",")[2]
        try:  # line breaks are allowed (MIME / `base64` without -w0 wraps at 76), nothing else outside the alphabet
            raw = base64.b64decode(_WRAP.sub("", raw), validate=True)
        except (binascii.Error, ValueError):
            raise ServiceError(422, "invalid_base64", f"{where} is not valid base64") from None
    try:
        return preprocessor(raw, max_pixels, max_aspect_ratio)  # (3, S, S); the decode bounded by S, not the file
    except ImageError as e:
        raise ServiceError.from_image(e, where) from None


_WRAP = re.compile(r"[\r\n]+")

ARRIVED = "arrived"  # scope["state"] key: time.monotonic() when the request reached the server (set by the middleware)


class Watch:
    """One request's deadline, counted from its arrival, and whether its client is still connected.

    `wait(futures)` waits for the request's work (decode or batcher futures) and raises instead of
    answering late: 504 `deadline_exceeded` when the deadline passes first, 499
    `client_closed_request` when the client hangs up first. The caller then drops the work that
    has not started (`Service.decode`, `Service.compute`).
    Wait only after the body is read: it listens on the request's receive channel meanwhile.
    With `request=None` (gRPC: no ASGI channel) it watches the deadline alone, counted from now.
    """

    def __init__(self, request: Request | None, timeout_s: float):
        arrived = request.scope.get("state", {}).get(ARRIVED, time.monotonic()) if request is not None else time.monotonic()
        self.deadline = arrived + timeout_s
        self.timeout_s = timeout_s
        self._request = request

    async def _listen(self) -> None:
        if self._request is None:
            await asyncio.get_running_loop().create_future()  # never done: no disconnect to see
        while (await self._request.receive())["type"] != "http.disconnect":
            pass

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self, what: str) -> ServiceError:
        return ServiceError(504, "deadline_exceeded", f"the request's deadline ({self.timeout_s * 1000:.0f} ms from its arrival) passed {what}; it was not answered")

    async def wait(self, futures: list[asyncio.Future], stage: str) -> list:
        """Results of `futures` in order (exceptions re-raised), or 504 / 499 as above."""
        gone = asyncio.get_running_loop().create_task(self._listen())
        try:
            pending = set(futures)
            while pending:
                left = self.left()
                if left <= 0:
                    _abandon(futures)
                    raise self.expired(f"during {stage}")
                done, pending = await asyncio.wait(pending | {gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    _abandon(futures)
                    raise ServiceError(499, "client_closed_request", "the client closed the connection before the answer")
                pending.discard(gone)
        finally:
            gone.cancel()
        return [f.result() for f in futures]  # raises the first failure, in order


def _abandon(futures: list[asyncio.Future]) -> None:
    """Nobody reads these any more: no "exception was never retrieved" log when they fail later."""
    for f in futures:
        f.add_done_callback(lambda f: f.cancelled() or f.exception())


def request_timeout(request: Request, settings: Settings) -> float:
    """The request's time budget in seconds: the server's, or shorter when the client sends X-Timeout-Ms."""
    limit = settings.request_timeout_s
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return limit
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if not math.isfinite(ms) or ms <= 0:
        raise ServiceError(422, "invalid_timeout", f"{TIMEOUT_HEADER} must be a positive number of milliseconds, got {raw!r}")
    return min(limit, ms / 1000)


async def parse_images_body(request: Request, model: type[ImagesRequest], settings: Settings, registry: AdapterRegistry) -> tuple[ImagesRequest, list[bytes | str]]:
    """A JSON body (base64 images) or a multipart form (image files + fields) -> (request, raw images)."""
    if request.query_params:  # every option travels in the body; a query string would be silently ignored
        names = ", ".join(sorted(set(request.query_params)))
        raise ServiceError(422, "unexpected_query", f"query parameters are not read here ({names}); send them as JSON fields or multipart form fields")
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    max_images = settings.max_images
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=64)
        except StarletteHTTPException as e:  # the multipart parser's own limits and syntax errors
            raise ServiceError(422, "invalid_multipart", f"multipart body refused: {e.detail}") from None
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
        raise ServiceError(415, "unsupported_media_type", f"send application/json or multipart/form-data, not {ctype!r}")
    try:
        req = model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    if isinstance(data, bytes):
        raws = list(req.images or [])
    if len(raws) > max_images:
        raise ServiceError(413, "too_many_images", f"{len(raws)} images in one request; the limit is {max_images}")
    request.state.adapter = req.adapters[0] if len(req.adapters) == 1 else FANOUT
    for ref in req.adapters:  # a wrong name fails fast, before any image is decoded
        registry.resolve(ref)
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
