"""Request and response bodies of the HTTP API (the JSON contract of issue 4 / DESIGN.md §5)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from metalora.refs import REF_PATTERN, AdapterRef, RefError

AdapterName = Annotated[str, StringConstraints(min_length=1, max_length=130, pattern=REF_PATTERN)]  # parsed into an AdapterRef by the route
# Segments joined by "/" (bundle items are named after their source file, e.g. train/cat/0377.jpg);
# no segment is empty or starts with "." (so "." and ".." never appear, which URLs would rewrite).
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*(/[A-Za-z0-9_:-][A-Za-z0-9._:-]*)*$")]
MAX_FANOUT = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _adapters(v):
    return [v] if isinstance(v, str) else v


class ImagesRequest(_Strict):
    """Images as base64 strings (a `data:` URL prefix is accepted) and one adapter or a list."""

    adapter: AdapterName | Annotated[list[AdapterName], Field(min_length=1, max_length=MAX_FANOUT)] = Field(
        "base", description="`base`, `name` or `name@version`; a list fans out: one result per image × adapter"
    )
    images: list[str] | None = Field(None, min_length=1, description="base64-encoded image files (JPEG, PNG, WebP, BMP, GIF, TIFF)")

    @field_validator("adapter", mode="before")
    @classmethod
    def _names(cls, v):
        """A malformed name is 422 `invalid_name` (not a union-validation dump), as on the path routes."""
        for n in [v] if isinstance(v, str) else v if isinstance(v, list) else []:
            if isinstance(n, str):
                try:
                    AdapterRef.parse(n)
                except RefError as e:
                    raise PydanticCustomError("invalid_name", "{message}", {"message": str(e)}) from None
        return v

    @property
    def adapters(self) -> list[str]:
        return list(_adapters(self.adapter))


class PredictRequest(ImagesRequest):
    top_k: int = Field(5, ge=1, description="labels per result (capped by the adapter's class count)")
    include_seed: bool = Field(False, description="add each result's seed c(x), per adapted layer")

    @model_validator(mode="after")
    def _need_images(self):
        if not self.images:
            raise ValueError("images: at least one image is required")
        return self


class EmbedRequest(ImagesRequest):
    include_seed: bool = Field(False, description="add each result's seed c(x), per adapted layer")

    @model_validator(mode="after")
    def _need_images(self):
        if not self.images:
            raise ValueError("images: at least one image is required")
        return self


class KnnRequest(ImagesRequest):
    """Images or query vectors (never both) against the adapter's gallery."""

    vectors: list[list[float]] | None = Field(None, min_length=1, description="query embeddings (any norm; normalised here)")
    k: int = Field(10, ge=1, description="neighbours per query")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.images is None) == (self.vectors is None):
            raise ValueError("give either images or vectors (exactly one of them)")
        if self.vectors is not None and len(self.adapters) != 1:
            raise ValueError("vectors belong to one adapter's embedding space: name exactly one adapter")
        return self


class Prediction(BaseModel):
    label: str
    index: int
    score: float


def _seed_field():
    return Field(
    None,
    description="only with include_seed=true: the input-conditioned seed c(x) per adapted layer, {layer: [numbers]} "
    "in the adapter's target order (cp: R numbers, the CP weights; tr: R3×R1, the core C row-major); null for lora and base",
    )


class _SeededResult(BaseModel):
    """A result that carries `seed` only when the request asked for it (absent, not null, otherwise)."""

    @model_serializer(mode="wrap")
    def _omit_unasked_seed(self, handler: SerializerFunctionWrapHandler):
        d = handler(self)
        if "seed" not in self.model_fields_set:
            d.pop("seed", None)
        return d


def _unknown_field():
    return Field(
        None,
        description="true when the image's nearest gallery item is less similar (cosine) than the bundle's calibrated "
        "k-NN threshold (manifest `calibration.knn_threshold`): the image is likely none of the adapter's classes. "
        "The ranked labels are still given. Absent for bundles without a threshold and for base",
    )


class _UnknownResult(_SeededResult):
    """Carries `unknown` only where the adapter has a threshold (absent, not null, otherwise)."""

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler):
        d = handler(self)
        if "seed" not in self.model_fields_set:
            d.pop("seed", None)
        if getattr(self, "unknown", None) is None:
            d.pop("unknown", None)
        return d


class PredictResult(_UnknownResult):
    adapter: str
    version: str
    predictions: list[Prediction]
    unknown: bool | None = _unknown_field()
    seed: dict[str, list[float]] | None = _seed_field()


class PredictResponse(BaseModel):
    results: list[PredictResult] = Field(description="one per image × adapter: image 0 with every adapter, then image 1, ...")


class EmbedResult(_SeededResult):
    adapter: str
    version: str
    embedding: list[float]
    dim: int
    seed: dict[str, list[float]] | None = _seed_field()


class EmbedResponse(BaseModel):
    results: list[EmbedResult]


class Neighbor(BaseModel):
    id: str
    label: str
    score: float = Field(description="cosine similarity")


