"""Typed results of the HTTP API (the JSON contract of docs/api.md). Unknown fields are kept,
so a newer server does not break an older client."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Seeded(_Model):
    """`seed` is there when the server sent it (include_seed=True), else None and left out of dumps."""

    @model_serializer(mode="wrap")
    def _omit_unsent_seed(self, handler: SerializerFunctionWrapHandler):
        d = handler(self)
        for k in ("seed", "unknown"):
            if k not in self.model_fields_set:
                d.pop(k, None)
        return d


class Prediction(_Model):
    label: str
    index: int
    score: float


class PredictResult(_Seeded):
    adapter: str
    version: str
    predictions: list[Prediction]
    seed: dict[str, list[float]] | None = None  # c(x) per adapted layer, with include_seed=True
    unknown: bool | None = None  # true: below the bundle's k-NN threshold (likely none of its classes); None: no threshold

    @property
    def top(self) -> Prediction:
        return self.predictions[0]


class EmbedResult(_Seeded):
    adapter: str
    version: str
    embedding: list[float]
    dim: int
    seed: dict[str, list[float]] | None = None  # c(x) per adapted layer, with include_seed=True


class Neighbor(_Model):
    id: str
    label: str
    score: float


class KnnResult(_Seeded):
    adapter: str
    version: str
    neighbors: list[Neighbor]
    label: str | None = None
    votes: dict[str, int] = Field(default_factory=dict)
    unknown: bool | None = None  # true: nearest neighbour below the bundle's k-NN threshold; None: no threshold


class AdapterSummary(_Model):
    name: str
    versions: list[str]
    latest: str | None = None
    loaded: list[str] = Field(default_factory=list)
    pinned: list[str] = Field(default_factory=list)


class AdapterList(_Model):
    backbone: dict = Field(default_factory=dict)
    capacity: int | None = None
    adapters: list[AdapterSummary]


class AdapterVersion(_Model):
    version: str
    loaded: bool = False
    pinned: bool = False
    format: str | None = None
    ranks: list[int] | None = None
    targets: list[str] | None = None
    num_classes: int | None = None
    labels: list[str] | None = None
    trainable_params: int | None = None
    metrics: dict | None = None
    gallery_items: int | None = None
    error: str | None = None


class AdapterInfo(_Model):
    name: str
    latest: str | None = None
    versions: list[AdapterVersion]


class LoadResult(_Model):
    adapter: str
    version: str
    loaded: bool
    pinned: bool = False
    load_seconds: float | None = None


class UnloadResult(_Model):
    adapter: str
    version: str
    unloaded: bool
    deferred: bool = False


class GalleryInfo(_Model):
    adapter: str
    version: str
    items: int
    dim: int
    index: str
    source: str
    labels: dict[str, int] = Field(default_factory=dict)


class GalleryItem(_Model):
    adapter: str
    version: str
    id: str
    label: str | None = None
    items: int
    created: bool | None = None
    deleted: bool | None = None


class Health(_Model):
    status: str


class Ready(_Model):
    status: str
    device: str = ""
    backend: str = ""
    loaded: list[str] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.status == "ready"
