"""Image decoding and the backbone's preprocessing, shared by the CLI, training and the service."""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform

from .backbones.base import Preprocess

# Pillow raises DecompressionBombError past twice this; we refuse anything above it ourselves.
DEFAULT_MAX_PIXELS = 40_000_000
SUPPORTED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"}


class ImageError(ValueError):
    """An image that cannot be used; `code` is stable for clients, `status` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 422):
        super().__init__(message)
        self.code = code
        self.status = status


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image, refusing unknown formats and decompression bombs before decoding."""
    if not data:
        raise ImageError("empty_image", "image is empty", 422)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in SUPPORTED_FORMATS:
                raise ImageError("unsupported_image", f"image format {img.format} is not supported", 415)
            w, h = img.size  # read from the header: nothing decoded yet
            if w * h > max_pixels:
                raise ImageError("image_too_large", f"image has {w}x{h} pixels, the limit is {max_pixels}", 413)
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("image_too_large", f"image refused as a decompression bomb: {e}", 413) from None
    except UnidentifiedImageError:
        raise ImageError("undecodable_image", "bytes are not an image in a supported format", 415) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError("undecodable_image", f"image could not be decoded: {e}", 422) from None
    return img.convert("RGB")


class Preprocessor:
    """PIL image -> normalised (3, S, S) tensor with the backbone's own recipe (timm transform)."""

    def __init__(self, cfg: Preprocess):
        self.cfg = cfg
        self._tf = create_transform(
            input_size=(3, cfg.input_size, cfg.input_size),
            interpolation=cfg.interpolation,
            mean=cfg.mean,
            std=cfg.std,
            crop_pct=cfg.crop_pct,
            is_training=False,
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self._tf(img.convert("RGB"))  # (3, S, S)
