"""One raw image -> the model's input tensor, for every front door; and the limits on images.

A raw image is what a door took off the wire: file bytes, a base64 string (or a `data:` URL) from
JSON, RGB pixels already decoded (an (H, W, 3) uint8 array from the Open Inference Protocol's
`pixels` input), or the model input itself (a (3, S, S) float32 array, `pixels` FP32: already
resized, cropped and normalised). Files are decoded by `metalora.images` (EXIF, bit depth, ICC,
reduced-size JPEG decoding bounded by the model's input); pixels run through the same
preprocessing; a model input is used as it is.
"""

from __future__ import annotations

import base64
import binascii
import re

import numpy as np
import torch
from PIL import Image

from metalora.images import ImageError, Preprocessor

from .errors import from_library, invalid, too_large

Raw = bytes | str | np.ndarray  # ndarray: (H, W, 3) uint8 RGB pixels, or (3, S, S) float32 the model input
_WRAP = re.compile(r"[\r\n]+")


def decode_one(preprocessor: Preprocessor, raw: Raw, where: str, max_pixels: int, max_aspect_ratio: float) -> torch.Tensor:
    """One raw image -> the model input (3, S, S).

    Raises INVALID `invalid_base64`, or the image error of `metalora.images` as a domain error,
    naming the image `where` (as the request has it: `images[3]`, `items[1].image (id 'a2')`).
    Runs on the decoder pool, never on the event loop. Pixel arrays were checked by `check_pixels`,
    model inputs by `check_model_input`.
    """
    if isinstance(raw, np.ndarray):
        if raw.dtype == np.float32:  # the model input itself: no decode, no preprocessing
            return torch.from_numpy(np.array(raw, dtype=np.float32))  # a copy: the request's buffer may be read-only
        return preprocessor(Image.fromarray(raw, "RGB"))
    if isinstance(raw, str):
        if raw.startswith("data:"):
            raw = raw.partition(",")[2]
        try:  # line breaks are allowed (MIME / `base64` without -w0 wraps at 76), nothing else outside the alphabet
            raw = base64.b64decode(_WRAP.sub("", raw), validate=True)
        except (binascii.Error, ValueError):
            raise invalid("invalid_base64", f"{where} is not valid base64") from None
    try:
        return preprocessor(raw, max_pixels, max_aspect_ratio)  # (3, S, S); the decode bounded by S, not the file
    except ImageError as e:
        raise from_library(e, where) from None


def check_count(n: int, max_images: int) -> None:
    """Images per request: TOO_LARGE `too_many_images` past the limit."""
    if n > max_images:
        raise too_large("too_many_images", f"{n} images in one request; the limit is {max_images}")


def check_pixels(h: int, w: int, max_pixels: int, max_aspect_ratio: float) -> None:
    """The limits on decoded pixels (N, H, W, 3), with the rule and wording `metalora.images` has for files."""
    if h * w > max_pixels:
        raise too_large("image_too_large", f"pixels images are {w}x{h}, the limit is {max_pixels} pixels")
    if max(w, h) > max_aspect_ratio * min(w, h):
        raise invalid("extreme_aspect_ratio", f"pixels images are {w}x{h}; the long side may be at most {max_aspect_ratio:g} times the short side")


def check_model_input(x: np.ndarray, size: int) -> None:
    """A model input sent as it is (float32): INVALID `invalid_shape` unless it is (3, S, S), the
    model's input; INVALID `invalid_data` when it holds NaN or infinities."""
    if x.shape != (3, size, size):
        raise invalid("invalid_shape", f"a model input is (3, {size}, {size}), got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise invalid("invalid_data", "a model input holds NaN or infinite values")
