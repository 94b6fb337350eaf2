"""Image decoding and the backbone's preprocessing: one path for the CLI, training, evaluation and the service.

The model sees the picture a photo viewer shows:

* EXIF orientation applied (all 8 values; TIFF's own Orientation tag too);
* high bit depth scaled into 8 bits, never clipped: 16-bit grey (`I;16*`) and 16-bit RGB(A)
  keep their high byte (Pillow itself reads 16-bit RGB PNG/TIFF that way, so v = 257·x gives x
  exactly); 32-bit integer (`I`) is scaled by the stored bits per sample (TIFF tag 258, 32 if
  absent), negative values being below black; 32-bit float (`F`) has the nominal range [0, 1];
* formats: `SUPPORTED_FORMATS` (MPO = a JPEG with extra pictures; HEIF through `pillow-heif`,
  AVIF through Pillow's own plugin); animations and multi-picture files give their first frame;
* transparency (RGBA, LA, PA, palette or colour-key transparency) composited over `BACKGROUND`;
* an embedded ICC profile (RGB, CMYK or grey) converted to sRGB with LittleCMS (`PIL.ImageCms`).

Cost is bounded by the model's input, not the file: `Preprocessor` decodes JPEGs at reduced scale
(`Image.draft`, DCT scaling 1/2, 1/4, 1/8) down to the smallest size the resize still needs,
shrinks other formats by an integer box filter (`Image.reduce`) while at least `REDUCING_GAP`
times the resize's size remains, converts colours on that small picture, and resamples only the
centre-crop window (`Image.resize(box=...)`), so no intermediate is larger than the decoded file.
Without reduction it gives the same tensor as timm's eval transform (bicubic resize of the
short side to floor(S / crop_pct), centre crop S, mean/std), which is the reference.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageCms, UnidentifiedImageError, features

from .backbones.base import Preprocess

try:  # HEIC/HEIF (the iPhone default): a Pillow plugin around libheif
    import pillow_heif

    pillow_heif.register_heif_opener(thumbnails=False)
    HEIF = True
except ImportError:  # pragma: no cover - a declared dependency; kept optional for slim installs
    HEIF = False

# Bumped whenever the decode path can give a different tensor for the same bytes (feature caches key on it).
DECODE_VERSION = 2
# Pillow raises DecompressionBombError past twice this; we refuse anything above it ourselves.
DEFAULT_MAX_PIXELS = 40_000_000
# Long side / short side above this is refused (422 `extreme_aspect_ratio`): the centre crop
# would show less than 1/20 of the picture, an answer about a sliver rather than the image.
DEFAULT_MAX_ASPECT_RATIO = 20.0
# Pillow format names; PNG includes APNG, JPEG includes progressive, MPO is JPEG + MPF pictures.
SUPPORTED_FORMATS = frozenset(
    {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"} | ({"AVIF"} if features.check("avif") else set()) | ({"HEIF"} if HEIF else set())
)
# Transparent pixels are composited over white, for every mode (as a browser page shows them).
BACKGROUND = (255, 255, 255)
# `reduce` stops while at least this many times the resize's output size is left for the bicubic
# resize (Pillow's `reducing_gap`: 2 keeps the final filter's antialiasing over two pixels or more).
REDUCING_GAP = 2.0
# JPEG DCT scaling (`draft`) goes down to the resize's own size: the IDCT at 1/2..1/8 is itself a
# low-pass filter, so no margin is needed (measured in bench/decode.py against the full decode).
DRAFT_GAP = 1.0

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
             "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
# EXIF Orientation -> the transpose that shows the picture upright (Pillow's ImageOps.exif_transpose table).
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_SRGB = ImageCms.createProfile("sRGB")
_ALPHA = {"RGBA", "LA", "RGBa", "La"}


class ImageError(ValueError):
    """An image that cannot be used; `code` is stable for clients, `kind` says which family of
    failure it is: `invalid` (the bytes or picture are unusable), `unsupported` (a format not
    read here) or `too_large` (over a pixel limit). The service maps the kind to a status."""

    def __init__(self, code: str, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.code = code
        self.kind = kind


@dataclass(frozen=True)
class Decoded:
    """A decoded picture: upright 8-bit sRGB `RGB`, shrunk by the integer `factor` (1: full size).

    `size` is the upright full-resolution (width, height); pixel i of `image` covers the
    full-resolution pixels [i·factor, (i+1)·factor).
    """

    image: Image.Image
    size: tuple[int, int]
    factor: int


def _open(data: bytes, max_pixels: int, max_aspect_ratio: float) -> Image.Image:
    """Bytes -> a lazily opened image, refusing unknown formats, bombs and slivers before decoding."""
    if not data:
        raise ImageError("empty_image", "image is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("undecodable_image", "bytes are not an image in a supported format", "unsupported") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("image_too_large", f"image refused as a decompression bomb: {e}", "too_large") from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise an open set of types on malformed headers
        raise ImageError("undecodable_image", f"image header could not be read: {type(e).__name__}: {e}") from None
    if img.format not in SUPPORTED_FORMATS:
        raise ImageError("unsupported_image", f"image format {img.format} is not supported (supported: {', '.join(sorted(SUPPORTED_FORMATS))})", "unsupported")
    w, h = img.size  # read from the header: nothing decoded yet
    if w < 1 or h < 1:
        raise ImageError("undecodable_image", f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError("image_too_large", f"image has {w}x{h} pixels, the limit is {max_pixels}", "too_large")
    if max(w, h) > max_aspect_ratio * min(w, h):
        raise ImageError("extreme_aspect_ratio", f"image is {w}x{h}; the long side may be at most {max_aspect_ratio:g} times the short side")
    return img


def _orientation(img: Image.Image) -> int:
    """EXIF Orientation 1..8 (1 when absent or unreadable: a viewer shows such files as stored)."""
    try:
        o = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as viewers do
        return 1
    return o if isinstance(o, int) and 1 <= o <= 8 else 1


def _high_byte(img: Image.Image) -> Image.Image:
    """16-bit grey -> 8-bit grey, keeping the high byte (scaled, never clipped)."""
    a = np.asarray(img)  # (H, W) uint16 in the mode's byte order
    return Image.fromarray((a >> 8).astype(np.uint8), "L")


def _scale_32bit(img: Image.Image, bits: int) -> Image.Image:
    """`I` (int32, `bits` significant) or `F` (nominal [0, 1]) -> 8-bit grey."""
    a = np.asarray(img, dtype=np.float64)  # (H, W)
    peak = 1.0 if img.mode == "F" else float(2**bits - 1)
    a = np.nan_to_num(a, nan=0.0, posinf=peak, neginf=0.0)
    return Image.fromarray(np.rint(np.clip(a / peak, 0.0, 1.0) * 255.0).astype(np.uint8), "L")


def _resamplable(img: Image.Image) -> Image.Image:
    """Modes whose pixel values can be averaged: palettes expanded, 1-bit and 16-bit to 8-bit grey."""
    m = img.mode
    if m in ("P", "PA"):
        return img.convert("RGBA" if (m == "PA" or "transparency" in img.info) else "RGB")
    if m in ("L", "RGB", "1") and "transparency" in img.info:  # a colour key (PNG tRNS): that colour is transparent
        return img.convert("RGBA")
    if m == "1":
        return img.convert("L")
    if m.startswith("I;16"):
        return _high_byte(img)
    return img


def _bits(img: Image.Image) -> int:
    """Significant bits of an `I` image's white: TIFF BitsPerSample (258), less the sign bit when SampleFormat (339) is 2."""
    tags = getattr(img, "tag_v2", None)
    try:
        b = tags.get(258) if tags is not None else None
        b = int(b[0] if isinstance(b, tuple) else b) if b else 32
        signed = tags is not None and tags.get(339) in (2, (2,))
    except (TypeError, ValueError):
        b, signed = 32, True
    b = min(max(b, 2), 32)
    return b - 1 if (signed or b == 32) else b  # mode I is int32: 32 stored bits hold 31 of magnitude


