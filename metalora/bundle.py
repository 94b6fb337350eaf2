"""Adapter bundles (DESIGN.md §4): safetensors + a checksummed, self-describing manifest.json.

Loading verifies every checksum, the backbone identity and every tensor's name and shape, and
refuses anything else with a message that says what is wrong. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapters import Adapter, AdapterConfig
from .backbones.base import Backbone, sha256_file

SCHEMA = "metalora-bundle/1"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
WEIGHTS = "weights.safetensors"
GALLERY = "gallery.safetensors"
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle that cannot be used; `code` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise BundleError("invalid_name", f"{what} {name!r} must match {NAME_RE.pattern}")
    return name


PQ_BITS = 8  # bits per sub-quantizer code: 256 centroids each, one uint8 per sub-vector


def pq_decode(centroids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Product-quantised vectors back to L2-normalised float32 (N, D).

    centroids (M, 256, D / M) fp16: each sub-quantizer's codebook; codes (N, M) uint8. Item i is
    the concatenation over m of centroids[m, codes[i, m]] (Jégou, Douze & Schmid, "Product
    quantization for nearest neighbor search", IEEE TPAMI 2011), then L2-normalised: the gallery
    is searched by cosine similarity.
    """
    m, _, sub = centroids.shape
    parts = centroids.float()[torch.arange(m)[None, :], codes.long()]  # (N, M, D / M)
    return torch.nn.functional.normalize(parts.reshape(codes.shape[0], m * sub), dim=-1)


