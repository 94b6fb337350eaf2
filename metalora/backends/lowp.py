"""Low-precision CPU inference of the shared frozen prefix: ONNX Runtime static INT8 and torch BF16.

The frozen prefix runs once per batch for every adapter, so it is where lower precision pays
(efficientnet_lite0: `blocks[:6]`, 87 % of the model's FLOPs, at the default cut; `blocks[:5]`,
63 %, and `blocks[:4]`, 41 %, in a store cut there); the per-adapter tail graphs, and the frozen
bridge blocks that take later-cut adapters' rows from an earlier cut to theirs (`OrtRunner.bridge`),
stay FP32. Precisions:

* `fp32`: the prefix graph with TF "SAME" padding made static for the fixed input size (timm's
  `Conv2dSame` pads from the runtime shape; the traced graph then keeps Shape/Ceil/Pad chains
  that ORT can neither fold nor fuse into the Conv). Same numbers as the torch prefix (max abs
  diff 0), measured ~1.5x faster than `OrtRunner`'s graph on this project's CPU.
* `int8`: that graph quantised with ORT's own tools (`quant_pre_process`, then
  `quantize_static` in QDQ format, MinMax calibration over a few hundred real images
  preprocessed by the project's `Preprocessor`; see `calibration_images`). ORT's CPU EP fuses
  the QDQ pairs into QLinearConv (MLAS u8s8 kernels, VNNI where the CPU has it).
* `bf16`: the torch prefix under `torch.autocast("cpu", bfloat16)` with channels_last (oneDNN);
  offered only where /proc/cpuinfo lists `avx512_bf16` or `amx_bf16`.
* `auto`: the fastest precision whose start-up accuracy check passes (`choose_precision`),
  the result cached by model hash + CPU flags + library versions.

Nothing here assumes a CPU feature: `cpu_flags()` reads /proc/cpuinfo at run time.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import random
import statistics
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .onnx_backend import BASE, OPSET, OrtRunner, default_cache_dir, graph_digest

PRECISIONS = ("auto", "fp32", "int8", "bf16")
# The ISA extensions that decide low-precision speed (Linux /proc/cpuinfo names).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

# Start-up accuracy check (`check_precision`): on a fixed batch of 32 real images (half held-out
# photos, half digit glyphs), the low-precision pipeline's base (ImageNet head) top-1 must agree
# with FP32 on at least this share of images and the mean cosine of its embeddings to FP32's must
# reach this. Measured here: bf16 0.9985 / 1.0; int8 with the stem and blocks 0-1 in FP32 (the
# default) 0.997 / 1.0; int8 throughout 0.983 / 0.81 (fails: it lost 4.7 points of k-NN top-1
# on digits). See docs/benchmarks.md ("Low precision").
CHECK_MIN_AGREEMENT = 0.9
CHECK_MIN_COSINE = 0.99
CHECK_IMAGES = 32


# ------------------------------------------------------------------------------------ CPU features
def cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The `flags` of the first CPU in /proc/cpuinfo (empty where the file is absent)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_info(path: str | Path = "/proc/cpuinfo") -> dict:
    """CPU model name, logical CPUs and which of `ISA_FLAGS` it reports (read at run time)."""
    model = "unknown"
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags(path)
    return {"model": model, "logical_cpus": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags]}


def unavailable(precision: str, flags: frozenset[str] | None = None) -> str | None:
    """Why `precision` cannot run here, or None when it can."""
    flags = cpu_flags() if flags is None else flags
    if precision not in PRECISIONS:
        return f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
    if precision == "bf16" and not any(f in flags for f in BF16_FLAGS):
        return f"bf16 needs one of the CPU flags {', '.join(BF16_FLAGS)}; this CPU reports none"
    if precision in ("fp32", "int8"):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return f"{precision} runs on onnxruntime, which is not installed"
    return None


def refused(precision: str, backend: str, device) -> str | None:
    """Why a resolved `backend` ("torch" | "onnx") on `device` cannot serve `precision`, or None.

    The one rule the server's pre-flight (`service.cli.preflight`) and its backend factory
    (`service.engine.make_backend`) both apply: int8/bf16 are the ONNX backend's CPU paths.
    """
    import torch

    if precision in ("auto", "fp32"):
        return None
    if backend == "torch":
        return f"--precision {precision} runs on the onnx backend (metalora.lowp); the torch backend is fp32: use --backend onnx or --precision fp32"
    if torch.device(device).type != "cpu":
        return f"--precision {precision} is a CPU path; on {device} use --precision auto or fp32"
    why = unavailable(precision)
    return f"--precision {precision}: {why}" if why else None


def candidates(flags: frozenset[str] | None = None) -> list[str]:
    """The concrete precisions this CPU can run, FP32 first."""
    return [p for p in ("fp32", "int8", "bf16") if unavailable(p, flags) is None]


# ------------------------------------------------------------------------------------ static padding
def static_pad_copy(backbone, input_size: int):
    """A copy of the backbone whose TF-"SAME" convs (timm `Conv2dSame`) pad by constants.

    The pads are timm's own `pad_same_arg` for the input each conv sees at `input_size`, so the
    result is exact at that size (and only there, which is all a fixed-size export needs).
    """
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    bb = copy.deepcopy(backbone).float().cpu().eval()
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, name=n: sizes.__setitem__(name, tuple(a[0].shape[-2:])))
        for n, m in bb.named_modules()
        if isinstance(m, Conv2dSame)
    ]
    with torch.no_grad():
        bb.prefix(torch.zeros(1, 3, input_size, input_size))  # (1, 3, S, S)
        bb.tail(bb.prefix(torch.zeros(1, 3, input_size, input_size)))
    for h in hooks:
        h.remove()
    for name, hw in sizes.items():
        m = bb.get_submodule(name)
        conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups, m.bias is not None)
        conv.load_state_dict(m.state_dict())
        pad = pad_same_arg(list(hw), list(m.kernel_size), list(m.stride), list(m.dilation))  # [left, right, top, bottom]
        parent, _, attr = name.rpartition(".")
        setattr(bb.get_submodule(parent) if parent else bb, attr, nn.Sequential(nn.ZeroPad2d(pad), conv))
    return bb


class _Prefix(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone.prefix(x)  # (N, C_p, H_p, W_p)


def export_static_prefix(backbone, path: str | Path, input_size: int) -> Path:
    """The prefix graph (image (N, 3, S, S) -> features) with static pads, FP32, dynamic batch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Prefix(static_pad_copy(backbone, input_size)),
            (torch.zeros(2, 3, input_size, input_size),),
            str(tmp),
            input_names=["image"],
            output_names=["features"],
            dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    os.replace(tmp, path)
    return path