def _to_srgb(img: Image.Image, bits: int, icc: bytes | None) -> Image.Image:
    """Any decoded mode -> opaque 8-bit sRGB `RGB` (ICC profile applied, alpha over BACKGROUND)."""
    if img.mode in ("I", "F"):
        img = _scale_32bit(img, bits)
        icc = None  # a profile describes the stored values, not our rescaled ones
    if img.mode == "RGBa":
        img = img.convert("RGBA")
    elif img.mode in ("La", "LA"):
        img = img.convert("RGBA")
        icc = None  # a grey profile cannot describe the RGBA this became; grey profiles are near sRGB's tone curve
    if icc and img.mode in ("RGB", "RGBA", "CMYK", "L"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
            img = ImageCms.profileToProfile(img, src, _SRGB, renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode=out_mode)
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass  # an unusable profile is ignored, as viewers do: the values are taken as sRGB
    if img.mode == "LAB":
        img = ImageCms.applyTransform(img, ImageCms.buildTransform(ImageCms.createProfile("LAB"), _SRGB, "LAB", "RGB"))
    if img.mode in _ALPHA:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        img = Image.alpha_composite(bg, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def _decode(data: bytes, max_pixels: int, max_aspect_ratio: float, min_short: float | None) -> Decoded:
    """The one decode path. `min_short`: the upright short side may shrink down to this (None: full size)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(data, max_pixels, max_aspect_ratio)
        w, h = img.size
        factor = 1
        try:
            if min_short is not None and img.format in ("JPEG", "MPO"):
                r = min(1.0, DRAFT_GAP * min_short / min(w, h))
                if r < 0.5:
                    img.draft(None, (math.ceil(w * r), math.ceil(h * r)))
                    factor = 1 << round(math.log2(w / img.size[0]))  # libjpeg scales by 1, 2, 4 or 8
            img.load()
            # Read after load: Pillow's TIFF plugin applies the tag itself while loading and drops it.
            orientation = _orientation(img)
            if factor == 1 and w != h and img.size == (h, w):
                w, h = h, w  # the plugin turned it (TIFF; no plugin that turns also drafts)
            size = (h, w) if orientation >= 5 else (w, h)  # upright full-resolution size; 5..8 swap the axes
            bits, icc = _bits(img), img.info.get("icc_profile")  # the file's, before new images drop its tags
            img = _resamplable(img)
            if min_short is not None:
                f = int(min(img.size) / (REDUCING_GAP * min_short))
                if f >= 2:
                    img = img.reduce(f)
                    factor *= f
            img = _to_srgb(img, bits, icc)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError("image_too_large", f"image refused as a decompression bomb: {e}", "too_large") from None
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data: Pillow raises OSError, SyntaxError, ValueError, EOFError, ...
            raise ImageError("undecodable_image", f"image could not be decoded: {type(e).__name__}: {e}") from None
    if orientation in _ORIENT:
        img = img.transpose(_ORIENT[orientation])
    return Decoded(img, size, factor)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> Image.Image:
    """Bytes -> the full-resolution picture a viewer shows: upright, 8-bit, sRGB, opaque `RGB`.

    Raises `ImageError`: 422 `empty_image`, 415 `undecodable_image` (not an image),
    415 `unsupported_image` (a format outside SUPPORTED_FORMATS), 413 `image_too_large`
    (more than `max_pixels`, read from the header), 422 `extreme_aspect_ratio`,
    422 `undecodable_image` (truncated or corrupt).
    """
    return _decode(data, max_pixels, max_aspect_ratio, None).image


def crop_box(size: tuple[int, int], cfg: Preprocess) -> tuple[float, float, float, float]:
    """The source window (left, top, right, bottom) in pixels of a (W, H) picture that the backbone sees.

    Same arithmetic as torchvision's Resize(short side = floor(S / crop_pct)) followed by
    CenterCrop(S): the new long side is truncated, the crop offset rounded.
    """
    w, h = size
    s = cfg.input_size
    scale_size = math.floor(s / cfg.crop_pct)
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(scale_size * long / short)
    nw, nh = (scale_size, new_long) if w <= h else (new_long, scale_size)
    left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
    sx, sy = w / nw, h / nh
    return (left * sx, top * sy, (left + s) * sx, (top + s) * sy)


class Preprocessor:
    """Image bytes (or a decoded PIL image) -> normalised (3, S, S) float32 tensor, the backbone's recipe.

    With bytes, the decode is bounded by the output size (see the module docstring); with
    `shrink=False` (or a PIL image) the picture is resampled from full resolution: the reference,
    equal to timm's eval transform.
    """

    def __init__(self, cfg: Preprocess, shrink: bool = True):
        if cfg.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {cfg.interpolation!r}; known: {sorted(_RESAMPLE)}")
        self.cfg, self.shrink = cfg, shrink
        self.resample = _RESAMPLE[cfg.interpolation]
        self.scale_size = math.floor(cfg.input_size / cfg.crop_pct)
        self._mean = np.asarray(cfg.mean, dtype=np.float32)  # (3,)
        self._std = np.asarray(cfg.std, dtype=np.float32)  # (3,)

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> Decoded:
        return _decode(data, max_pixels, max_aspect_ratio, self.scale_size if self.shrink else None)

    def __call__(self, x: bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> torch.Tensor:
        """(3, S, S). Raises `ImageError` for bytes that are not a usable image (see `decode_image`)."""
        if isinstance(x, Image.Image):
            d = Decoded(x if x.mode == "RGB" else x.convert("RGB"), x.size, 1)
        else:
            d = self.decode(x, max_pixels, max_aspect_ratio)
        return self.tensor(d)

    def tensor(self, d: Decoded) -> torch.Tensor:
        s = self.cfg.input_size
        box = tuple(v / d.factor for v in crop_box(d.size, self.cfg))
        img = d.image.resize((s, s), self.resample, box=box)  # only the crop window is resampled
        # numpy, not torch: tiny element-wise ops on a (S, S, 3) array, no intra-op thread pool to wake
        a = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)  # (S, S, 3) in [0, 1]
        a = (a - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))  # (3, S, S)
