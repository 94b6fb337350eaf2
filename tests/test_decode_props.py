"""Property tests of the decode path over generated files (Hypothesis, bounded: see SETTINGS).

Modes x formats x sizes (aspect ratios past the limit included) x EXIF orientations x bit depths,
plus truncated and corrupted files. Properties:
* a file gives a finite (3, 224, 224) tensor in [-1, 1], or an `ImageError` with a 4xx status;
  nothing else ever escapes (an escape would be a 500 in the service);
* a flat colour comes out as that colour a viewer shows, whatever the mode and bit depth
  (high bit depth scaled, alpha over BACKGROUND; expected values computed here from the spec);
* an EXIF orientation gives the picture of the upright file.
Failing inputs found so far are kept as explicit @example rows.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from metalora.backbones.base import Preprocess
from metalora.images import BACKGROUND, DEFAULT_MAX_ASPECT_RATIO, ImageError, Preprocessor

PRE = Preprocessor(Preprocess(input_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", crop_pct=0.875))
SETTINGS = settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
# mode -> formats Pillow writes it in (lossless ones first)
WRITERS = {
    "1": ["PNG", "TIFF", "BMP"],
    "L": ["PNG", "TIFF", "BMP", "GIF", "JPEG"],
    "LA": ["PNG", "TIFF"],
    "P": ["PNG", "GIF", "BMP", "TIFF"],
    "RGB": ["PNG", "TIFF", "BMP", "WEBP", "JPEG", "AVIF"],
    "RGBA": ["PNG", "TIFF", "WEBP"],
    "CMYK": ["TIFF", "JPEG"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],
    "int16": ["TIFF"],  # a signed 16-bit TIFF (tifffile): Pillow opens it as `I` with BitsPerSample 16
    "F": ["TIFF"],
}
LOSSY = {"JPEG", "AVIF"}
sides = st.integers(1, 48) | st.sampled_from([223, 224, 255, 256, 257, 700, 1500])  # 700+ are reduced


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    if fmt == "WEBP":
        kw.setdefault("lossless", True)
        kw.setdefault("exact", True)
    img.save(b, fmt, **kw)
    return b.getvalue()


@st.composite
def flat_images(draw):
    """(file bytes, format, the RGB a viewer shows) for a flat colour in any mode."""
    mode = draw(st.sampled_from(sorted(WRITERS)))
    fmt = draw(st.sampled_from(WRITERS[mode]))
    w, h = draw(sides), draw(sides)
    u8 = st.integers(0, 255)
    if mode == "1":
        v = draw(st.sampled_from([0, 1]))
        img, want = Image.new("1", (w, h), v), (255 * v,) * 3
    elif mode == "L":
        v = draw(u8)
        img, want = Image.new("L", (w, h), v), (v,) * 3
    elif mode == "LA":
        v, a = draw(u8), draw(u8)
        img, want = Image.new("LA", (w, h), (v, a)), tuple(v * a / 255 + b * (1 - a / 255) for b in BACKGROUND)
    elif mode == "P":
        rgb = tuple(draw(u8) for _ in range(3))
        img, want = Image.new("RGB", (w, h), rgb).quantize(2), rgb
    elif mode == "RGB":
        rgb = tuple(draw(u8) for _ in range(3))
        img, want = Image.new("RGB", (w, h), rgb), rgb
    elif mode == "RGBA":
        rgb, a = tuple(draw(u8) for _ in range(3)), draw(u8)
        img, want = Image.new("RGBA", (w, h), rgb + (a,)), tuple(c * a / 255 + b * (1 - a / 255) for c, b in zip(rgb, BACKGROUND))
    elif mode == "CMYK":
        cmyk = tuple(draw(u8) for _ in range(4))
        img, want = Image.new("CMYK", (w, h), cmyk), Image.new("CMYK", (1, 1), cmyk).convert("RGB").getpixel((0, 0))
    elif mode == "I;16":
        v = draw(st.integers(0, 65535))
        img, want = Image.fromarray(np.full((h, w), v, np.uint16)), (v / 65535 * 255,) * 3  # high byte: within 1 of v/257
    elif mode == "I":
        v = draw(st.integers(-(2**31), 2**31 - 1))
        img, want = Image.new("I", (w, h), v), (max(v, 0) / (2**31 - 1) * 255,) * 3  # int32 TIFF: 31 bits of magnitude
    elif mode == "int16":
        import tifffile

        v = draw(st.integers(-(2**15), 2**15 - 1))
        b = io.BytesIO()
        tifffile.imwrite(b, np.full((h, w), v, np.int16))
        return b.getvalue(), fmt, (w, h), np.array((max(v, 0) / 32767 * 255,) * 3)
    else:  # F: nominal [0, 1], outside clipped
        v = draw(st.floats(-2.0, 3.0, allow_nan=False, width=32))
        img, want = Image.new("F", (w, h), v), (min(max(v, 0.0), 1.0) * 255,) * 3
    return save(img, fmt), fmt, (w, h), np.array(want, dtype=np.float64)


def as_rgb8(x) -> np.ndarray:
    """(3, S, S) normalised tensor -> (S, S, 3) in 0..255."""
    return ((x.permute(1, 2, 0).numpy().astype(np.float64) * 0.5) + 0.5) * 255


def check_or_refused(data: bytes):
    """The universal property: a usable tensor or a 4xx ImageError. Returns the tensor or None."""
    try:
        x = PRE(data)
    except ImageError as e:
        assert e.kind in ("too_large", "unsupported", "invalid"), (e.code, e.kind)
        return None
    assert x.shape == (3, 224, 224)
    assert bool(x.isfinite().all()) and float(x.abs().max()) <= 1.0 + 1e-6
    return x


@SETTINGS
@given(flat_images())
def test_flat_colour_is_what_a_viewer_shows(case):
    data, fmt, (w, h), want = case
    x = check_or_refused(data)
    if max(w, h) > DEFAULT_MAX_ASPECT_RATIO * min(w, h):
        assert x is None  # past the aspect limit: refused, whatever the format
        return
    assert x is not None
    err = np.abs(as_rgb8(x) - want).max()
    assert err <= (4.5 if fmt in LOSSY else 1.5), (fmt, want, as_rgb8(x)[0, 0])


@SETTINGS
@given(case=flat_images(), cut=st.floats(0.0, 1.0), flip=st.none() | st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)))
@example(case=(save(Image.new("RGB", (64, 64), "red"), "PNG"), "PNG", (64, 64), np.zeros(3)), cut=0.25, flip=None)
def test_truncated_or_corrupt_files_never_escape(case, cut, flip):
    data = bytearray(case[0][: max(1, int(len(case[0]) * cut))])
    if flip is not None:
        i = min(int(flip[0] * len(data)), len(data) - 1)
        data[i] ^= flip[1]
    check_or_refused(bytes(data))


@SETTINGS
@given(
    w=st.integers(8, 80),
    h=st.integers(8, 80),
    o=st.integers(1, 8),
    fmt=st.sampled_from(["PNG", "TIFF", "WEBP"]),
    seed=st.integers(0, 2**16),
)
def test_orientation_gives_the_upright_picture(w, h, o, fmt, seed):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)  # upright
    stored = {1: a, 2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1], 5: a.transpose(1, 0, 2),
              6: np.rot90(a, 1), 7: a[::-1, ::-1].transpose(1, 0, 2), 8: np.rot90(a, -1)}[o]
    e = Image.Exif()
    e[0x0112] = o
    data = save(Image.fromarray(np.ascontiguousarray(stored)), fmt, exif=e.tobytes())
    want = PRE(save(Image.fromarray(a), "PNG"))
    assert float((PRE(data) - want).abs().max()) <= 2 / 255 / 0.5 + 1e-6


@SETTINGS
@given(
    w=st.integers(1, 64), h=st.integers(1, 64), alpha=st.booleans(), seed=st.integers(0, 2**16)
)
def test_16_bit_rgb_png_scaled_not_clipped(w, h, alpha, seed):
    import png

    a8 = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    a16 = a8.astype(np.uint16) * 257
    if alpha:
        a16 = np.concatenate([a16, np.full((h, w, 1), 65535, np.uint16)], -1)
    b = io.BytesIO()
    png.Writer(w, h, bitdepth=16, greyscale=False, alpha=alpha).write(b, a16.reshape(h, -1))
    if max(w, h) > DEFAULT_MAX_ASPECT_RATIO * min(w, h):
        with pytest.raises(ImageError):
            PRE(b.getvalue())
        return
    assert float((PRE(b.getvalue()) - PRE(save(Image.fromarray(a8), "PNG"))).abs().max()) <= 2 / 255 / 0.5 + 1e-6
