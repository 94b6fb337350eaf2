"""The `metalora` commands' environment defaults (`METALORA_*`, read here and nowhere else in this layer).

The library's commands (`metalora.cli`) take every path as an option and read no environment;
the composed command (`metalora_serve.cli`) fills those options' defaults from this class
through Click's `default_map`, so an option given on the command line still wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommandSettings(BaseSettings):
    """Defaults of the library's commands; every field reads `METALORA_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="METALORA_", extra="ignore")

    cache: Path | None = Field(None, description="prefix-feature cache of train, eval and cache-features (--cache-dir); unset = ~/.cache/metalora")
    onnx_cache: Path | None = Field(None, description="ONNX graph cache of bench-onnx (--onnx-cache); unset = $XDG_CACHE_HOME/metalora/onnx, else ~/.cache/metalora/onnx")
    store: Path | None = Field(None, description="the service's model store, for thumbnails (--store), as `metalora serve` reads it")
    gallery_dir: Path | None = Field(None, description="the service's gallery directory, for thumbnails (--gallery-dir), as `metalora serve` reads it")

    def default_map(self) -> dict[str, dict[str, str]]:
        """Click's `default_map` (command -> option -> default) for the options whose variable is set."""
        from metalora.backends.base import onnx_cache_dir

        onnx_cache = self.onnx_cache or onnx_cache_dir(os.environ.get("XDG_CACHE_HOME"))
        wanted = {
            "train": {"cache_dir": self.cache},
            "eval": {"cache_dir": self.cache},
            "cache-features": {"cache_dir": self.cache},
            "thumbnails": {"store": self.store, "gallery_dir": self.gallery_dir},
            "bench-onnx": {"onnx_cache": onnx_cache},
        }
        return {cmd: {k: str(v) for k, v in opts.items() if v is not None} for cmd, opts in wanted.items()}
