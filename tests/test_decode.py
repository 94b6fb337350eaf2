"""The one decode path: every kind of file gives the tensor of the same picture stored plainly.

Each row of CASES turns a plain picture (upright, 8-bit, sRGB, opaque) into another kind of file
holding the same picture; the right value is timm's eval transform of the plain picture (not our
code), and the row's tolerance is on the normalised [-1, 1] scale: (max abs, mean abs).
Lossless kinds allow 1-2 LSB (0.0079 per LSB at std 0.5) from rounding in a different order;
lossy kinds (JPEG, WebP, HEIC, AVIF, CMYK round trips) allow their codec's error. Rows marked
`naive_fails` also check that today's plain `Image.open(...).convert("RGB")` is outside the
tolerance, so the row can fail.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps
from timm.data import create_transform

from metalora.backbones.base import Preprocess
from metalora.images import BACKGROUND, DEFAULT_MAX_ASPECT_RATIO, SUPPORTED_FORMATS, ImageError, Preprocessor, decode_image

CFG = Preprocess(input_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", crop_pct=0.875)  # efficientnet_lite0
REF_TF = create_transform(input_size=(3, 224, 224), interpolation="bicubic", mean=CFG.mean, std=CFG.std, crop_pct=0.875, is_training=False)
PRE = Preprocessor(CFG)
ICC_DIR = Path("/usr/share/color/icc/ghostscript")  # Debian libgs-common (.ci/run installs it)
LOSSLESS = (0.02, 0.002)
LOSSY = (0.25, 0.02)  # JPEG/WebP/HEIC/AVIF at quality 95: measured 0.12-0.20 max, 0.006-0.013 mean


def needs_icc(name: str):
    return pytest.mark.skipif(not (ICC_DIR / name).is_file(), reason=f"needs {ICC_DIR / name} (Debian package libgs-common)")


def photo() -> Image.Image:
    """A real, asymmetric photo (scikit-image's cat, 451x300): a wrong orientation or colour shows."""
    import skimage.data

    return Image.fromarray(skimage.data.chelsea())


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def reference(img: Image.Image) -> torch.Tensor:
    return REF_TF(img.convert("RGB"))


def naive(data: bytes) -> torch.Tensor:
    """Today's path before this work: no orientation, clipping, alpha dropped, profile ignored."""
    return REF_TF(Image.open(io.BytesIO(data)).convert("RGB"))


def exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


# Stored pixels for each EXIF orientation, built with numpy from the upright (H, W, 3) array:
# the EXIF spec's meaning of the tag, independent of the code under test's transpose table.
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored vertically
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, 1),  # viewer turns it 90° clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the anti-diagonal
    8: lambda a: np.rot90(a, -1),  # viewer turns it 90° counter-clockwise
}


def oriented(o: int, fmt: str):
    def make(img: Image.Image) -> bytes:
        stored = Image.fromarray(np.ascontiguousarray(STORED[o](np.asarray(img))))
        return save(stored, fmt, exif=exif(o), **({"quality": 95} if fmt in ("JPEG", "HEIF") else {}))

    return make


def grey16_png(img: Image.Image) -> bytes:
    a = np.asarray(img.convert("L")).astype(np.uint16) * 257
    return save(Image.fromarray(a), "PNG")


def grey16_tiff(img: Image.Image) -> bytes:
    a = np.asarray(img.convert("L")).astype(np.uint16) * 257
    return save(Image.fromarray(a), "TIFF")


def rgb16_png(img: Image.Image, alpha: bool = False) -> bytes:
    import png  # pypng: Pillow cannot write 16-bit RGB

    a = np.asarray(img).astype(np.uint16) * 257  # (H, W, 3)
    if alpha:
        a = np.concatenate([a, np.full(a.shape[:2] + (1,), 65535, np.uint16)], -1)
    b = io.BytesIO()
    png.Writer(img.width, img.height, bitdepth=16, greyscale=False, alpha=alpha).write(b, a.reshape(img.height, -1))
    return b.getvalue()


def tiff(dtype, scale: float, photometric: str = "minisblack", grey: bool = True):
    def make(img: Image.Image) -> bytes:
        import tifffile

        a = np.asarray(img.convert("L") if grey else img).astype(np.float64) * scale
        b = io.BytesIO()
        tifffile.imwrite(b, a.astype(dtype), photometric=photometric)
        return b.getvalue()

    return make


