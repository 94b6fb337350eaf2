"""All service settings in one pydantic-settings class (`METALORA_*` environment variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from metalora.images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS
from metalora.store import DEFAULT_STORE

# Tokens that ship in examples and templates; a server must never run with one of them.
_WEAK_PARTS = ("changethis", "changeme", "placeholder", "replace-me", "your-token", "local-dev-token", "password")
MIN_TOKEN_CHARS = 16
MIN_DISTINCT_CHARS = 6  # "aaaaaaaaaaaaaaaa" is long and still guessable

NameList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Service configuration; every field reads `METALORA_<FIELD>` (e.g. `METALORA_PORT=9000`)."""

    model_config = SettingsConfigDict(env_prefix="METALORA_", extra="ignore", validate_default=True)

    store: Path = Field(DEFAULT_STORE, description="model store root (backbones/ and adapters/)")
    host: str = Field("127.0.0.1", description="bind address; use 0.0.0.0 in a container")
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(8001, ge=0, le=65535, description="Open Inference Protocol gRPC port (inference.GRPCInferenceService); 0 turns gRPC off")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto = CUDA when present, else CPU")
    backend: Literal["auto", "torch", "onnx"] = Field("auto", description="compute backend behind the engine; auto = the one measured faster on the device (metalora.onnx_backend.AUTO_BACKEND)")
    precision: Literal["auto", "fp32", "int8", "bf16"] = Field("fp32", description="numeric precision of the shared frozen prefix on the ONNX CPU backend (metalora.lowp); fp32 by default (the numbers the adapters were trained and scored with; int8 is opt-in, 2.1x faster here and within 0.5 points on every shipped adapter's test set, docs/benchmarks.md); auto = the fastest one here whose start-up accuracy check passes, int8 = ORT static INT8, bf16 = torch autocast where the CPU has avx512_bf16/amx_bf16; adapter tails stay FP32")
    admin_token: SecretStr | None = Field(None, description="bearer token for admin and gallery-write routes; unset = refused")

    max_batch_size: int = Field(32, ge=1, le=1024, description="images per engine batch")
    max_delay_ms: float = Field(10.0, ge=0, le=10_000, description="how long a batch waits to fill")
    max_queue: int = Field(512, ge=1, le=1_000_000, description="images accepted but not yet computed; beyond -> 503")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="deadline per request; expired work -> 504, never computed")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After sent with a 503")

    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="request body limit -> 413")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="per image, read from the header before decoding -> 413")
    max_aspect_ratio: float = Field(DEFAULT_MAX_ASPECT_RATIO, ge=1, le=10_000, description="long side / short side per image, from the header -> 422 extreme_aspect_ratio")
    max_images: int = Field(64, ge=1, le=4096, description="images per request")
    max_top_k: int = Field(100, ge=1)
    max_k: int = Field(100, ge=1, description="neighbours per k-NN query")
    decode_workers: int = Field(2, ge=1, le=64, description="threads decoding and preprocessing images")
    torch_threads: int = Field(0, ge=0, le=256, description="torch intra-op threads; 0 = torch's default (one per core); set it to the container's CPU limit")

    adapters: NameList = Field(default_factory=list, description="adapters loaded and warmed before /readyz (empty = every adapter in the store, up to lru_capacity)")
    pinned: NameList = Field(default_factory=list, description="adapters never evicted from the device")
    lru_capacity: int = Field(16, ge=1, description="adapters kept on the device; the least recently used unpinned one is evicted")
    warmup: bool = Field(True, description="run one dummy batch before turning ready")

    gallery_dir: Path | None = Field(None, description="where edited galleries live (default <store>/galleries)")
    gallery_dsn: SecretStr | None = Field(None, description="PostgreSQL connection string (libpq URI) for galleries shared by every replica; unset = embedded SQLite store in gallery_dir")
    gallery_db_timeout_s: float = Field(2.0, gt=0, le=60, description="wait for a gallery database connection before answering 503")
    gallery_db_pool: int = Field(4, ge=1, le=64, description="gallery database connections per replica")
    gallery_batch_max: int = Field(1000, ge=1, le=100_000, description="items per POST /v1/adapters/{name}/gallery batch")
    knn_exact_max: int = Field(50_000, ge=1, description="galleries larger than this use an HNSW index instead of exact search")
    metrics_max_adapters: int = Field(32, ge=1, description="distinct adapter label values in metrics; the rest are 'other'")
    log_level: str = Field("info", pattern=r"^(critical|error|warning|info|debug|trace)$")

    @field_validator("adapters", "pinned", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("gallery_dsn")
    @classmethod
    def _empty_dsn(cls, v: SecretStr | None):
        return None if v is None or not v.get_secret_value().strip() else v

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, v: SecretStr | None):
        if v is None or v.get_secret_value() == "":
            return None
        s = v.get_secret_value()
        if len(s) < MIN_TOKEN_CHARS or len(set(s)) < MIN_DISTINCT_CHARS or any(p in s.lower() for p in _WEAK_PARTS):
            raise ValueError(f"METALORA_ADMIN_TOKEN must be at least {MIN_TOKEN_CHARS} characters and not a placeholder (try: openssl rand -hex 24)")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if not set(self.pinned) <= set(self.adapters) and self.adapters:
            self.adapters = list(dict.fromkeys([*self.adapters, *self.pinned]))
        if len(self.pinned) > self.lru_capacity:
            raise ValueError(f"{len(self.pinned)} pinned adapters do not fit lru_capacity={self.lru_capacity}")
        return self

    @property
    def galleries(self) -> Path:
        return self.gallery_dir or (Path(self.store) / "galleries")