class KnnResult(_UnknownResult):
    adapter: str
    version: str
    neighbors: list[Neighbor]
    label: str | None = Field(description="similarity-weighted vote of the neighbours (as in metalora.evaluate)")
    votes: dict[str, int] = Field(description="neighbours per label")
    unknown: bool | None = _unknown_field()


class KnnResponse(BaseModel):
    results: list[KnnResult]


class GalleryItemRequest(_Strict):
    """A gallery item: its label and either an image (embedded by the adapter) or a ready vector."""

    label: str = Field(min_length=1, max_length=200)
    image: str | None = Field(None, description="base64 image")
    vector: list[float] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.image is None) == (self.vector is None):
            raise ValueError("give either image or vector (exactly one of them)")
        return self


class GalleryBatchItem(GalleryItemRequest):
    """One item of a batch: its id, its label, and an image or a vector."""

    id: ItemId


class GalleryBatchRequest(_Strict):
    """Items to add or replace in one gallery, all or none (at most `METALORA_GALLERY_BATCH_MAX`)."""

    items: list[GalleryBatchItem] = Field(min_length=1)


class GalleryBatchResponse(BaseModel):
    adapter: str
    version: str
    items: int = Field(description="gallery size after the write")
    written: int
    created: int = Field(description="ids that were new")
    replaced: int = Field(description="ids that existed and now hold the new label and vector")


class GalleryInfo(BaseModel):
    adapter: str
    version: str
    items: int
    dim: int
    index: Literal["flat", "hnsw", "none"]
    source: Literal["bundle", "edited", "none"]
    store: Literal["embedded", "postgres"] = Field(description="where the items are kept: SQLite beside the store, or PostgreSQL shared by every replica")
    labels: dict[str, int] = Field(description="items per label")


class GalleryItemResponse(BaseModel):
    adapter: str
    version: str
    id: str
    label: str | None
    items: int
    created: bool | None = None
    deleted: bool | None = None


class AdapterVersion(BaseModel):
    version: str
    loaded: bool
    pinned: bool
    state: Literal["available", "incomplete", "invalid", "retired"] = Field("available", description="the model repository's: available (whole, in the version policy: it serves), incomplete (a file missing or short: a copy in progress), invalid (manifest or checksum wrong), retired (outside the version policy); `error` says why")
    format: str | None = None
    ranks: list[int] | None = None
    targets: list[str] | None = None
    num_classes: int | None = None
    labels: list[str] | None = None
    trainable_params: int | None = None
    cut: str | None = Field(None, description="where the bundle's shared prefix ends (e.g. 'blocks[:5]'; 'blocks[:6]', the default, for bundles "
                                              "that record none); it loads on a store cut there or earlier")
    metrics: dict | None = None
    gallery_items: int | None = None
    error: str | None = Field(None, description="why the bundle cannot be read, if it cannot")


class AdapterSummary(BaseModel):
    name: str
    versions: list[str]
    latest: str | None
    loaded: list[str]
    pinned: list[str]


class AdapterList(BaseModel):
    backbone: dict
    capacity: int
    adapters: list[AdapterSummary]


class AdapterInfo(BaseModel):
    name: str
    latest: str | None
    versions: list[AdapterVersion]


class LoadResponse(BaseModel):
    adapter: str
    version: str
    loaded: bool
    pinned: bool
    load_seconds: float


class UnloadResponse(BaseModel):
    adapter: str
    version: str
    unloaded: bool
    deferred: bool = Field(description="true when requests in flight still use it: it goes when they are done")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    device: str
    backend: str
    precision: str = Field("", description="the shared prefix's precision on the ONNX CPU backend (fp32 | int8 | bf16; what `auto` chose); fp32 elsewhere, empty before the backend is up")
    loaded: list[str]
    failed: dict[str, str]




class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable error code (the table in docs/api.md)")
    message: str = Field(description="for people")


class ErrorResponse(BaseModel):
    """The one error shape of every non-2xx answer."""

    error: ErrorDetail


_STATUS = {
    400: "malformed request framing (e.g. a bad Content-Length)",
    401: "missing or wrong bearer token",
    403: "admin routes are disabled (no METALORA_ADMIN_TOKEN)",
    404: "no such adapter, version, loaded adapter or gallery item",
    409: "the stored bundle or gallery cannot be served as asked",
    413: "body, image or request over a size limit",
    415: "a body or image in a format that is not accepted",
    422: "a request that does not fit the schema or the limits, or an unusable image",
    503: "overloaded, still warming or shutting down (see Retry-After)",
    504: "the request's deadline passed (from its arrival) before its answer",
}


def error_responses(*statuses: int, model: type[BaseModel] = ErrorResponse) -> dict:
    """OpenAPI `responses` for these statuses, each with the ErrorResponse body (`/v2`: the
    protocol's error, `model=ProtocolError`)."""
    return {s: {"model": model, "description": _STATUS[s]} for s in statuses}
