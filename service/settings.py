"""All service settings in one pydantic-settings class (`METALORA_*` environment variables).

`check_environment` refuses a `METALORA_*` variable that nothing reads (a typo such as
`METALORA_MAX_BATCH`), naming the closest real one: `metalora serve` calls it before start-up.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
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
PREFIX = "METALORA_"


class Settings(BaseSettings):
    """Service configuration; every field reads `METALORA_<FIELD>` (e.g. `METALORA_PORT=9000`)."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", validate_default=True)

    store: Path = Field(DEFAULT_STORE, description="model store root (backbones/ and adapters/)")
    host: str = Field("127.0.0.1", description="bind address; use 0.0.0.0 in a container")
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(8001, ge=0, le=65535, description="Open Inference Protocol gRPC port (inference.GRPCInferenceService); 0 turns gRPC off")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto = CUDA when present, else CPU")
    backend: Literal["auto", "torch", "onnx"] = Field("auto", description="compute backend behind the engine; auto = the one measured faster on the device (metalora.backends.base.AUTO_BACKEND)")
    precision: Literal["auto", "fp32", "int8", "bf16"] = Field("fp32", description="numeric precision of the shared frozen prefix on the ONNX CPU backend (metalora.backends.lowp); fp32 by default (the numbers the adapters were trained and scored with; int8 is opt-in, 2.1x faster here and within 0.5 points on every shipped adapter's test set, docs/benchmarks.md); auto = the fastest one here whose start-up accuracy check passes, int8 = ORT static INT8, bf16 = torch autocast where the CPU has avx512_bf16/amx_bf16; adapter tails stay FP32")
    onnx_cache: Path | None = Field(None, description="where ONNX graphs and the precision auto decision are cached, named by content hash (a restart reuses them; a read-only one is read from); unset = $XDG_CACHE_HOME/metalora/onnx, else ~/.cache/metalora/onnx")
    calibration_data: str | None = Field(None, description="the deployment's own INT8 calibration images: data specs (ImageFolder directories or zips, metalora.data) separated by ';'; 16 of them (a quarter at most) are held out for the start-up check; unset = shared's data, else scikit-learn digits and scikit-image photos")
    shared: Path | None = Field(None, description="a directory whose data/ is laid out as this project's ../shared/data (imagenet-sample/val.zip, <task>/train.zip): without calibration_data, INT8 calibrates on its ImageNet-sample photos (every 8th; the rest are the start-up check's) and the shipped adapters' training splits; unset = none")
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
    model_control_mode: Literal["none", "poll", "explicit"] = Field("poll", description="how the model store's changes reach the server, as Triton names it: none = the store as it was at start; poll = new, changed and deleted versions picked up every repository_poll_s; explicit = only repository load / unload change what serves (an adapter serves once loaded)")
    repository_poll_s: float = Field(5.0, gt=0, le=3600, description="seconds between two looks at the model store in poll mode")
    version_policy: str = Field("latest 1", description="which valid versions of an adapter serve: 'latest N' (the N highest) or 'all', and per adapter 'name=...', comma-separated (e.g. 'latest 1,cifar10=all'); a version outside it answers 404 unknown_adapter")

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

    @field_validator("version_policy")
    @classmethod
    def _policy(cls, v: str):
        from .repository import parse_policies

        parse_policies(v)  # raises ValueError naming the bad part
        return v

    @field_validator("gallery_dsn")
    @classmethod
    def _empty_dsn(cls, v: SecretStr | None):
        return None if v is None or not v.get_secret_value().strip() else v

    @field_validator("onnx_cache", "calibration_data", "shared", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

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
    def _onnx_cache_default(self):
        if self.onnx_cache is None:  # resolved once, here: the library reads no environment
            from metalora.backends.base import onnx_cache_dir

            self.onnx_cache = onnx_cache_dir(os.environ.get("XDG_CACHE_HOME"))
        return self

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

    @property
    def shared_data(self) -> Path | None:
        """`shared`/data when it is a directory, else None."""
        return self.shared / "data" if self.shared is not None and (self.shared / "data").is_dir() else None

    @property
    def calibration(self):
        """The images INT8 calibration and the start-up check draw from (`CalibrationSet`)."""
        from metalora.backends.calib import CalibrationSet

        return CalibrationSet(images=self.calibration_data, data=self.shared_data)


# METALORA_* variables read outside this class, by what reads them; `check_environment` accepts
# them. tests/test_cli_help.py checks each is read where it says, and that this covers every
# other settings class (metalora_serve.settings, bench.settings) and the client.
ELSEWHERE = {
    "METALORA_URL": "read by clients/client.py",
    "METALORA_CACHE": "read by metalora_serve/settings.py",
    "METALORA_BIN": "read by bench/gpu.sh",
    "METALORA_GPU_DRYRUN": "read by bench/gpu.sh",
    "METALORA_GPU_JSON": "read by bench/gpu.sh",
    "METALORA_GPU_DOC": "read by bench/gpu.sh",
    "METALORA_TEST_ARTIFACTS": "read by tests/test_console.py",
    "METALORA_UPDATE_SCREENSHOT": "read by tests/test_console.py",
}


class UnknownSetting(ValueError):
    """A METALORA_* variable in the environment that nothing reads (a typo, or a removed setting)."""


def known_variables() -> dict[str, str]:
    """Every METALORA_* variable this project reads -> the Settings field, or what else reads it."""
    return {**ELSEWHERE, **{f"{PREFIX}{name.upper()}": name for name in Settings.model_fields}}


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Raise UnknownSetting, one line naming the closest known variable, for a METALORA_*
    variable in `environ` (default: this process's environment) that nothing reads."""
    environ = os.environ if environ is None else environ
    known = known_variables()
    unknown = sorted(k for k in environ if k.upper().startswith(PREFIX) and k.upper() not in known)
    if not unknown:
        return
    first = unknown[0]
    # Compared without the common prefix, which would make every name look alike.
    close = difflib.get_close_matches(first.upper().removeprefix(PREFIX), [k.removeprefix(PREFIX) for k in known], n=1)
    hint = f"; did you mean {PREFIX}{close[0]} ({known[PREFIX + close[0]]})?" if close else " (docs/api.md lists the settings)"
    more = f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
    raise UnknownSetting(f"unknown setting {first}{hint}{more}")