@dataclass
class Gallery:
    """k-NN gallery of one adapter: L2-normalised embeddings, label indices and item ids.

    With `pq` the gallery is stored product-quantised (`compress`): `embeddings` are then the
    decoded vectors, exactly what a reader of the file gets.
    """

    embeddings: torch.Tensor  # (N, D) float
    labels: torch.Tensor  # (N,) int64, indices into the adapter's labels
    ids: list[str]
    # Per item: a small image file (metalora.thumbnails, WebP <= 64 px), or None for an item that has
    # none (added as a bare vector). None for the whole gallery: no thumbnails at all (older bundles).
    thumbnails: list[bytes | None] | None = None
    pq: tuple[torch.Tensor, torch.Tensor] | None = None  # (centroids (M, 256, D/M) fp16, codes (N, M) uint8)

    @staticmethod
    def check_pq(m: int, d: int, n: int) -> None:
        """Raise BundleError unless n items of dimension d can be product-quantised with m sub-quantizers."""
        if m < 1 or d % m:
            raise BundleError("gallery_pq", f"product quantisation needs the embedding size {d} to be a multiple of the {m} sub-quantizers")
        if n < 2**PQ_BITS:
            raise BundleError("gallery_pq", f"product quantisation needs at least {2**PQ_BITS} gallery items to train its codebooks, this gallery would have {n}")

    def compress(self, m: int, seed: int = 0) -> "Gallery":
        """This gallery product-quantised with `m` sub-quantizers of 8 bits: m bytes an item instead of
        2·D (fp16), plus a 2·256·D-byte codebook. The codebooks are k-means (FAISS `ProductQuantizer`)
        on these embeddings. Raises BundleError when D is not a multiple of m or there are fewer
        than 256 items to train on.
        """
        import faiss

        n, d = self.embeddings.shape
        self.check_pq(m, d, n)
        x = torch.nn.functional.normalize(self.embeddings.float(), dim=-1).numpy()
        pq = faiss.ProductQuantizer(d, m, PQ_BITS)
        pq.cp.seed = seed
        pq.cp.min_points_per_centroid = 1  # small galleries train on what they have, without FAISS's warning per sub-quantizer
        pq.train(x)
        codes = torch.from_numpy(pq.compute_codes(x))  # (N, M) uint8
        centroids = torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(m, 2**PQ_BITS, d // m)).to(torch.float16)
        return Gallery(pq_decode(centroids, codes), self.labels, self.ids, self.thumbnails, (centroids, codes))

    def __post_init__(self):
        n = self.embeddings.shape[0]
        if self.embeddings.dim() != 2 or self.labels.shape != (n,) or len(self.ids) != n:
            raise BundleError(
                "gallery_shape",
                f"gallery needs (N, D) embeddings, (N,) labels and N ids; got "
                f"{tuple(self.embeddings.shape)}, {tuple(self.labels.shape)}, {len(self.ids)}",
            )
        if any("\n" in i for i in self.ids):
            raise BundleError("gallery_ids", "gallery ids may not contain newlines")
        if self.thumbnails is not None and len(self.thumbnails) != n:
            raise BundleError("gallery_shape", f"gallery has {n} items but {len(self.thumbnails)} thumbnails")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors layout (`metalora-gallery`): `embeddings` (N, D) fp16, `labels` (N,) int64,
        `ids_utf8` the ids joined by newlines; with thumbnails also `thumbnails` (B,) uint8, the
        image files back to back, and `thumbnail_offsets` (N + 1,) int64: item i is bytes
        [offsets[i], offsets[i + 1]) (empty: no thumbnail). Readers that predate thumbnails ignore them.
        A product-quantised gallery has `pq_centroids` (M, 256, D/M) fp16 and `pq_codes` (N, M) uint8
        instead of `embeddings` (see `pq_decode`)."""
        ids = "\n".join(self.ids).encode("utf-8")
        out = {
            "labels": self.labels.to(torch.int64).contiguous(),
            "ids_utf8": _bytes_tensor(ids),
        }
        if self.pq is not None:
            out["pq_centroids"], out["pq_codes"] = (t.contiguous() for t in self.pq)
        else:
            out["embeddings"] = self.embeddings.to(torch.float16).contiguous()
        if self.thumbnails is not None:
            sizes = [len(b) if b else 0 for b in self.thumbnails]
            out["thumbnails"] = _bytes_tensor(b"".join(b for b in self.thumbnails if b))
            out["thumbnail_offsets"] = torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Gallery":
        pq = None
        if "pq_codes" in t or "pq_centroids" in t:
            cent, codes = t.get("pq_centroids"), t.get("pq_codes")
            ok = (cent is not None and codes is not None and cent.dim() == 3 and codes.dim() == 2 and cent.shape[1] == 2**PQ_BITS
                  and codes.dtype == torch.uint8 and codes.shape[1] == cent.shape[0] and cent.dtype == torch.float16)
            if not ok:
                got = {k: (tuple(v.shape), str(v.dtype)) for k, v in t.items() if k.startswith("pq_")}
                raise BundleError("gallery_pq", f"a product-quantised gallery needs pq_centroids (M, 256, D/M) float16 and pq_codes (N, M) uint8; got {got}")
            pq = (cent, codes)
            t = {**t, "embeddings": pq_decode(cent, codes)}
        missing = {"embeddings", "labels", "ids_utf8"} - set(t)
        if missing:
            raise BundleError("gallery_keys", f"gallery misses tensors {sorted(missing)}")
        raw = bytes(t["ids_utf8"].tolist()).decode("utf-8")
        ids = raw.split("\n") if raw else []
        thumbs = None
        if "thumbnails" in t or "thumbnail_offsets" in t:
            blob, off = t.get("thumbnails"), t.get("thumbnail_offsets")
            if blob is None or off is None or off.shape != (len(ids) + 1,) or int(off[0]) != 0 or int(off[-1]) != blob.numel() or bool((off.diff() < 0).any()):
                raise BundleError("gallery_thumbnails", f"gallery thumbnails do not fit: {len(ids)} items need {len(ids) + 1} increasing offsets from 0 to the blob's size")
            data, o = blob.numpy().tobytes(), off.tolist()
            thumbs = [data[a:b] or None for a, b in zip(o, o[1:])]
        return cls(t["embeddings"].float(), t["labels"].long(), ids, thumbs, pq)


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.zeros(0, dtype=torch.uint8)


def _atomic_dir_write(dest: Path, write) -> None:
    """Write a bundle into a temp dir next to `dest`, then swap it in with a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        write(tmp)
        # mkdtemp makes a private 0700 dir; a bundle must stay readable by a service running as another user.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.time_ns()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_bundle(
    path: str | Path,
    adapter: Adapter,
    backbone: Backbone,
    *,
    name: str,
    version: str,
    training: dict | None = None,
    metrics: dict | None = None,
    gallery: Gallery | None = None,
    preprocess: dict | None = None,
    calibration: dict | None = None,
) -> dict:
    """Write `adapter` (+ optional gallery) as a bundle directory; returns the manifest.

    `calibration` (metalora.calibration): the head temperature and the k-NN "unknown" threshold.
    """
    check_name(name)
    check_name(str(version), "version")
    path = Path(path)
    state = {k: v.detach().cpu().float().contiguous() for k, v in adapter.state_dict().items()}
    manifest = {
        "schema": SCHEMA,
        "name": name,
        "version": str(version),
        "adapter": adapter.config.to_dict(),
        "resolved_targets": adapter.targets,
        "seed_dim": adapter.seed_dim,
        "trainable_params": adapter.num_trainable(),
        "head_params": sum(p.numel() for p in adapter.head.parameters()),
        "backbone": {**backbone.identity.to_dict(), "embed_dim": backbone.embed_dim, "seed_in_dim": backbone.seed_in_dim},
        "preprocess": preprocess or backbone.preprocess.to_dict(),
        "training": training or {},
        "metrics": metrics or {},
        **({"calibration": calibration} if calibration else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {},
    }

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS), metadata={"schema": SCHEMA})
        if gallery is not None:
            save_file(gallery.to_tensors(), str(tmp / GALLERY))
        for f in (WEIGHTS, GALLERY):
            if (tmp / f).exists():
                manifest["files"][f] = {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    _atomic_dir_write(path, write)
    return manifest


def read_manifest(path: str | Path) -> dict:
    """Parse and sanity-check a bundle's manifest (no tensors are read)."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError("missing_manifest", f"{path}: no {MANIFEST}")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError("bad_manifest", f"{mf}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise BundleError("bad_manifest", f"{mf}: schema is {manifest.get('schema') if isinstance(manifest, dict) else None!r}, expected {SCHEMA!r}")
    for key in ("name", "version", "adapter", "backbone", "files"):
        if key not in manifest:
            raise BundleError("bad_manifest", f"{mf}: missing field {key!r}")
    check_name(manifest["name"])
    check_name(str(manifest["version"]), "version")
    if WEIGHTS not in manifest["files"]:
        raise BundleError("bad_manifest", f"{mf}: files lists no {WEIGHTS}")
    return manifest


def verify_files(path: str | Path, manifest: dict) -> None:
    """Every file the manifest lists exists, has its size and its sha256."""
    path = Path(path)
    for fname, meta in manifest["files"].items():
        if "/" in fname or "\\" in fname or fname.startswith("."):
            raise BundleError("bad_manifest", f"file name {fname!r} is not a plain file in the bundle")
        f = path / fname
        if not f.is_file():
            raise BundleError("missing_file", f"{path}: {fname} is listed in the manifest but missing")
        if f.stat().st_size != meta.get("bytes"):
            raise BundleError("checksum_mismatch", f"{f}: {f.stat().st_size} bytes, manifest says {meta.get('bytes')} (truncated or replaced)")
        if sha256_file(f) != meta.get("sha256"):
            raise BundleError("checksum_mismatch", f"{f}: sha256 differs from the manifest (tampered or corrupt)")


def check_backbone(manifest: dict, backbone: Backbone) -> Backbone:
    """Refuse a bundle trained on another backbone, other weights or a cut this one cannot serve;
    returns the backbone (or its `at_cut` view) the bundle's adapter is built on."""
    want = manifest["backbone"]
    have = backbone.identity
    if want.get("name") != have.name:
        raise BundleError("backbone_mismatch", f"bundle is for backbone {want.get('name')!r}, this one is {have.name!r}")
    if want.get("weights_sha256") != have.weights_sha256:
        raise BundleError(
            "backbone_mismatch",
            f"bundle was trained on {have.name} weights sha256 {str(want.get('weights_sha256'))[:12]}…, "
            f"these weights are {str(have.weights_sha256)[:12]}…",
        )
    own = _bundle_view(manifest, backbone)
    for key, val in (("embed_dim", own.embed_dim), ("seed_in_dim", own.seed_in_dim)):
        if key in want and want[key] != val:
            raise BundleError("backbone_mismatch", f"bundle expects {key}={want[key]}, backbone has {val}")
    return own


def _bundle_view(manifest: dict, backbone: Backbone) -> Backbone:
    """The backbone cut where the bundle was trained: `backbone` itself, or its `at_cut` view for a
    bundle cut later than the backbone's shared prefix ends (the runtime pools its seed there).
    A bundle cut earlier cannot load: its first adapted layers are inside the shared prefix."""
    want, have = manifest["backbone"], backbone.identity
    try:
        split = backbone.split_of(want.get("cut"))
    except ValueError as e:
        raise BundleError("backbone_mismatch", f"bundle records cut {want.get('cut')!r}: {e}") from None
    if split == backbone.split and want.get("cut") == have.cut:
        return backbone

    def shown(cut, n):
        return cut or (f"blocks[:{n}] (the default cut)" if n is not None else "the default cut")

    if split is None or backbone.split is None or split < backbone.split:
        later = split is not None and backbone.split is not None
        raise BundleError(
            "backbone_mismatch",
            f"bundle was trained with the shared prefix ending at {shown(want.get('cut'), split)}, this backbone's prefix ends "
            f"{'later, ' if later else ''}at {shown(have.cut, backbone.split)}"
            + (f": a store serves bundles cut at its backbone's cut or after it. Cut the store at blocks[:{split}] or earlier: in "
               f"its backbone manifest set `kwargs.split` and the `seed_in_dim` and `targetable` that cut builds (docs/models.md, "
               f"\"The cut\"), or retrain the bundle at this store's cut (metalora train --split {backbone.split})" if later else ""),
        )
    try:
        return backbone.at_cut(split)
    except ValueError as e:
        raise BundleError("backbone_mismatch", f"bundle records cut {want.get('cut')!r}: {e}") from None


def load_bundle(path: str | Path, backbone: Backbone, device: str | torch.device = "cpu") -> tuple[Adapter, dict]:
    """Verify and load a bundle onto `backbone`; returns (adapter in eval mode, manifest)."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    own = check_backbone(manifest, backbone)
    try:
        config = AdapterConfig.from_dict(manifest["adapter"])
        adapter = Adapter(own, config)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError("bad_manifest", f"{path}: adapter config cannot be built: {e}") from None
    if adapter.targets != manifest.get("resolved_targets", adapter.targets):
        raise BundleError("bad_manifest", f"{path}: targets resolve to {adapter.targets}, manifest says {manifest['resolved_targets']}")
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise BundleError("bad_weights", f"{path / WEIGHTS}: not a readable safetensors file ({e})") from None
    own = adapter.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [f"{k}: {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in set(own) & set(state) if state[k].shape != own[k].shape]
    if missing or extra or bad:
        raise BundleError("shape_mismatch", f"{path}: weights do not fit the manifest: missing {missing[:5]}, unexpected {extra[:5]}, shapes {bad[:5]}")
    adapter.load_state_dict(state, strict=True)
    adapter.requires_grad_(False)
    return adapter.to(device).eval(), manifest


def load_gallery(path: str | Path, manifest: dict) -> Gallery | None:
    """The bundle's gallery (checksums already verified by `load_bundle`), or None."""
    if GALLERY not in manifest["files"]:
        return None
    try:
        g = Gallery.from_tensors(load_file(str(Path(path) / GALLERY)))
    except (SafetensorError, OSError) as e:
        raise BundleError("bad_gallery", f"{path}: gallery is not a readable safetensors file ({e})") from None
    n_labels = len(manifest["adapter"]["labels"])
    if len(g.labels) and (int(g.labels.min()) < 0 or int(g.labels.max()) >= n_labels):
        raise BundleError("bad_gallery", f"{path}: gallery labels fall outside the adapter's {n_labels} labels")
    return g
