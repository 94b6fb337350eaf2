"""The model store on disk: `backbones/<name>/manifest.json`, `adapters/<name>/<version>/`."""

from __future__ import annotations

import json
from pathlib import Path

from .bundle import MANIFEST, BundleError, check_name, read_manifest
from .refs import AdapterRef

DEFAULT_STORE = Path(__file__).resolve().parent.parent / "model_store"


def safe_join(root: Path, *parts: str) -> Path:
    """Join validated names under `root`; the result never leaves the root."""
    for p in parts:
        check_name(p)
    root = root.resolve()
    out = root.joinpath(*parts).resolve()
    if out != root and root not in out.parents:
        raise BundleError("invalid_name", f"path {'/'.join(parts)!r} leaves the model store")
    return out


def version_order(v: str):
    """Sort key of versions: numeric ones by number, then the others by name (the last is the latest)."""
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """`name` or `name@version` -> (name, version or None)."""
    name, version = AdapterRef.split(ref)
    check_name(name)
    if version:
        check_name(version, "version")
    return name, version


class ModelStore:
    """Read-only view of a store directory: which adapters and versions exist, and where."""

    def __init__(self, root: str | Path = DEFAULT_STORE):
        self.root = Path(root).resolve()

    def backbone_manifest(self, name: str) -> dict | None:
        f = safe_join(self.root / "backbones", name) / MANIFEST
        return json.loads(f.read_text()) if f.is_file() else None

    def adapter_names(self) -> list[str]:
        d = self.root / "adapters"
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        d = safe_join(self.root / "adapters", name)
        if not d.is_dir():
            return []
        vs = [p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()]
        return sorted(vs, key=version_order)

    def resolve(self, ref: str) -> tuple[str, str, Path]:
        """`name[@version]` -> (name, version, bundle dir); latest version when none is given."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise BundleError("unknown_adapter", f"adapter {name!r} is not in the store {self.root}")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise BundleError("unknown_adapter", f"adapter {name!r} has no version {version!r}; versions: {versions}")
        return name, version, safe_join(self.root / "adapters", name, version)

    def manifest(self, ref: str) -> dict:
        return read_manifest(self.resolve(ref)[2])
