"""ONNX Runtime static INT8 quantisation of the prefix graph (`quant_pre_process`, then
`quantize_static` in QDQ format, MinMax calibration over preprocessed real images, `calib`).
ORT's CPU EP fuses the QDQ pairs into QLinearConv (MLAS u8s8 kernels, VNNI where the CPU has it)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


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


