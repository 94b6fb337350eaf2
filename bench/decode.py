"""Decode benchmarks and accuracy checks for metalora.images (issue 10).

    python -m bench.decode photo  [--repeats 9] [--json out.json]      # 12 MP q90 JPEG: decode+preprocess before vs after
    python -m bench.decode imagenet [--limit N] [--upscale K] [--json out.json]  # ImageNet-sample photos: tensor diff, top-1 with each path
    python -m bench.decode memory [NAME ...] [--max-pixels 40000000] [--json ...]  # peak RSS of one decode, worst files, each in a fresh process

"Before" is the decode of commit 58e2a14 (`Image.open(...).convert("RGB")` at full resolution,
then timm's eval transform); "full" is today's path with `shrink=False` (viewer-correct, full
resolution: the reference); "after" is today's default (`Image.draft` / `Image.reduce`, crop window
resampled). Photos are made in memory (an upscaled scikit-image photo with sensor-like grain);
nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metalora.backbones.base import Preprocess

from .common import interleaved, machine
from .settings import BenchSettings

CFG = Preprocess(input_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", crop_pct=0.875)  # efficientnet_lite0
SHARED = BenchSettings().shared
IMAGENET_ZIP = SHARED / "data" / "imagenet-sample" / "val.zip"


def phone_photo(size: tuple[int, int] = (4032, 3024), quality: int = 90, seed: int = 0, grain: float = 6.0) -> bytes:
    """A phone-sized JPEG (12 MP at quality 90, about 3 MB): a real photo upscaled, plus sensor-like grain."""
    import skimage.data

    rng = np.random.default_rng(seed)
    base = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()][seed % 4]
    img = Image.fromarray(base).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    a = np.asarray(img).astype(np.int16)
    a += rng.normal(0.0, grain, a.shape[:2] + (1,)).astype(np.int16)  # luminance grain, (H, W, 1)
    b = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(b, "JPEG", quality=quality)
    return b.getvalue()


def legacy_preprocess():
    """The decode + preprocess before issue 10 (full-resolution decode, no orientation), for 'before' timings."""
    from timm.data import create_transform

    tf = create_transform(input_size=(3, 224, 224), interpolation=CFG.interpolation, mean=CFG.mean, std=CFG.std, crop_pct=CFG.crop_pct, is_training=False)

    def run(data: bytes) -> torch.Tensor:
        img = Image.open(io.BytesIO(data))
        img.load()
        return tf(img.convert("RGB"))

    return run


def bench_photo(repeats: int = 9) -> dict:
    from metalora.images import Preprocessor

    data = phone_photo()
    before, full, after = legacy_preprocess(), Preprocessor(CFG, shrink=False), Preprocessor(CFG)
    t = interleaved({"before": lambda: before(data), "full": lambda: full(data), "after": lambda: after(data)}, repeats=repeats)
    d = (after(data) - full(data)).abs()
    return {
        "what": "decode + preprocess of one 4032x3024 quality-90 JPEG on one thread; median of interleaved rounds",
        "bytes": len(data),
        "repeats": repeats,
        "before_s": round(t.median("before"), 4),
        "full_s": round(t.median("full"), 4),
        "after_s": round(t.median("after"), 4),
        "speedup_vs_before": round(t.speedup("after", "before"), 2),
        "draft_factor": Preprocessor(CFG).decode(data).factor,
        "diff_vs_full": {"max": round(float(d.max()), 4), "mean": round(float(d.mean()), 5)},
    }


@torch.inference_mode()
def bench_imagenet(limit: int | None = None, batch: int = 25, upscale: int = 1) -> dict:
    """Both paths over the ImageNet sample: per-photo tensor differences and top-1/top-5 with each.

    `upscale` > 1 first enlarges each photo that many times (bicubic) and re-encodes it as a
    quality-90 JPEG in memory, a stand-in for camera-sized files: the sample's own photos (about
    500 x 375) are too small for any reduction, so at 1 both paths give the same tensor.
    """
    from tqdm import tqdm

    from metalora.backbones import create_backbone
    from metalora.imagenet import read_classes_tsv
    from metalora.images import Preprocessor

    bb = create_backbone("efficientnet_lite0").eval().to(memory_format=torch.channels_last)
    wnids = read_classes_tsv(IMAGENET_ZIP.parent / "classes.tsv")
    index = {w: i for i, w in enumerate(wnids)}
    full, fast = Preprocessor(bb.preprocess, shrink=False), Preprocessor(bb.preprocess)
    maxd, meand, shrunk, hits = [], [], 0, {"full": [0, 0], "fast": [0, 0]}
    with zipfile.ZipFile(IMAGENET_ZIP) as z:
        members = sorted(m for m in z.namelist() if not m.endswith("/"))[:limit]
        for i in tqdm(range(0, len(members), batch), desc="imagenet-sample", unit="batch"):
            chunk = members[i : i + batch]
            raws = [z.read(m) for m in chunk]
            if upscale > 1:
                raws = [_enlarge(r, upscale) for r in raws]
            y = torch.tensor([index[Path(m).parent.name] for m in chunk])
            xs = {"full": torch.stack([full(r) for r in raws]), "fast": torch.stack([fast(r) for r in raws])}  # (B, 3, 224, 224)
            shrunk += sum(fast.decode(r).factor > 1 for r in raws)
            d = (xs["fast"] - xs["full"]).abs().flatten(1)  # (B, 3*224*224)
            maxd += d.amax(1).tolist()
            meand += d.mean(1).tolist()
            for k, x in xs.items():
                t5 = bb(x.contiguous(memory_format=torch.channels_last)).topk(5, dim=1).indices  # (B, 5)
                hits[k][0] += int((t5[:, 0] == y).sum())
                hits[k][1] += int((t5 == y[:, None]).any(dim=1).sum())
    n = len(maxd)
    return {
        "n": n,
        "upscale": upscale,
        "shrunk": shrunk,
        "diff": {"max": round(max(maxd), 4), "mean": round(statistics.fmean(meand), 5), "p99_of_max": round(float(np.quantile(maxd, 0.99)), 4)},
        "top1_full": round(100 * hits["full"][0] / n, 2),
        "top1_fast": round(100 * hits["fast"][0] / n, 2),
        "top5_full": round(100 * hits["full"][1] / n, 2),
        "top5_fast": round(100 * hits["fast"][1] / n, 2),
        "top1_drop_points": round(100 * (hits["full"][0] - hits["fast"][0]) / n, 2),
    }


def _enlarge(data: bytes, k: int) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    b = io.BytesIO()
    img.resize((img.width * k, img.height * k), Image.Resampling.BICUBIC).save(b, "JPEG", quality=90)
    return b.getvalue()


# ---------------------------------------------------------------- memory: one decode per fresh process
WORST = {  # name -> how to make a file of `pixels` pixels (aspect 4:3 unless said)
    "jpeg-rgb-q90": lambda w, h: _flat_file("RGB", w, h, "JPEG", quality=90),
    "jpeg-progressive-q90": lambda w, h: _flat_file("RGB", w, h, "JPEG", quality=90, progressive=True),
    "png-rgba8": lambda w, h: _flat_file("RGBA", w, h, "PNG", compress_level=1),
    "png-palette-transparent": lambda w, h: _flat_file("P", w, h, "PNG", transparency=0, compress_level=1),
    "png-grey16": lambda w, h: _flat_file("I;16", w, h, "PNG", compress_level=1),
    "tiff-float32": lambda w, h: _flat_file("F", w, h, "TIFF"),
    "png-rgb8-aspect-20": lambda w, h: _flat_file("RGB", 20 * int((w * h / 20) ** 0.5), int((w * h / 20) ** 0.5), "PNG", compress_level=1),  # at the limit
}


def _flat_file(mode: str, w: int, h: int, fmt: str, **kw) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    elif mode == "F":
        img = Image.fromarray(rng.random((h, w), dtype=np.float32))
    else:
        img = Image.new(mode, (w, h))
        img.paste(Image.effect_noise((w // 8 + 1, h // 8 + 1), 40).resize((w, h)).convert(mode), (0, 0))  # some texture, cheap
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _child(path: str, shrink: bool, max_pixels: int) -> None:
    """Runs in a fresh interpreter: resident memory before, and the peak (VmHWM) during one decode + preprocess.

    The peak is reset first (`5 > /proc/self/clear_refs`): ru_maxrss would carry the parent's
    peak across exec, VmHWM after the reset is this decode's own.
    """
    from metalora.images import Preprocessor

    pre = Preprocessor(CFG, shrink=shrink)
    pre(Image.new("RGB", (8, 8)))  # warm the code paths that allocate once
    data = Path(path).read_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_mib("VmRSS")
    t = time.perf_counter()
    pre(data, max_pixels)
    dt = time.perf_counter() - t
    peak = _status_mib("VmHWM")
    print(json.dumps({"base_mib": base, "peak_mib": peak, "delta_mib": peak - base, "seconds": dt}))


def bench_memory(max_pixels: int = 40_000_000, only: list[str] | None = None) -> dict:
    w = int((max_pixels * 4 / 3) ** 0.5)
    h = max_pixels // w
    out = {"pixels": w * h, "size": [w, h], "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in WORST.items():
            if only and name not in only:
                continue
            p = Path(tmp) / name
            p.write_bytes(make(w, h))
            row = {"bytes": p.stat().st_size}
            for shrink in (False, True):
                r = subprocess.run([sys.executable, "-m", "bench.decode", "_child", str(p), str(int(shrink)), str(max_pixels)],
                                   capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
                row["after" if shrink else "full"] = {k: round(v, 3) for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
            out["files"][name] = row
            print(name, row, flush=True)
    out["worst_delta_mib_after"] = max(r["after"]["delta_mib"] for r in out["files"].values())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["photo", "imagenet", "memory", "_child"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--upscale", type=int, default=1, help="imagenet: enlarge each photo this many times first (camera-sized files)")
    ap.add_argument("--max-pixels", type=int, default=40_000_000)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.what == "_child":
        _child(a.args[0], bool(int(a.args[1])), int(a.args[2]))
        return
    torch.set_num_threads(1) if a.what == "photo" else None
    t0 = time.time()
    res = {"photo": lambda: bench_photo(a.repeats), "imagenet": lambda: bench_imagenet(a.limit, upscale=a.upscale), "memory": lambda: bench_memory(a.max_pixels, a.args or None)}[a.what]()
    res = {"section": a.what, **res, "machine": machine(), "wall_s": round(time.time() - t0, 1), "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
