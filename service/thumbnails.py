"""Gallery thumbnails as the service serves them: a sidecar file first, then the bundle's own.

A bundle's own items get sidecar files from `metalora thumbnails` (made at install time from the
data the manifest names; `scripts/serve.sh` runs it where that data is present); a self-contained
bundle may carry them inside its gallery (`metalora.thumbnails`). Items added over the API get
theirs written beside the edited galleries, under
`<gallery_dir>/<name>/<version>.thumbs/<sha256(id)[:32]>.webp` (ids may hold characters a file
name should not); an empty file there is a tombstone: the item was replaced by a bare vector and
has no picture, whatever the bundle had. Deleting an item deletes its sidecar file.

In a multi-replica deployment with galleries in PostgreSQL these sidecar files are per replica
(each replica's own `gallery_dir`): an item added through replica A has its thumbnail there only.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from metalora.bundle import GALLERY, BundleError, Gallery, read_manifest
from metalora.refs import AdapterRef
from metalora.store import ModelStore
from metalora.thumbnails import atomic_write, make_thumbnail, sidecar_path

log = logging.getLogger("metalora.service")


class ThumbnailStore:
    """Thumbnail bytes by adapter version and item id: sidecar first, then the bundle's gallery."""

    MEMORY_MAX = 20_000  # thumbnails kept in memory when the sidecar directory cannot be written (~2-3 KB each)

    def __init__(self, store: ModelStore, root: Path):
        self.store, self.root = store, Path(root)
        self._bundle: dict[str, tuple[dict[str, bytes], frozenset[str]]] = {}  # key -> ({item id: WebP bytes}, the bundle's ids), read once
        self._memory: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # fallback for an unwritable root, oldest first
        self._warned = False
        self._lock = threading.Lock()

    def sidecar(self, key: str, item_id: str) -> Path:
        name, version = AdapterRef.split(key)
        return sidecar_path(self.root, name, version, item_id)

    def get(self, key: str, item_id: str) -> bytes | None:
        """The item's thumbnail, or None when it has none (blocking: call off the event loop)."""
        with self._lock:
            if (key, item_id) in self._memory:
                return self._memory[(key, item_id)] or None  # empty: a tombstone
        f = self.sidecar(key, item_id)
        if f.is_file():
            return f.read_bytes() or None  # empty: a tombstone
        return self._bundle_gallery(key)[0].get(item_id)

    def is_bundle_item(self, key: str, item_id: str) -> bool:
        """Whether `item_id` is one of the bundle's own gallery items: the ids `metalora thumbnails`
        makes pictures for, so replacing or deleting one must leave a tombstone behind."""
        return item_id in self._bundle_gallery(key)[1]

    def put(self, key: str, item_id: str, data: bytes | None) -> None:
        """Record the thumbnail of an added or replaced item (None: it has none); atomic.

        Where the sidecar directory cannot be written (a read-only root filesystem and no
        `METALORA_GALLERY_DIR` volume), the thumbnail is kept in this process's memory instead
        (the newest MEMORY_MAX), with one warning: a missing picture never fails a gallery write.
        """
        dest = self.sidecar(key, item_id)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dest, data or b"")
        except OSError as e:  # read-only, full or missing volume: keep it in memory
            self._remember(key, item_id, data, e)
            return
        with self._lock:
            self._memory.pop((key, item_id), None)

    def _remember(self, key: str, item_id: str, data: bytes | None, err: OSError) -> None:
        with self._lock:
            if not self._warned:
                log.warning("gallery thumbnails cannot be written under %s (%s); keeping them in memory (set METALORA_GALLERY_DIR to a writable volume)", self.root, err.strerror or err)
                self._warned = True
            self._memory[(key, item_id)] = data or b""
            self._memory.move_to_end((key, item_id))
            while len(self._memory) > self.MEMORY_MAX:
                self._memory.popitem(last=False)

    def delete(self, key: str, item_id: str) -> None:
        """Forget a deleted item's picture: a tombstone for a bundle item (so a later
        `metalora thumbnails` run does not bring its picture back), no file for any other."""
        if self.is_bundle_item(key, item_id):
            self.put(key, item_id, None)
            return
        with self._lock:
            self._memory.pop((key, item_id), None)
        try:
            self.sidecar(key, item_id).unlink(missing_ok=True)
        except OSError:  # an unwritable root holds no sidecar to delete
            pass

    def _bundle_gallery(self, key: str) -> tuple[dict[str, bytes], frozenset[str]]:
        with self._lock:
            if key not in self._bundle:
                self._bundle[key] = self._read_bundle(key)
            return self._bundle[key]

    def _read_bundle(self, key: str) -> tuple[dict[str, bytes], frozenset[str]]:
        _, _, path = self.store.resolve(key)
        manifest = read_manifest(path)
        if GALLERY not in manifest["files"]:
            return {}, frozenset()
        try:  # checksums were verified when the gallery index was opened (service.knn)
            g = Gallery.from_tensors(load_file(str(Path(path) / GALLERY)))
        except (SafetensorError, OSError) as e:
            raise BundleError("bad_gallery", f"{path}: gallery is not a readable safetensors file ({e})") from None
        return {i: t for i, t in zip(g.ids, g.thumbnails or []) if t}, frozenset(g.ids)

    def drop(self, key: str) -> None:
        with self._lock:
            self._bundle.pop(key, None)


def thumbnail_of_base64(image: str, max_pixels: int) -> bytes | None:
    """A request's base64 image (a `data:` URL prefix accepted) -> its thumbnail; None when it
    does not decode (the route has already refused such an image by then)."""
    if image.startswith("data:"):
        image = image.partition(",")[2]
    try:
        return make_thumbnail(base64.b64decode(image, validate=True), max_pixels=max_pixels)
    except (binascii.Error, ValueError):  # ImageError is a ValueError
        return None


def media_type(data: bytes) -> str:
    """WebP or JPEG (what bundles carry), sniffed from the file's magic bytes."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    return "application/octet-stream"