def mpo(img: Image.Image) -> bytes:
    return save(img, "MPO", save_all=True, append_images=[ImageOps.mirror(img)], quality=95)


def animated(fmt: str, **kw):
    def make(img: Image.Image) -> bytes:
        return save(img, fmt, save_all=True, append_images=[ImageOps.invert(img), ImageOps.mirror(img)], duration=100, **kw)

    return make


def few_colours(img: Image.Image) -> Image.Image:
    """The photo with <= 256 colours, so that GIF and palette PNG store it losslessly."""
    return img.quantize(200, dither=Image.Dither.NONE).convert("RGB")


def with_alpha(img: Image.Image) -> tuple[Image.Image, np.ndarray]:
    """The photo with a left-to-right alpha ramp; and, by hand, that picture over BACKGROUND."""
    a = np.asarray(img).astype(np.float64)  # (H, W, 3)
    alpha = np.tile(np.linspace(0, 255, img.width).round(), (img.height, 1))  # (H, W)
    over = a * alpha[..., None] / 255 + np.array(BACKGROUND) * (1 - alpha[..., None] / 255)
    rgba = Image.fromarray(np.dstack([a, alpha]).astype(np.uint8), "RGBA")
    return rgba, over.round().astype(np.uint8)


def icc_converted(profile: str, mode: str, fmt: str, **kw):
    def make(img: Image.Image) -> bytes:
        dst = ImageCms.ImageCmsProfile(str(ICC_DIR / profile))
        out = ImageCms.profileToProfile(img, ImageCms.createProfile("sRGB"), dst, outputMode=mode, renderingIntent=ImageCms.Intent.PERCEPTUAL)
        return save(out, fmt, icc_profile=dst.tobytes(), **kw)

    return make


# name, plain picture (from the photo), file maker, (max, mean) tolerance, naive path fails it
CASES = [
    *[(f"png-orientation-{o}", None, oriented(o, "PNG"), LOSSLESS, o != 1) for o in range(1, 9)],
    *[(f"jpeg-orientation-{o}", None, oriented(o, "JPEG"), LOSSY, o != 1) for o in (3, 6, 8)],
    *[(f"heic-orientation-{o}", None, oriented(o, "HEIF"), LOSSY, False) for o in (3, 6)],  # libheif applies it (irot)
    ("grey16-png", "L", grey16_png, LOSSLESS, True),
    ("grey16-tiff", "L", grey16_tiff, LOSSLESS, True),
    ("rgb16-png", None, rgb16_png, LOSSLESS, False),
    ("rgba16-png", None, lambda im: rgb16_png(im, alpha=True), LOSSLESS, False),
    ("rgb16-tiff", None, tiff(np.uint16, 257, "rgb", grey=False), LOSSLESS, False),
    ("int32-tiff", "L", tiff(np.int32, (2**31 - 1) / 255), LOSSLESS, True),
    ("int16-tiff", "L", tiff(np.int16, 32767 / 255), LOSSLESS, True),
    ("float32-tiff", "L", tiff(np.float32, 1 / 255), LOSSLESS, True),
    ("jpeg-baseline", None, lambda im: save(im, "JPEG", quality=95), LOSSY, False),
    ("jpeg-progressive", None, lambda im: save(im, "JPEG", quality=95, progressive=True), LOSSY, False),
    ("mpo-first-picture", None, mpo, LOSSY, False),
    ("webp-lossless", None, lambda im: save(im, "WEBP", lossless=True), LOSSLESS, False),
    ("webp-lossy", None, lambda im: save(im, "WEBP", quality=95), LOSSY, False),
    ("webp-animated-first-frame", None, animated("WEBP", lossless=True), LOSSLESS, False),
    ("apng-first-frame", None, animated("PNG"), LOSSLESS, False),
    ("gif", "few", lambda im: save(im, "GIF"), LOSSLESS, False),
    ("gif-animated-first-frame", "few", animated("GIF"), LOSSLESS, False),
    ("bmp", None, lambda im: save(im, "BMP"), LOSSLESS, False),
    ("tiff-lzw", None, lambda im: save(im, "TIFF", compression="tiff_lzw"), LOSSLESS, False),
    ("palette-png", "few", lambda im: save(im.quantize(256, dither=Image.Dither.NONE), "PNG"), LOSSLESS, False),
    ("heic", None, lambda im: save(im, "HEIF", quality=95), LOSSY, False),
    ("avif", None, lambda im: save(im, "AVIF", quality=95), LOSSY, False),
]


