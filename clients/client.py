"""Sync and async Python clients for the MetaLoRA service (httpx).

Both share the request building and response parsing below; only the transport loop differs.
A 503 (queue full, still warming, shutting down) is retried with exponential backoff, waiting at
least what the server's `Retry-After` asks; every other error raises `APIError` with the
server's stable `code` and HTTP status.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Sequence, TypeVar, Union

import httpx
from pydantic import BaseModel

from .errors import APIError, TransportError, error_from_response
from .models import (
    AdapterInfo,
    AdapterList,
    EmbedResult,
    GalleryInfo,
    GalleryItem,
    Health,
    KnnResult,
    LoadResult,
    PredictResult,
    Ready,
    UnloadResult,
)

DEFAULT_URL = "http://127.0.0.1:8000"
# One image: raw file bytes, a path, a binary file object (anything with .read()), or a PIL image.
ImageLike = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO, "PIL.Image.Image"]
M = TypeVar("M", bound=BaseModel)

if TYPE_CHECKING:
    import PIL.Image


def default_url() -> str:
    return os.environ.get("METALORA_URL") or DEFAULT_URL


def _is_pil(img) -> bool:
    pil = sys.modules.get("PIL.Image")  # a PIL image exists only if PIL was imported
    return pil is not None and isinstance(img, pil.Image)


def _is_one_image(img) -> bool:
    return isinstance(img, (bytes, bytearray, memoryview, str, os.PathLike)) or hasattr(img, "read") or _is_pil(img)


def image_bytes(img: ImageLike) -> bytes:
    """One image as file bytes: bytes as they are, a path read, a binary file object read from its
    current position, a PIL image encoded as PNG (lossless). Raises TypeError for anything else
    (naming its type) and for a file object opened in text mode."""
    if isinstance(img, (bytes, bytearray, memoryview)):
        return bytes(img)
    if isinstance(img, (str, os.PathLike)):
        return Path(img).read_bytes()
    if hasattr(img, "read"):
        data = img.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"a file object for an image must be opened in binary mode ('rb'); read() gave {type(data).__name__}")
        return bytes(data)
    if _is_pil(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(
        f"an image must be bytes, a path (str or os.PathLike), a binary file object or a PIL.Image, not {type(img).__module__}.{type(img).__qualname__}"
    )


def encode_image(img: ImageLike) -> str:
    """One image (see `image_bytes`) -> base64 text for the JSON body (the server decodes and validates)."""
    return base64.b64encode(image_bytes(img)).decode("ascii")


def _images(images: ImageLike | Sequence[ImageLike]) -> list[str]:
    """One image, or a list/tuple of them -> base64 texts. Raises TypeError for anything else."""
    if _is_one_image(images):
        images = [images]
    elif not isinstance(images, (list, tuple)):
        raise TypeError(
            f"images must be one image (bytes, path, binary file object, PIL.Image) or a list/tuple of them, not {type(images).__module__}.{type(images).__qualname__}"
        )
    return [encode_image(i) for i in images]


def _vectors(vectors) -> list[list[float]]:
    if hasattr(vectors, "tolist"):  # numpy array or tensor
        vectors = vectors.tolist()
    vectors = list(vectors)
    if vectors and not isinstance(vectors[0], (list, tuple)):
        vectors = [vectors]  # one query vector
    return [[float(v) for v in row] for row in vectors]


@dataclass
class Call:
    """One HTTP request to make, and how to read its answer."""

    method: str
    path: str
    json: Any = None
    params: dict | None = None
    admin: bool = False
    retry: bool = True
    ok_statuses: tuple[int, ...] = ()  # non-2xx statuses whose body is still a valid answer (/readyz)


@dataclass
class Retry:
    """A retry the client made: the status it saw and how long it waited."""

    attempt: int
    status: int | None
    wait_s: float
    retry_after: float | None


def _retry_after(resp: httpx.Response) -> float | None:
    v = resp.headers.get("retry-after")
    if v is None:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff


def _body(resp: httpx.Response):
    try:
        return resp.json()
    except ValueError:
        return None


class _Base:
    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.25,
        max_backoff_s: float = 10.0,
        admin_token: str | None = None,
        headers: dict[str, str] | None = None,
        on_retry: Callable[[Retry], None] | None = None,
    ):
        self.url = (url or default_url()).rstrip("/")
        self.timeout, self.retries = timeout, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.admin_token = admin_token if admin_token is not None else os.environ.get("METALORA_ADMIN_TOKEN")
        self.headers = dict(headers or {})
        self.on_retry = on_retry
        self.retried: list[Retry] = []  # every retry this client made, for inspection

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter, never shorter than the server's Retry-After."""
        own = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
        return max(own, retry_after) if retry_after is not None else own

    def _headers(self, call: Call) -> dict[str, str]:
        h = dict(self.headers)
        if call.admin and self.admin_token:
            h["Authorization"] = f"Bearer {self.admin_token}"
        return h

    def _note_retry(self, attempt: int, status: int | None, wait: float, ra: float | None) -> None:
        r = Retry(attempt, status, wait, ra)
        self.retried.append(r)
        if self.on_retry:
            self.on_retry(r)

    @staticmethod
    def _check(call: Call, resp: httpx.Response):
        body = _body(resp)
        if resp.is_success or resp.status_code in call.ok_statuses:
            return body if body is not None else resp.text
        raise error_from_response(resp.status_code, body, resp.text, _retry_after(resp))

    # ------------------------------------------------------------- request builders
    @staticmethod
    def _list_call() -> Call:
        return Call("GET", "/v1/adapters")

    @staticmethod
    def _predict(images, adapter, top_k, include_seed=False) -> Call:
        body = {"adapter": adapter, "images": _images(images), "top_k": top_k}
        return Call("POST", "/v1/predict", {**body, "include_seed": True} if include_seed else body)

    @staticmethod
    def _embed(images, adapter, include_seed=False) -> Call:
        body = {"adapter": adapter, "images": _images(images)}
        return Call("POST", "/v1/embed", {**body, "include_seed": True} if include_seed else body)

    @staticmethod
    def _knn(images, vectors, adapter, k) -> Call:
        if (images is None) == (vectors is None):
            raise ValueError("give either images or vectors")
        body: dict[str, Any] = {"adapter": adapter, "k": k}
        if images is not None:
            body["images"] = _images(images)
        else:
            body["vectors"] = _vectors(vectors)
        return Call("POST", "/v1/knn", body)

    @staticmethod
    def _gallery_add(name, item_id, label, image, vector) -> Call:
        if (image is None) == (vector is None):
            raise ValueError("give either image or vector")
        body: dict[str, Any] = {"label": label}
        if image is not None:
            body["image"] = encode_image(image)
        else:
            body["vector"] = _vectors(vector)[0]
        return Call("PUT", f"/v1/adapters/{name}/gallery/{item_id}", body, admin=True)


