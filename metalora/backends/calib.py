"""The images INT8 calibration and the low-precision start-up check use, and their digest.

The caller names where they come from (`CalibrationSet`); nothing here looks for data on its own:

* `images`: the deployment's own images (data specs, see `metalora.data`, separated by ';'; the
  server's `calibration_data` setting), in a seeded shuffled order. A few of them
  (`own_check_count`) are held out for the start-up check, never calibrated on.
* else `data`: a directory laid out as this project's `../shared/data` (the server's `shared`
  setting; the benchmarks and research scripts pass it explicitly). Calibration takes half
  ImageNet-sample photos (every 8th; the rest are held out for the check) and half the training
  splits of the domains the shipped adapters serve.
* else: scikit-learn's digits (train split) and, when scikit-image is installed, its photos.

Never a test image: the check images are held-out photos and scikit-learn digits' test split.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHECK_IMAGES = 32  # the start-up check's fixed batch: half held-out photos, half digit glyphs

# The training splits of a `data` directory that INT8 calibration draws from (name, number of classes).
CALIBRATION_DOMAINS = (("cifar10", 10), ("mnist", 10), ("fashion-mnist", 10), ("eurosat", 10), ("gtsrb", 43))


@dataclass(frozen=True)
class CalibrationSet:
    """Where calibration and check images come from, as the caller names them (module docstring).

    `images` (data specs separated by ';') wins over `data` (a `../shared/data`-like directory);
    neither: scikit-learn digits and scikit-image photos."""

    images: str | None = None
    data: Path | None = None


def imagenet_split(data: Path | None, every: int = 8) -> tuple[list[str], list[str]]:
    """ImageNet-sample members (`<data>/imagenet-sample/val.zip`) used for calibration (every
    `every`-th) and held out; both empty without that file."""
    if data is None or not (data / "imagenet-sample" / "val.zip").is_file():
        return [], []
    with zipfile.ZipFile(data / "imagenet-sample" / "val.zip") as z:
        members = sorted(m for m in z.namelist() if not m.endswith("/"))
    return members[::every], [m for i, m in enumerate(members) if i % every]


def own_images(images: str | None) -> list[tuple[str, str]] | None:
    """The images `images` names (data specs separated by ';': ImageFolder directories or zips),
    in a seeded shuffled order; None when it is not set. Raises FileNotFoundError / ValueError
    (metalora.data) for a spec that names nothing readable."""
    from ..data import DataSpec, list_items

    if not images:
        return None
    out = [("spec", f"{s.strip()}#{it.id}") for s in images.split(";") if s.strip() for it in list_items(DataSpec.parse(s.strip()))]
    random.Random(0).shuffle(out)
    return out


def own_check_count(total: int) -> int:
    """How many of the deployer's `total` images are held out for the start-up check (never
    calibrated on): half of CHECK_IMAGES, at most a quarter of them."""
    return min(CHECK_IMAGES // 2, total // 4)


def calibration_sources(n: int = 256, calibration: CalibrationSet = CalibrationSet()) -> list[tuple[str, str]]:
    """What the (at most `n`, per-class rounding may leave a few less) calibration images are, as
    (kind, id) pairs; never a test image.

    With a `data` directory: half ImageNet-sample photos (every 8th; the rest are held out for the
    top-1 check) and half the training splits of the domains the shipped adapters serve
    (CIFAR-10, MNIST, Fashion-MNIST, EuroSAT, GTSRB, scikit-learn digits), taken in turn so every
    domain's activation ranges are seen (measured against photos + CIFAR-10 + MNIST + digits:
    GTSRB's drops 0.35 / 0.56 -> -0.20 / 0.46 points (k-NN / head); every other set moved by at
    most 0.33 points, one image of the 300-image digits set, either way). Without it: scikit-learn's digits (train split) and,
    when scikit-image is installed, its bundled photos, cropped several ways: a thin set for
    photos, so a deployment should name its own `images` (data specs, see metalora.data,
    separated by ';'; a seeded sample of `n` when there are more).
    """
    from ..data import DataSpec, list_items

    own = own_images(calibration.images)
    if own is not None:  # the deployer's own images, less those held out for the start-up check
        rest = own[own_check_count(len(own)):]
        return rest[:n]
    data = calibration.data
    out: list[tuple[str, str]] = []
    specs: list[str] = []
    if data is not None:
        calib, _ = imagenet_split(data)
        out += [("imagenet", m) for m in calib[: n // 2]]
        per_domain = max(1, (n - len(out)) // (len(CALIBRATION_DOMAINS) + 1))  # + 1: digits
        for name, classes in CALIBRATION_DOMAINS:
            if (data / name / "train.zip").is_file():
                specs.append(f"{data}/{name}/train.zip?per_class={max(1, -(-per_domain // classes))}")
    else:
        try:
            import skimage.data  # noqa: F401

            out += [("skimage", f"{i}") for i in range(min(n // 2, 64))]
        except ImportError:
            pass
    specs.append(f"sklearn:digits?split=train,per_class={max(1, -(-(n - len(out)) // (10 * len(specs) + 10)))}")
    # Round-robin over the domains, so the cut at n takes from each alike.
    lists = [[("spec", f"{s}#{it.id}") for it in list_items(DataSpec.parse(s))] for s in specs]
    for i in range(max(map(len, lists))):
        out += [lst[i] for lst in lists if i < len(lst)]
    return out[:n]


def _read_source(kind: str, ident: str, data: Path | None) -> bytes:
    from ..data import DataSpec, list_items

    if kind == "imagenet":
        with zipfile.ZipFile(data / "imagenet-sample" / "val.zip") as z:
            return z.read(ident)
    if kind == "skimage":
        from PIL import Image
        from skimage import data as sk

        photos = [sk.astronaut, sk.coffee, sk.chelsea, sk.rocket, sk.immunohistochemistry, sk.cat]
        i = int(ident)
        a = np.asarray(photos[i % len(photos)]())
        h, w = a.shape[:2]
        s = min(h, w) - 16 * (i // len(photos))
        y, x = (h - s) // 2 + (i % 3) * 4, (w - s) // 2
        buf = io.BytesIO()
        Image.fromarray(a[y : y + s, x : x + s]).convert("RGB").save(buf, "PNG")
        return buf.getvalue()
    spec, _, item = ident.rpartition("#")
    cache = _read_source.__dict__.setdefault("_items", {})
    if spec not in cache:
        cache[spec] = {it.id: it for it in list_items(DataSpec.parse(spec))}
    return cache[spec][item].read()


def _decode_all(preprocessor, src: list[tuple[str, str]], data: Path | None, what: str) -> np.ndarray:
    """Preprocessed images (m, 3, S, S) of `src`; a file that is not an image is skipped with
    one warning naming it, and ValueError is raised when none is left."""
    from ..images import decode_image

    good, bad = [], []
    for k, i in src:
        try:
            good.append(preprocessor(decode_image(_read_source(k, i, data))).numpy())
        except Exception as e:  # noqa: BLE001 - any unreadable file: skip it, say which
            bad.append(f"{i} ({e})")
    if bad:
        warnings.warn(f"{what}: {len(bad)} of {len(src)} files skipped, not images: {bad[0]}{' ...' if len(bad) > 1 else ''}", stacklevel=3)
    if not good:
        raise ValueError(f"{what}: none of its {len(src)} files is an image ({bad[0] if bad else 'no files'})")
    return np.stack(good).astype(np.float32)


def calibration_digest(src: list[tuple[str, str]], data: Path | None = None) -> str:
    """A digest of the calibration images' ids and bytes: an image replaced under the same name
    gives a new INT8 graph and a new `auto` decision."""
    h = hashlib.sha256(json.dumps(src).encode())
    for k, i in src:
        try:
            h.update(hashlib.sha256(_read_source(k, i, data)).digest())
        except Exception:  # noqa: BLE001 - unreadable: its id alone (decoding will say why)
            h.update(b"?")
    return h.hexdigest()[:12]


def calibration_images(preprocessor, n: int = 256, calibration: CalibrationSet = CalibrationSet()) -> tuple[np.ndarray, str]:
    """The preprocessed calibration images (~n, 3, S, S) float32 and their digest.

    Raises RuntimeError when there are none, ValueError when none of them is an image."""
    src = calibration_sources(n, calibration)
    if not src:
        raise RuntimeError("no calibration images: no calibration data was named and scikit-learn's digits are not available")
    if calibration.images and len(src) < 64:
        warnings.warn(f"METALORA_CALIBRATION_DATA: calibrating INT8 on {len(src)} images; a few hundred are recommended", stacklevel=2)
    return _decode_all(preprocessor, src, calibration.data, "calibration images"), calibration_digest(src, calibration.data)


def check_images(preprocessor, n: int = CHECK_IMAGES, calibration: CalibrationSet = CalibrationSet()) -> np.ndarray:
    """A fixed batch of real images for the start-up check, two domains: photos calibration did
    not see (the deployer's held-out images, or the held-out ImageNet sample of `data`; else more
    digits) and scikit-learn digits (test split; small grey glyphs, the domain low precision hurt
    most in docs/benchmarks.md)."""
    from ..data import DataSpec, list_items
    from ..images import decode_image

    data = calibration.data
    own = own_images(calibration.images)
    x: list[np.ndarray] = []
    if own is not None:  # the deployer's own images that calibration left out
        held_own = own[: own_check_count(len(own))]
        if held_own:
            x = list(_decode_all(preprocessor, held_own, data, "METALORA_CALIBRATION_DATA (check images)"))
    else:
        _, held = imagenet_split(data)
        if held:
            with zipfile.ZipFile(data / "imagenet-sample" / "val.zip") as z:
                x = [preprocessor(decode_image(z.read(m))).numpy() for m in held[:: max(1, len(held) // (n // 2))][: n // 2]]
    items = list_items(DataSpec.parse(f"sklearn:digits?split=test,per_class={max(1, n // 10 + 1)}"))
    x += [preprocessor(decode_image(it.read())).numpy() for it in items[:: max(1, len(items) // (n - len(x)))][: n - len(x)]]
    return np.stack(x).astype(np.float32)  # (n, 3, S, S)


def photos_held_out(calibration: CalibrationSet = CalibrationSet()) -> bool:
    """Whether the start-up check has photos that calibration did not see (held-out ImageNet
    sample of `data`, or part of `images`): without them `auto` leaves int8 out."""
    own = own_images(calibration.images)
    if own is not None:
        return own_check_count(len(own)) > 0
    return bool(imagenet_split(calibration.data)[1])