def plain_of(kind: str | None, img: Image.Image) -> Image.Image:
    return {"L": img.convert("L"), "few": few_colours(img), None: img}[kind]


@pytest.mark.parametrize("name,kind,make,tol,naive_fails", CASES, ids=[c[0] for c in CASES])
def test_kind_matches_plain_picture(name, kind, make, tol, naive_fails):
    if name.startswith("heic") and "HEIF" not in SUPPORTED_FORMATS:
        pytest.skip("pillow-heif is not installed")
    plain = plain_of(kind, photo())
    want = reference(plain)
    data = make(plain)
    got = PRE(data)
    d = (got - want).abs()
    assert got.shape == (3, 224, 224)
    assert float(d.max()) <= tol[0] and float(d.mean()) <= tol[1], f"{name}: max {float(d.max()):.4f} mean {float(d.mean()):.5f} vs {tol}"
    if naive_fails:
        try:
            nd = (naive(data) - want).abs()
            assert float(nd.max()) > tol[0] or float(nd.mean()) > tol[1], "the plain path passes too: the row tests nothing"
        except (OSError, ValueError):
            pass  # the plain path cannot even open it


def test_orientation_agrees_with_pillow_exif_transpose():
    """A second, independent reading of the tag: Pillow's ImageOps.exif_transpose on the full decode."""
    img = photo()
    for o in range(1, 9):
        data = oriented(o, "PNG")(img)
        viewer = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        assert np.array_equal(np.asarray(decode_image(data)), np.asarray(viewer)), o


TRANSPARENT = [
    ("rgba-png", lambda rgba: save(rgba, "PNG")),
    ("la-png", lambda rgba: save(rgba.convert("LA"), "PNG")),
    ("rgba-webp-lossless", lambda rgba: save(rgba, "WEBP", lossless=True, exact=True)),
    ("rgba-tiff", lambda rgba: save(rgba, "TIFF")),
]


@pytest.mark.parametrize("name,make", TRANSPARENT, ids=[t[0] for t in TRANSPARENT])
def test_alpha_composited_over_background(name, make):
    rgba, over = with_alpha(photo())
    if name.startswith("la"):
        rgba = rgba.convert("LA")
        g = np.asarray(rgba).astype(np.float64)
        over = (g[..., :1] * g[..., 1:] / 255 + np.array(BACKGROUND) * (1 - g[..., 1:] / 255)).round().astype(np.uint8)
    want = reference(Image.fromarray(over))
    data = make(rgba)
    d = (PRE(data) - want).abs()
    assert float(d.max()) <= 0.03 and float(d.mean()) <= 0.003, f"{name}: max {float(d.max()):.4f} mean {float(d.mean()):.5f}"
    nd = (naive(data) - want).abs()
    assert float(nd.mean()) > 0.05  # dropping alpha is far off: the test can fail


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_and_colour_key_transparency(fmt):
    """Palette transparency (GIF, PNG tRNS) and an RGB colour key: those pixels become BACKGROUND."""
    a = np.zeros((64, 96, 3), np.uint8)
    a[:, :48] = (200, 20, 30)  # left half red, right half black = the transparent key / index
    img = Image.fromarray(a)
    p = img.quantize(4)
    key = p.getpixel((90, 10))
    want = reference(Image.fromarray(np.where(np.arange(96)[None, :, None] < 48, a, np.array(BACKGROUND, np.uint8))))
    for data in [save(p, fmt, transparency=key)] + ([save(img, "PNG", transparency=(0, 0, 0))] if fmt == "PNG" else []):
        d = (PRE(data) - want).abs()
        assert float(d.max()) <= 0.02, float(d.max())