def _results(body: dict, model: type[M]) -> list[M]:
    return [model.model_validate(r) for r in body["results"]]


class MetaLoRAClient(_Base):
    """Blocking client. `with MetaLoRAClient(url) as c: c.predict(["cat.jpg"], adapter="cifar10")`."""

    def __init__(self, url: str | None = None, *, transport: httpx.BaseTransport | None = None, **kw):
        super().__init__(url, **kw)
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "MetaLoRAClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, call: Call):
        """Send one call with retries on 503; returns the decoded JSON body (or text)."""
        attempt = 0
        while True:
            try:
                resp = self._http.request(call.method, call.path, json=call.json, params=call.params, headers=self._headers(call))
            except httpx.TransportError as e:
                raise TransportError(f"{call.method} {self.url}{call.path}: {e}") from e
            if resp.status_code == 503 and call.retry and attempt < self.retries:
                ra = _retry_after(resp)
                wait = self._wait(attempt, ra)
                self._note_retry(attempt, 503, wait, ra)
                time.sleep(wait)
                attempt += 1
                continue
            return self._check(call, resp)

    # ------------------------------------------------------------- inference
    def predict(self, images: ImageLike | Sequence[ImageLike], adapter: str | list[str] = "base", top_k: int = 5, include_seed: bool = False) -> list[PredictResult]:
        """Class scores: one result per image × adapter, image-major; `include_seed` adds each
        result's seed c(x) per adapted layer (`result.seed`, None for lora and base)."""
        return _results(self.request(self._predict(images, adapter, top_k, include_seed)), PredictResult)

    def embed(self, images: ImageLike | Sequence[ImageLike], adapter: str | list[str] = "base", include_seed: bool = False) -> list[EmbedResult]:
        return _results(self.request(self._embed(images, adapter, include_seed)), EmbedResult)

    def knn(self, images: ImageLike | Sequence[ImageLike] | None = None, *, vectors=None, adapter: str, k: int = 10) -> list[KnnResult]:
        return _results(self.request(self._knn(images, vectors, adapter, k)), KnnResult)

    # ------------------------------------------------------------- adapters and galleries
    def adapters(self) -> AdapterList:
        return AdapterList.model_validate(self.request(Call("GET", "/v1/adapters")))

    def adapter(self, name: str) -> AdapterInfo:
        return AdapterInfo.model_validate(self.request(Call("GET", f"/v1/adapters/{name}")))

    def load(self, name: str, pin: bool = False) -> LoadResult:
        return LoadResult.model_validate(self.request(Call("POST", f"/v1/adapters/{name}/load", params={"pin": pin}, admin=True)))

    def unload(self, name: str) -> UnloadResult:
        return UnloadResult.model_validate(self.request(Call("POST", f"/v1/adapters/{name}/unload", admin=True)))

    def gallery(self, name: str) -> GalleryInfo:
        return GalleryInfo.model_validate(self.request(Call("GET", f"/v1/adapters/{name}/gallery")))

    def gallery_add(self, name: str, item_id: str, label: str, *, image: ImageLike | None = None, vector=None) -> GalleryItem:
        return GalleryItem.model_validate(self.request(self._gallery_add(name, item_id, label, image, vector)))

    def gallery_remove(self, name: str, item_id: str) -> GalleryItem:
        return GalleryItem.model_validate(self.request(Call("DELETE", f"/v1/adapters/{name}/gallery/{item_id}", admin=True)))

    # ------------------------------------------------------------- operations
    def health(self) -> Health:
        return Health.model_validate(self.request(Call("GET", "/healthz", retry=False)))

    def ready(self) -> Ready:
        """Readiness without raising: a 503 while warming is an answer, not an error."""
        return Ready.model_validate(self.request(Call("GET", "/readyz", retry=False, ok_statuses=(503,))))

    def wait_ready(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> Ready:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                r = self.ready()
                if r.ready:
                    return r
            except TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TransportError(f"{self.url} not ready after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def metrics(self) -> str:
        return self.request(Call("GET", "/metrics", retry=False))


class AsyncMetaLoRAClient(_Base):
    """asyncio client with the same methods as `MetaLoRAClient`, awaited."""

    def __init__(self, url: str | None = None, *, transport: httpx.AsyncBaseTransport | None = None, limits: httpx.Limits | None = None, **kw):
        super().__init__(url, **kw)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, transport=transport, limits=limits or httpx.Limits(max_connections=256, max_keepalive_connections=256))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncMetaLoRAClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def request(self, call: Call):
        attempt = 0
        while True:
            try:
                resp = await self._http.request(call.method, call.path, json=call.json, params=call.params, headers=self._headers(call))
            except httpx.TransportError as e:
                raise TransportError(f"{call.method} {self.url}{call.path}: {e}") from e
            if resp.status_code == 503 and call.retry and attempt < self.retries:
                ra = _retry_after(resp)
                wait = self._wait(attempt, ra)
                self._note_retry(attempt, 503, wait, ra)
                await asyncio.sleep(wait)
                attempt += 1
                continue
            return self._check(call, resp)

    async def predict(self, images, adapter: str | list[str] = "base", top_k: int = 5, include_seed: bool = False) -> list[PredictResult]:
        return _results(await self.request(self._predict(images, adapter, top_k, include_seed)), PredictResult)

    async def embed(self, images, adapter: str | list[str] = "base", include_seed: bool = False) -> list[EmbedResult]:
        return _results(await self.request(self._embed(images, adapter, include_seed)), EmbedResult)

    async def knn(self, images=None, *, vectors=None, adapter: str, k: int = 10) -> list[KnnResult]:
        return _results(await self.request(self._knn(images, vectors, adapter, k)), KnnResult)

    async def adapters(self) -> AdapterList:
        return AdapterList.model_validate(await self.request(Call("GET", "/v1/adapters")))

    async def adapter(self, name: str) -> AdapterInfo:
        return AdapterInfo.model_validate(await self.request(Call("GET", f"/v1/adapters/{name}")))

    async def load(self, name: str, pin: bool = False) -> LoadResult:
        return LoadResult.model_validate(await self.request(Call("POST", f"/v1/adapters/{name}/load", params={"pin": pin}, admin=True)))

    async def unload(self, name: str) -> UnloadResult:
        return UnloadResult.model_validate(await self.request(Call("POST", f"/v1/adapters/{name}/unload", admin=True)))

    async def gallery(self, name: str) -> GalleryInfo:
        return GalleryInfo.model_validate(await self.request(Call("GET", f"/v1/adapters/{name}/gallery")))

    async def gallery_add(self, name: str, item_id: str, label: str, *, image=None, vector=None) -> GalleryItem:
        return GalleryItem.model_validate(await self.request(self._gallery_add(name, item_id, label, image, vector)))

    async def gallery_remove(self, name: str, item_id: str) -> GalleryItem:
        return GalleryItem.model_validate(await self.request(Call("DELETE", f"/v1/adapters/{name}/gallery/{item_id}", admin=True)))

    async def health(self) -> Health:
        return Health.model_validate(await self.request(Call("GET", "/healthz", retry=False)))

    async def ready(self) -> Ready:
        return Ready.model_validate(await self.request(Call("GET", "/readyz", retry=False, ok_statuses=(503,))))

    async def metrics(self) -> str:
        return await self.request(Call("GET", "/metrics", retry=False))