def export_static_bridge(backbone, start: int, stop: int, path: str | Path, input_size: int) -> Path:
    """`OrtRunner`'s bridge graph (onnx_backend.export_bridge: frozen blocks[start:stop]) with
    static pads, as `export_static_prefix` makes the prefix (block 5 of efficientnet_lite0 opens
    with a stride-2 TF-"SAME" conv)."""
    from .onnx_backend import export_bridge

    return export_bridge(static_pad_copy(backbone.at_cut(start), input_size), start, stop, path, input_size)


# ------------------------------------------------------------------------------------ calibration
@dataclass(frozen=True)
class QuantConfig:
    """How the prefix is quantised (`onnxruntime.quantization.quantize_static` arguments).

    Defaults are the setting whose accuracy held best in the measurements of docs/benchmarks.md
    ("Low precision"): QDQ, per-channel weights, uint8 activations / int8 weights, every op type
    ORT quantises, except the stem and blocks 0-1 (the 112x112 and 56x56 layers, ~23 % of the
    prefix's FLOPs), which stay FP32. Quantising those too ran 1.3x faster but cost 4.7 points
    of k-NN top-1 on the digits adapter; per-tensor weights, int8 activations, percentile
    calibration or keeping only the last stage in FP32 did not recover it.
    """

    fmt: str = "qdq"  # qdq | qoperator
    per_channel: bool = True
    activations: str = "u8"  # u8 | s8
    op_types: tuple[str, ...] = ()  # () = every op type ORT can quantise; ("Conv",) = convs only
    calibrate: str = "minmax"  # minmax | percentile | entropy
    calib_images: int = 256
    exclude: tuple[str, ...] = ("/conv_stem/", "/blocks.0/", "/blocks.1/")  # node-name substrings kept FP32

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def shared_data_dir() -> Path | None:
    """`../shared/data` next to the checkout (or METALORA_SHARED/data) when present."""
    root = Path(os.environ.get("METALORA_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
    return root / "data" if (root / "data").is_dir() else None


def imagenet_split(data: Path | None = None, every: int = 8) -> tuple[list[str], list[str]]:
    """ImageNet-sample members (`val.zip`) used for calibration (every `every`-th) and held out."""
    data = data or shared_data_dir()
    if data is None or not (data / "imagenet-sample" / "val.zip").is_file():
        return [], []
    with zipfile.ZipFile(data / "imagenet-sample" / "val.zip") as z:
        members = sorted(m for m in z.namelist() if not m.endswith("/"))
    return members[::every], [m for i, m in enumerate(members) if i % every]


# The ../shared/data training splits INT8 calibration draws from (name, number of classes).
CALIBRATION_DOMAINS = (("cifar10", 10), ("mnist", 10), ("fashion-mnist", 10), ("eurosat", 10), ("gtsrb", 43))


def own_images() -> list[tuple[str, str]] | None:
    """The images METALORA_CALIBRATION_DATA names (data specs separated by ';': ImageFolder
    directories or zips), in a seeded shuffled order; None when it is not set. Raises
    FileNotFoundError / ValueError (metalora.data) for a spec that names nothing readable."""
    from .data import DataSpec, list_items

    env = os.environ.get("METALORA_CALIBRATION_DATA")
    if not env:
        return None
    out = [("spec", f"{s.strip()}#{it.id}") for s in env.split(";") if s.strip() for it in list_items(DataSpec.parse(s.strip()))]
    random.Random(0).shuffle(out)
    return out


def own_check_count(total: int) -> int:
    """How many of the deployer's `total` images are held out for the start-up check (never
    calibrated on): half of CHECK_IMAGES, at most a quarter of them."""
    return min(CHECK_IMAGES // 2, total // 4)


def calibration_sources(n: int = 256, data: Path | None = None) -> list[tuple[str, str]]:
    """What the (at most `n`, per-class rounding may leave a few less) calibration images are, as
    (kind, id) pairs; never a test image.

    With ../shared/data: half ImageNet-sample photos (every 8th; the rest are held out for the
    top-1 check) and half the training splits of the domains the shipped adapters serve
    (CIFAR-10, MNIST, Fashion-MNIST, EuroSAT, GTSRB, scikit-learn digits), taken in turn so every
    domain's activation ranges are seen (measured against photos + CIFAR-10 + MNIST + digits:
    GTSRB's drops 0.35 / 0.56 -> -0.20 / 0.46 points (k-NN / head); every other set moved by at
    most 0.33 points, one image of the 300-image digits set, either way). Without it: scikit-learn's digits (train split) and,
    when scikit-image is installed, its bundled photos, cropped several ways: a thin set for
    photos, so a deployment should name its own images in METALORA_CALIBRATION_DATA (data specs,
    see metalora.data, separated by ';'; a seeded sample of `n` when there are more).
    """
    from .data import DataSpec, list_items

    own = own_images()
    if own is not None:  # the deployer's own images, less those held out for the start-up check
        rest = own[own_check_count(len(own)):]
        return rest[:n]
    data = data or shared_data_dir()
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
    from .data import DataSpec, list_items

    if kind == "imagenet":
        with zipfile.ZipFile((data or shared_data_dir()) / "imagenet-sample" / "val.zip") as z:
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
    from .images import decode_image

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


def calibration_images(preprocessor, n: int = 256, data: Path | None = None) -> tuple[np.ndarray, str]:
    """The preprocessed calibration images (~n, 3, S, S) float32 and their digest.

    Raises RuntimeError when there are none, ValueError when none of them is an image."""
    src = calibration_sources(n, data)
    if not src:
        raise RuntimeError("no calibration images: neither ../shared/data nor scikit-learn's digits are available")
    if own_images() is not None and len(src) < 64:
        warnings.warn(f"METALORA_CALIBRATION_DATA: calibrating INT8 on {len(src)} images; a few hundred are recommended", stacklevel=2)
    return _decode_all(preprocessor, src, data, "calibration images"), calibration_digest(src, data)


def quantize_prefix(fp32_path: Path, out: Path, calib: np.ndarray, cfg: QuantConfig, batch: int = 16) -> Path:
    """Static INT8 quantisation of an FP32 prefix graph with ORT's tools; returns `out`."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(0, len(calib), batch))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {"image": calib[i : i + batch]}  # (b, 3, S, S)

    # Calibration ranges are merged every `every` batches to bound memory; ORT's MinMax
    # calibrator fails when the last merge leaves no batch behind, so `every` must not divide.
    nb = -(-len(calib) // batch)
    every = next((m for m in range(4, nb) if nb % m), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    pre = out.with_name(out.name + f".pre{os.getpid()}.onnx")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}.onnx")
    # ORT's calibrator logs one INFO line per rescaled tensor to the root logger (~70 here).
    quiet = logging.Filter()
    quiet.filter = lambda r: not (r.levelno <= logging.INFO and str(r.msg).startswith("Increased scale"))
    logging.getLogger().addFilter(quiet)
    try:
        quant_pre_process(str(fp32_path), str(pre))  # shape inference + constant folding: Conv->Clip chains the quantiser can see
        import onnx

        keep = [n.name for n in onnx.load(str(pre)).graph.node if any(e in n.name for e in cfg.exclude)] if cfg.exclude else []
        quantize_static(
            str(pre),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ if cfg.fmt == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=list(cfg.op_types) or None,
            nodes_to_exclude=keep,
            per_channel=cfg.per_channel,
            activation_type=QuantType.QUInt8 if cfg.activations == "u8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[cfg.calibrate],
            extra_options={"CalibMaxIntermediateOutputs": every} if every else {},
        )
        os.replace(tmp, out)
    finally:
        logging.getLogger().removeFilter(quiet)
        for p in (pre, tmp):
            p.unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------------ the runner
class _TorchBF16Prefix:
    """The torch prefix under CPU BF16 autocast, with an ORT session's `run` call shape."""

    def __init__(self, backbone):
        self.backbone = copy.deepcopy(backbone).float().cpu().eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(self, _outputs, feed: dict) -> list[np.ndarray]:
        x = torch.from_numpy(feed["image"]).contiguous(memory_format=torch.channels_last)  # (N, 3, S, S)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.backbone.prefix(x)  # (N, C_p, H_p, W_p) bf16
        return [h.float().contiguous().numpy()]


class LowpRunner(OrtRunner):
    """`OrtRunner` with the shared prefix in a chosen precision (fp32 | int8 | bf16); tails FP32.

    Same `run(x, keys) -> Output` as `OrtRunner`. Graphs are cached in the ONNX cache directory
    under names that carry the prefix's content hash, the quantisation config and the calibration
    set's digest, so a restart reuses them.
    """

    def __init__(self, runtime, precision: str = "fp32", quant: QuantConfig | None = None, data: Path | None = None, **kw):
        super().__init__(runtime, **kw)
        why = unavailable(precision)
        if precision == "auto":
            why = "resolve `auto` with choose_precision() first"
        if why:
            raise ValueError(why)
        self.precision = precision
        self.quant = quant or QuantConfig()
        self.data = data
        if precision == "int8" and not any(f in cpu_flags() for f in VNNI_FLAGS):
            # ORT's u8s8 kernels on AVX2/AVX-512 without VNNI can saturate intermediate sums
            # (ONNX Runtime's quantisation docs, "reduce_range"); `auto` checks accuracy at start.
            warnings.warn(f"int8 on a CPU without VNNI ({', '.join(VNNI_FLAGS)}): slower and possibly less accurate; --precision auto measures and checks it", stacklevel=2)

    def static_prefix_path(self) -> Path:
        digest = graph_digest(self.runtime.backbone, None, self.input_size, "prefix-static")
        return self.cached(f"{self.runtime.backbone.identity.name}-prefix-static-{digest}.onnx")

    def int8_prefix_path(self, calib_digest: str) -> Path:
        import onnxruntime as ort

        tag = hashlib.sha256(f"{self.static_prefix_path().name}|{self.quant.digest()}|{calib_digest}|{ort.__version__}".encode()).hexdigest()[:16]
        return self.cached(f"{self.runtime.backbone.identity.name}-prefix-int8-{tag}.onnx")

    def _ensure_static(self) -> Path:
        path = self.static_prefix_path()
        if not path.exists():
            export_static_prefix(self.runtime.backbone, path, self.input_size)
        return path

    def _ensure_int8(self) -> Path:
        fp32 = self._ensure_static()
        digest = calibration_digest(calibration_sources(self.quant.calib_images, self.data), self.data)
        path = self.int8_prefix_path(digest)
        if not path.exists():
            calib, _ = calibration_images(self.runtime.preprocessor, self.quant.calib_images, self.data)
            quantize_prefix(fp32, path, calib, self.quant)
        return path

    def prefix_graph(self) -> Path | None:
        """The prefix graph this precision runs (None for bf16, which runs torch)."""
        return {"fp32": self._ensure_static, "int8": self._ensure_int8}.get(self.precision, lambda: None)()

    def tag(self) -> str:
        """What this runner computes with: the precision, and for int8 the quantised graph's file
        name (it hashes the quantisation config, the calibration set and the ORT version)."""
        return f"int8 {self.prefix_graph().name}" if self.precision == "int8" else self.precision

    def bridge(self, start: int, stop: int):
        """The frozen blocks[start:stop] for rows of adapters cut after the prefix: FP32 in every
        precision (static pads, as the fp32 prefix), so only the shared prefix is quantised."""
        with self._lock:
            if (start, stop) not in self._bridges:
                digest = graph_digest(self.runtime.backbone.at_cut(start), None, self.input_size, f"bridge-static:{start}:{stop}")
                path = self.cached(f"{self.runtime.backbone.identity.name}-bridge-static-{start}-{stop}-{digest}.onnx")
                if not path.exists():
                    export_static_bridge(self.runtime.backbone, start, stop, path, self.input_size)
                self._bridges[(start, stop)] = self.ort.InferenceSession(str(path), self.options, providers=self.providers)
            return self._bridges[(start, stop)]

    def prefix(self):
        with self._lock:
            if self._prefix is None:
                if self.precision == "bf16":
                    self._prefix = _TorchBF16Prefix(self.runtime.backbone)
                else:
                    self._prefix = self.ort.InferenceSession(str(self.prefix_graph()), self.options, providers=self.providers)
            return self._prefix

    def features(self, x: np.ndarray) -> np.ndarray:
        """Prefix features (N, C_p, H_p, W_p) float32 of preprocessed images (N, 3, S, S)."""
        return self.prefix().run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]


# ------------------------------------------------------------------------------------ choosing
def check_images(preprocessor, n: int = CHECK_IMAGES, data: Path | None = None) -> np.ndarray:
    """A fixed batch of real images for the start-up check, two domains: held-out ImageNet-sample
    photos when ../shared is present (else more digits) and scikit-learn digits (test split;
    small grey glyphs, the domain low precision hurt most in docs/benchmarks.md)."""
    from .data import DataSpec, list_items
    from .images import decode_image

    data = data or shared_data_dir()
    own = own_images()
    x: list[np.ndarray] = []
    if own is not None:  # the deployer's own images that calibration left out
        held_own = own[: own_check_count(len(own))]
        if held_own:
            x = list(_decode_all(preprocessor, held_own, data, "METALORA_CALIBRATION_DATA (check images)"))
    else:
        _, held = imagenet_split(data) if data is not None else ([], [])
        if held:
            with zipfile.ZipFile(data / "imagenet-sample" / "val.zip") as z:
                x = [preprocessor(decode_image(z.read(m))).numpy() for m in held[:: max(1, len(held) // (n // 2))][: n // 2]]
    items = list_items(DataSpec.parse(f"sklearn:digits?split=test,per_class={max(1, n // 10 + 1)}"))
    x += [preprocessor(decode_image(it.read())).numpy() for it in items[:: max(1, len(items) // (n - len(x)))][: n - len(x)]]
    return np.stack(x).astype(np.float32)  # (n, 3, S, S)


def photos_held_out(data: Path | None = None) -> bool:
    """Whether the start-up check has photos that calibration did not see (held-out ImageNet
    sample, or part of METALORA_CALIBRATION_DATA): without them `auto` leaves int8 out."""
    own = own_images()
    if own is not None:
        return own_check_count(len(own)) > 0
    data = data or shared_data_dir()
    return bool(data is not None and imagenet_split(data)[1])


def _base_outputs(runtime, feats: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    bb = runtime.backbone
    with torch.inference_mode():
        h = torch.from_numpy(feats).to(next(bb.parameters()).dtype)  # (N, C_p, H_p, W_p)
        emb = bb.tail(h)  # (N, D)
        return emb.float(), bb.head(emb).float()  # (N, D), (N, 1000)


def check_precision(runtime, runners: dict[str, LowpRunner], x: np.ndarray, reference: str = "fp32") -> dict:
    """Each precision against FP32 on one fixed batch: base top-1 agreement and embedding cosine."""
    ref_emb, ref_logits = _base_outputs(runtime, runners[reference].features(x))
    out = {}
    for name, r in runners.items():
        emb, logits = _base_outputs(runtime, r.features(x))
        agree = float((logits.argmax(1) == ref_logits.argmax(1)).float().mean())
        cos = float(torch.nn.functional.cosine_similarity(emb, ref_emb, dim=1).mean())
        out[name] = {"agreement": round(agree, 4), "cosine": round(cos, 5), "pass": agree >= CHECK_MIN_AGREEMENT and cos >= CHECK_MIN_COSINE}
    return out


def time_prefixes(runners: dict[str, LowpRunner], x: np.ndarray, rounds: int = 3) -> dict[str, float]:
    """Images/s of each runner's prefix on `x`, runs alternated (order reversed every round)."""
    names = list(runners)
    for n in names:
        runners[n].features(x)  # warm-up: sessions, arenas, oneDNN primitives
    t: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            runners[n].features(x)
            t[n].append(time.perf_counter() - t0)
    return {n: len(x) / statistics.median(v) for n, v in t.items()}


def choose_precision(runtime, precision: str = "auto", cache_dir: Path | None = None, threads: int | None = None, data: Path | None = None, log=None) -> tuple[str, dict]:
    """`auto` -> the fastest precision here whose accuracy check passes; others are validated.

    The decision (check and timing) is cached as JSON keyed by the prefix graph's content hash,
    the quantisation config and calibration source, the CPU model and flags, the thread count and
    the torch/onnxruntime versions; a cache hit costs nothing.
    Returns (precision, report).
    """
    if precision != "auto":
        why = unavailable(precision)
        if why:
            raise ValueError(why)
        return precision, {"chosen": precision, "how": "asked for"}
    import onnxruntime as ort

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    info = cpu_info()
    key = hashlib.sha256(
        json.dumps(
            [graph_digest(runtime.backbone, None, int(runtime.preprocess_cfg.input_size), "prefix"), QuantConfig().digest(), calibration_digest(calibration_sources(QuantConfig().calib_images, data), data), str(data or shared_data_dir()), info["model"], sorted(cpu_flags()), torch.__version__, ort.__version__, threads]
        ).encode()
    ).hexdigest()[:16]
    path = cache_dir / f"precision-auto-{key}.json"
    try:
        rep = json.loads(path.read_text())
        if rep["chosen"] in ("fp32", "int8", "bf16") and unavailable(rep["chosen"]) is None:
            return rep["chosen"], {**rep, "how": "cached"}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent, unreadable or cut short: decide again
    threads = threads or torch.get_num_threads()
    cands = candidates()
    skipped = {}
    if "int8" in cands and not photos_held_out(data):
        # Checked on digit glyphs alone, int8 could not be trusted on photos, so `auto` leaves it
        # out (an explicit --precision int8 still runs).
        cands.remove("int8")
        skipped["int8"] = "no held-out photos to check it on (no ../shared/data, and METALORA_CALIBRATION_DATA unset or under 4 images)"
    runners = {p: LowpRunner(runtime, p, cache_dir=cache_dir, threads=threads, data=data) for p in cands}
    x = check_images(runtime.preprocessor, data=data)
    checks = check_precision(runtime, runners, x)
    speed = time_prefixes({p: r for p, r in runners.items() if checks[p]["pass"]}, x)
    chosen = max(speed, key=speed.get)
    rep = {"chosen": chosen, "checks": checks, "skipped": skipped, "prefix_img_s": {k: round(v, 1) for k, v in speed.items()}, "cpu": info, "threads": threads}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rep, indent=1) + "\n")
        os.replace(tmp, path)  # atomic: a second server starting meanwhile reads all of it or nothing
    except OSError as e:  # a read-only cache: the decision is not kept, the next start measures again
        warnings.warn(f"precision auto: could not cache the decision in {path.parent}: {e}", stacklevel=2)
    if log:
        log(f"precision auto -> {chosen} ({rep['prefix_img_s']})")
    return chosen, {**rep, "how": "measured"}


def create_lowp_backend(runtime, precision: str = "auto", threads: int | None = None) -> LowpRunner:
    """A LowpRunner over the runtime in `precision` (auto resolved by `choose_precision`)."""
    threads = threads or torch.get_num_threads()
    chosen, report = choose_precision(runtime, precision, threads=threads)
    runner = LowpRunner(runtime, chosen, threads=threads)
    runner.precision_report = report
    try:  # now, not on the first request: a missing calibration set or a cache that cannot be written fails the start
        runner.prefix()
    except (OSError, RuntimeError, ValueError) as e:
        hint = " (METALORA_CALIBRATION_DATA names the calibration images)" if chosen == "int8" else ""
        raise RuntimeError(f"precision {chosen}: the prefix graph could not be built: {e}{hint}") from e
    return runner


# ------------------------------------------------------------------------------------ accuracy
def _test_specs(manifest: dict, data: Path, per_class: int | None) -> list[str]:
    """The adapter's recorded test specs, `../shared/data` re-rooted at `data`, each the whole
    test split (`per_class=None`: a bundle may record a subset it was scored on at training time;
    a 0.5-point bound needs every image there is) or `per_class` images a class."""
    out = []
    for spec in manifest.get("metrics", {}).get("data", []):
        spec = spec.replace("../shared/data", str(data))
        body, _, query = spec.partition("?")
        opts = [o for o in query.split(",") if o and not o.startswith("per_class=")] + ([f"per_class={per_class}"] if per_class is not None else [])
        out.append(f"{body}?{','.join(opts)}" if opts else body)
    return out


def evaluate_precisions(
    runtime,
    precisions: list[str],
    adapters: list[str] | None = None,
    imagenet: int | None = None,
    per_class: int | None = None,
    state_path: Path | None = None,
    data: Path | None = None,
    batch: int = 32,
    log=print,
    **runner_kw,
) -> dict:
    """Accuracy per precision, same images for all: ImageNet-sample top-1 (held-out photos, the
    calibration ones excluded) and each adapter's k-NN@10 and head top-1 on its recorded test
    sets, whole (`_test_specs`), against its bundle's gallery. Adapter tails and heads run FP32 (torch) on each precision's
    prefix features. `imagenet`/`per_class` shrink the sets (tests); `state_path` makes a long
    run resumable (finished (set, precision) results are kept there and skipped on a rerun).
    """
    from .bundle import load_gallery
    from .data import DataSpec, FeatureSet, list_items
    from .evaluate import evaluate_features
    from .images import decode_image
    from .imagenet import read_classes_tsv

    data = data or shared_data_dir()
    if data is None:
        raise RuntimeError("accuracy needs ../shared/data (ImageNet sample and the adapters' test sets)")
    state = json.loads(state_path.read_text()) if state_path and state_path.is_file() else {}

    def save():
        if state_path:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            state_path.write_text(json.dumps(state, indent=1) + "\n")

    runners = {p: LowpRunner(runtime, p, data=data, **runner_kw) for p in precisions}
    # What each entry was measured with: a state written for another quantisation config or set
    # size is measured again rather than reused (entries are keyed by the adapter's version too).
    graph = {p: runners[p].tag() for p in precisions}

    def done(key: str, p: str, specs: list[str]) -> bool:
        e = state.get(f"{key}/{p}")
        return e is not None and e.get("graph") == graph[p] and e.get("specs") == shown(specs)

    def shown(specs: list[str]) -> list[str]:  # as recorded in the state: independent of where the data is
        return [sp.replace(str(data), "../shared/data") for sp in specs]

    def features(raw: list, todo: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {p: [] for p in todo}
        for i in range(0, len(raw), batch):
            x = np.stack([runtime.preprocessor(decode_image(r() if callable(r) else r)).numpy() for r in raw[i : i + batch]])  # (b, 3, S, S)
            for p in todo:
                out[p].append(runners[p].features(x))  # (b, C_p, H_p, W_p)
        return {p: np.concatenate(v) for p, v in out.items()}

    # ImageNet sample: the backbone's own head.
    _, held = imagenet_split(data)
    held = held[:imagenet] if imagenet is not None else held
    todo = [p for p in precisions if not (state.get(f"imagenet/{p}", {}).get("graph") == graph[p] and state[f"imagenet/{p}"].get("n") == len(held))]
    if held and todo:
        wnids = read_classes_tsv(data / "imagenet-sample" / "classes.tsv")
        index = {w: i for i, w in enumerate(wnids)}
        y = torch.tensor([index[Path(m).parent.name] for m in held])
        with zipfile.ZipFile(data / "imagenet-sample" / "val.zip") as z:
            feats = features([z.read(m) for m in held], todo)
        for p in todo:
            _, logits = _base_outputs(runtime, feats[p])
            state[f"imagenet/{p}"] = {"top1": float((logits.argmax(1) == y).float().mean()), "n": len(held), "graph": graph[p]}
            log(f"imagenet {p}: {state[f'imagenet/{p}']}")
        save()

    # Adapters: k-NN@10 against the bundle's gallery and head top-1, on the recorded test sets.
    names = adapters if adapters is not None else runtime.store.adapter_names()
    cache: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        key = runtime.load(name)
        manifest = runtime.manifests[key]
        specs = _test_specs(manifest, data, per_class)
        todo = [p for p in precisions if not done(key, p, specs)]
        if not todo or not specs:
            continue
        parts = []
        for spec in specs:
            ds = DataSpec.parse(spec)
            src = spec.split("=", 1)[1] if ds.task else spec
            items = list_items(ds)
            if src not in cache or any(p not in cache[src] for p in todo):
                cache[src] = {**cache.get(src, {}), **features([it.read for it in items], todo)}
            labels = [f"{ds.task}/{it.label}" if ds.task else it.label for it in items]
            parts.append((items, labels, ds.name, src))
        adapter = runtime.model.adapters[key]
        _, _, path = runtime.store.resolve(key)
        gallery = load_gallery(path, manifest)
        for p in todo:
            h = torch.from_numpy(np.concatenate([cache[src][p] for *_, src in parts]))  # (N, C_p, H_p, W_p)
            fs = FeatureSet(h, sum((lab for _, lab, _, _ in parts), []), sum(([it.id for it in items] for items, *_ in parts), []), specs, sum(([t] * len(items) for items, _, t, _ in parts), []))
            res = evaluate_features(runtime.model, adapter, manifest["adapter"]["labels"], fs, gallery)
            state[f"{key}/{p}"] = {**{k: res[k] for k in ("knn_top1", "head_top1", "n")}, "graph": graph[p], "specs": shown(specs)}
            log(f"{key} {p}: {state[f'{key}/{p}']}")
            save()
    return state


def accuracy_table(state: dict, reference: str = "fp32", max_drop_points: float = 0.5) -> dict:
    """Per set and precision: the figures, the drop vs `reference` in points, and pass/fail.

    Keys of `state` are `SET/PRECISION`, SET being `imagenet` or an adapter's `name@version`."""
    table: dict[str, dict] = {}
    for k, v in state.items():
        name, prec = k.split("/")
        v = {m: x for m, x in v.items() if m not in ("graph", "specs")}
        ref = state.get(f"{name}/{reference}")
        row = dict(v)
        if ref is not None:
            for m in ("top1", "knn_top1", "head_top1"):
                if v.get(m) is not None and ref.get(m) is not None:
                    row[f"{m}_drop_points"] = round(100 * (ref[m] - v[m]), 2)
            row["pass"] = all(row[d] <= max_drop_points for d in row if d.endswith("_drop_points"))
        table.setdefault(name, {})[prec] = row
    return table


__all__ = [
    "BASE",
    "PRECISIONS",
    "LowpRunner",
    "QuantConfig",
    "check_precision",
    "choose_precision",
    "cpu_flags",
    "cpu_info",
    "create_lowp_backend",
    "evaluate_precisions",
    "unavailable",
]