ICC = [
    ("adobe-rgb-png", "a98.icc", icc_converted("a98.icc", "RGB", "PNG"), LOSSLESS),
    ("adobe-rgb-jpeg", "a98.icc", icc_converted("a98.icc", "RGB", "JPEG", quality=95), LOSSY),
    ("cmyk-jpeg", "default_cmyk.icc", icc_converted("default_cmyk.icc", "CMYK", "JPEG", quality=95), (0.3, 0.05)),
    ("cmyk-tiff", "default_cmyk.icc", icc_converted("default_cmyk.icc", "CMYK", "TIFF"), (0.3, 0.05)),
]


@pytest.mark.parametrize("name,profile,make,tol", ICC, ids=[c[0] for c in ICC])
def test_icc_profile_converted_to_srgb(name, profile, make, tol):
    if not (ICC_DIR / profile).is_file():
        pytest.skip(f"needs {ICC_DIR / profile} (Debian package libgs-common)")
    plain = photo()
    want = reference(plain)
    data = make(plain)
    d = (PRE(data) - want).abs()
    assert float(d.max()) <= tol[0] and float(d.mean()) <= tol[1], f"{name}: max {float(d.max()):.4f} mean {float(d.mean()):.5f}"
    nd = (naive(data) - want).abs()
    assert float(nd.mean()) > tol[1]  # ignoring the profile is visibly off


# ------------------------------------------------------------------ reduced-scale decode
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_reduced_decode_close_to_full_resolution(fmt):
    """draft/reduce on a 2400x1600 picture vs the full decode of the same file (the reference path)."""
    big = photo().resize((2400, 1600), Image.Resampling.BICUBIC)
    data = save(big, fmt, **({"quality": 90} if fmt != "PNG" else {}))
    full = REF_TF(Image.open(io.BytesIO(data)).convert("RGB"))
    d = (PRE(data) - full).abs()
    assert PRE.decode(data).factor > 1  # it did shrink
    assert float(d.max()) <= 0.1 and float(d.mean()) <= 0.01, f"max {float(d.max()):.4f} mean {float(d.mean()):.5f}"


def test_plain_png_equals_timm_transform():
    """No reduction: the crop-window resize equals resize-then-crop within 1 LSB."""
    rng = np.random.default_rng(0)
    for w, h in [(32, 32), (28, 28), (500, 375), (375, 500), (257, 1000), (1000, 60), (17, 19)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        d = (PRE(save(img, "PNG")) - REF_TF(img)).abs()
        assert float(d.max()) <= 1 / 255 / 0.5 + 1e-6, (w, h)


# ------------------------------------------------------------------ refusals
def test_extreme_aspect_ratio_refused_before_decoding():
    data = save(Image.new("RGB", (1, 6000), "red"), "PNG")
    with pytest.raises(ImageError) as e:
        PRE(data)
    assert (e.value.code, e.value.kind) == ("extreme_aspect_ratio", "invalid")
    ok = save(Image.new("RGB", (int(DEFAULT_MAX_ASPECT_RATIO) * 10, 10), "red"), "PNG")
    assert PRE(ok).shape == (3, 224, 224)  # exactly at the limit is fine


@pytest.mark.parametrize(
    "data,code,kind",
    [
        (b"", "empty_image", "invalid"),
        (b"just some text", "undecodable_image", "unsupported"),
        (save(Image.new("RGB", (64, 64), "red"), "PNG")[:60], "undecodable_image", "invalid"),
        (save(Image.new("RGB", (32, 32)), "ICO"), "unsupported_image", "unsupported"),
    ],
    ids=["empty", "text", "truncated", "ico"],
)
def test_refusals(data, code, kind):
    with pytest.raises(ImageError) as e:
        PRE(data)
    assert (e.value.code, e.value.kind) == (code, kind)


def test_reduced_int16_tiff_keeps_its_bit_depth():
    """Found in review: BitsPerSample was read after `reduce`, whose new image has no TIFF tags,
    so a large signed 16-bit TIFF came out 65536 times too dark."""
    big = photo().convert("L").resize((1600, 1200), Image.Resampling.BICUBIC)
    data = tiff(np.int16, 32767 / 255)(big)
    assert PRE.decode(data).factor > 1
    d = (PRE(data) - reference(big)).abs()
    assert float(d.max()) <= 0.1 and float(d.mean()) <= 0.01, f"max {float(d.max()):.4f} mean {float(d.mean()):.5f}"
