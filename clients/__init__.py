"""Python client for the MetaLoRA service: `MetaLoRAClient` (sync), `AsyncMetaLoRAClient`, the
`metalora-client` CLI and a load generator (`clients.loadgen`)."""

from .client import AsyncMetaLoRAClient, Call, MetaLoRAClient, Retry, default_url, encode_image
from .errors import APIError, DeadlineError, MetaLoRAError, OverloadedError, TransportError
from .models import (
    AdapterInfo,
    AdapterList,
    AdapterSummary,
    AdapterVersion,
    EmbedResult,
    GalleryInfo,
    GalleryItem,
    Health,
    KnnResult,
    LoadResult,
    Neighbor,
    Prediction,
    PredictResult,
    Ready,
    UnloadResult,
)

__all__ = [
    "APIError",
    "AdapterInfo",
    "AdapterList",
    "AdapterSummary",
    "AdapterVersion",
    "AsyncMetaLoRAClient",
    "Call",
    "DeadlineError",
    "EmbedResult",
    "GalleryInfo",
    "GalleryItem",
    "Health",
    "KnnResult",
    "LoadResult",
    "MetaLoRAClient",
    "MetaLoRAError",
    "Neighbor",
    "OverloadedError",
    "PredictResult",
    "Prediction",
    "Ready",
    "Retry",
    "TransportError",
    "UnloadResult",
    "default_url",
    "encode_image",
]
