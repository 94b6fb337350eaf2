"""Where the benchmarks (and the research scripts) find the shared data and the ONNX graph cache.

The only module of this layer that reads the environment (`METALORA_SHARED`, `METALORA_ONNX_CACHE`,
`XDG_CACHE_HOME`); the library takes both as arguments, and the benchmarks pass them explicitly
(to the runners they build and, as settings, to the servers they start).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# `../shared` beside the checkout: where this project's data sets live (docs/models.md, "Training").
CHECKOUT_SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


class BenchSettings(BaseSettings):
    """Paths of the benchmark runs; every field reads `METALORA_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="METALORA_", extra="ignore")

    shared: Path = Field(CHECKOUT_SHARED, description="the directory whose data/ holds the ImageNet sample and the adapters' data sets (default: ../shared beside the checkout)")
    onnx_cache: Path | None = Field(None, description="ONNX graph cache of the runners built here and of the servers started here; unset = $XDG_CACHE_HOME/metalora/onnx, else ~/.cache/metalora/onnx")

    @field_validator("onnx_cache", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @property
    def data(self) -> Path | None:
        """`shared`/data when it is a directory (INT8 calibration, accuracy sets), else None."""
        return self.shared / "data" if (self.shared / "data").is_dir() else None

    @property
    def onnx_cache_dir(self) -> Path:
        from metalora.backends.base import onnx_cache_dir

        return self.onnx_cache or onnx_cache_dir(os.environ.get("XDG_CACHE_HOME"))
