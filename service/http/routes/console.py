"""The web console at `/` (static HTML, CSS and JavaScript) and the
gallery thumbnails it shows: `GET /v1/adapters/{name}/gallery/{id}/thumbnail`.

The page only calls the public `/v1` API from the browser; the OpenAPI docs stay at `/docs`.
(The static files are in `service/http/static/`.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from metalora.refs import AdapterRef

from ...errors import not_found
from ...thumbnails import media_type
from ..deps import PlaneDep, RefPath
from ..errors import error_body
from ..schemas import error_responses

STATIC = Path(__file__).resolve().parent.parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
THUMBNAIL_CACHE = "public, max-age=60"  # short: replacing an item keeps its id; the ETag makes re-checks cheap

router = APIRouter(include_in_schema=False)
thumbnails = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=error_responses(400, 409, 422, 503))


def _static(name: str) -> FileResponse:
    f = STATIC / name
    if "/" in name or name.startswith(".") or f.suffix not in STATIC_TYPES or not f.is_file():
        raise not_found("not_found", f"no static file {name!r}")
    return FileResponse(f, media_type=STATIC_TYPES[f.suffix], headers={"Cache-Control": "no-cache"})


@router.get("/")
async def console_page() -> FileResponse:
    """The console: pick adapters, drop images, see labels, neighbours and seeds."""
    return _static("index.html")


@router.get("/static/{name}")
async def console_static(name: str) -> FileResponse:
    return _static(name)


def _none_match(header: str, etag: str) -> bool:
    """Whether `If-None-Match` names this representation: RFC 9110 §13.1.2 compares weakly (a
    `W/` validator, as proxies and browsers send back, matches its strong tag), and `*` matches
    any current representation."""
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


@thumbnails.get(
    "/{name}/gallery/{item_id:path}/thumbnail",
    response_class=Response,
    responses={
        200: {"content": {"image/webp": {}, "image/jpeg": {}}, "description": "the item's thumbnail (<= 64 px), with ETag and Cache-Control"},
        304: {"description": "If-None-Match matched the ETag (weak comparison; `*` matches any)"},
        404: {"content": {"application/json": {"example": error_body("no_thumbnail", "item has no thumbnail")}}, "description": "unknown adapter or item (`unknown_adapter`, `unknown_item`), or an item without a picture (`no_thumbnail`)"},
    },
)
async def gallery_thumbnail(name: RefPath, item_id: str, request: Request, dp: PlaneDep) -> Response:
    """A gallery item's thumbnail: the one `metalora thumbnails` made for a bundle item, the one
    made when the item was added from an image, or the bundle's own. Items added as a bare vector
    have none (404 `no_thumbnail`). Ids may contain `/`."""
    ref = AdapterRef.parse(name)
    request.state.adapter = dp.resolve_gallery(ref)
    key, data = await dp.thumbnail(ref, item_id)
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": THUMBNAIL_CACHE}
    if _none_match(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type(data), headers=headers)
