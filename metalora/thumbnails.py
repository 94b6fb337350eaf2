"""Gallery thumbnails: one small WebP per item, so a k-NN answer can be shown as pictures.

A thumbnail fits in `THUMBNAIL_SIZE` × `THUMBNAIL_SIZE` pixels (aspect ratio kept; never
enlarged) and is lossy WebP at `THUMBNAIL_QUALITY`: about 1–2 KB for a 32 px CIFAR-10 image.
"""

from __future__ import annotations

import io
import json
import os
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


def thumbnails_for(specs: list[str], ids: list[str], max_side: int = THUMBNAIL_SIZE) -> list[bytes | None]:
    """Thumbnails of the source images behind gallery `ids`, found through the data specs they
    were listed from (`metalora.data`: ids are the items' ids, `task/`-prefixed for joint specs).
    An id no spec lists gets None."""
    from .data import DataSpec, list_items

    want = set(ids)
    found: dict[str, bytes] = {}
    for text in specs:
        spec = DataSpec.parse(text)
        prefix = f"{spec.task}/" if spec.task else ""
        for item in list_items(spec):
            key = prefix + item.id
            if key in want and key not in found:
                found[key] = make_thumbnail(item.read(), max_side)
    return [found.get(i) for i in ids]


def add_thumbnails(bundle: str | Path, max_side: int = THUMBNAIL_SIZE) -> dict:
    """Rewrite a bundle's gallery with thumbnails of its items' source images, found through the
    data specs its manifest records (paths relative to the working directory, as `metalora train`
    recorded them). Embeddings, labels, ids, weights and every other manifest field stay as they
    are; the manifest's size and sha256 of the gallery file are updated. Returns a summary.

    Raises BundleError when the bundle has no gallery or its files fail their checksums, and
    FileNotFoundError when a data spec's source is missing.
    """
    from safetensors.torch import load_file, save_file

    from .backbones.base import sha256_file
    from .bundle import GALLERY, MANIFEST, BundleError, Gallery, read_manifest, verify_files

    path = Path(bundle)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    if GALLERY not in manifest["files"]:
        raise BundleError("no_gallery", f"{path} has no {GALLERY}")
    g = Gallery.from_tensors(load_file(str(path / GALLERY)))
    g.thumbnails = thumbnails_for(manifest["training"]["data"], g.ids, max_side)
    tmp_g, tmp_m = path / f".{GALLERY}.tmp", path / f".{MANIFEST}.tmp"
    save_file(g.to_tensors(), str(tmp_g))
    manifest["files"][GALLERY] = {"sha256": sha256_file(tmp_g), "bytes": tmp_g.stat().st_size}
    tmp_m.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_g, path / GALLERY)  # gallery first, manifest last: the manifest names the new file
    os.replace(tmp_m, path / MANIFEST)
    have = [t for t in g.thumbnails if t]
    return {"bundle": str(path), "items": len(g.ids), "thumbnails": len(have), "thumbnail_bytes": sum(map(len, have)), "gallery_bytes": manifest["files"][GALLERY]["bytes"]}


if __name__ == "__main__":  # python -m metalora.thumbnails model_store/adapters/*/1
    import sys

    for b in sys.argv[1:]:
        print(json.dumps(add_thumbnails(b)), flush=True)
