"""The Open Inference Protocol's model mapping, shared by its two doors (REST `/v2` in
service/http/v2.py and gRPC in service/grpc/server.py): protocol requests -> data-plane calls,
data-plane results -> protocol tensors. It imports no web framework.

The mapping onto the protocol:

* a **model is an adapter** (`base` = the frozen backbone with its ImageNet head), and a **model
  version is a bundle version** (`base` has none);
* inputs (exactly one per request; both are declared, each `optional`, as Triton declares inputs
  that are alternatives): `image` BYTES [N] (or [N, 1]), each element an encoded image file,
  decoded by the same code as `/v1` (in JSON a base64 string or data: URL, as `/v1` JSON takes);
  or `pixels`, declared FP32 [N, 3, S, S]: the model input itself (preprocessed: resized,
  cropped, normalised as the backbone's recipe says), which skips decode and preprocessing. The
  older `pixels` UINT8 [N, H, W, 3] (RGB already decoded, run through the preprocessing) is still
  taken; the datatype tells the two apart;
* outputs (all by default): `probabilities` FP32 [N, C] (softmax of the logits over the bundle's
  calibrated temperature, as `/v1/predict` scores), `embedding` FP32 [N, D] (L2-normalised, as
  `/v1/embed`), `label` BYTES [N] (top-1), and, for bundles with a k-NN threshold, `unknown`
  BOOL [N] (as `/v1/predict`'s `unknown`; false where the gallery is empty or its store is down);
  the classification extension applies to `probabilities`;
* shapes in the metadata have the batch dimension first (-1); the model configuration follows
  Triton's convention for `max_batch_size > 0`: `dims` without it;
* statistics extension: per model version, from the data plane's counters.

Every limit is the data plane's (images per request, pixels and aspect ratio of UINT8 `pixels` as
of files, the model input's shape for FP32 `pixels`); the body size limit is the HTTP middleware's
and the gRPC server's maximum message size.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import asyncio

import numpy as np

from metalora.bundle import BundleError, read_manifest
from metalora.refs import BASE, AdapterRef, RefError

from ..dataplane import DataPlane, Scored
from ..errors import from_library, not_found
from .codec import InferRequest, InferResponse, RequestedOutput, Tensor, bad, classify

SERVER_NAME = "metalora-serve"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"]
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32", "BOOL": "TYPE_BOOL"}  # protocol datatype -> Triton's config name
INPUTS = {"image": "BYTES", "pixels": "FP32"}  # the datatypes the metadata declares
ACCEPTED = {"image": ("BYTES",), "pixels": ("FP32", "UINT8")}  # and what each input takes (UINT8 pixels: RGB, undeclared)
INPUT_HELP = "'image' (BYTES [N]) or 'pixels' (FP32 [N, 3, S, S], the model input; or UINT8 [N, H, W, 3], RGB)"
OUTPUTS = ("probabilities", "embedding", "label", "unknown")
DEFAULT_OUTPUTS = ("probabilities", "embedding", "label")  # `unknown` joins them for calibrated bundles


def server_version() -> str:
    try:
        return package_version("metalora-serve")
    except PackageNotFoundError:
        return "0"


def model_ref(name: str, version: str = "") -> AdapterRef:
    """Protocol (model, version) -> the adapter reference."""
    if not name:
        raise bad("invalid_request", "the model name is empty")
    if version and name == BASE:
        raise not_found("unknown_version", "'base' (the frozen backbone) has no versions; leave the version empty")
    try:
        return AdapterRef.of(name, version or None)
    except RefError as e:
        raise from_library(e) from None


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}


def model_ready(dp: DataPlane, name: str, version: str = "") -> bool:
    """Whether the model (version) is on the device now; unknown models are NOT_FOUND."""
    return dp.model_ready(model_ref(name, version))


def input_size(dp: DataPlane) -> int:
    """S: the side of the model's input (3, S, S), the backbone's preprocessing recipe."""
    return dp.svc.runtime.preprocessor.cfg.input_size


async def calibrated(dp: DataPlane, ref: AdapterRef) -> bool:
    """Whether the version `ref` names carries a k-NN threshold (so its answers have `unknown`): the
    loaded entry's, or for a version not on the device its manifest's `calibration.knn_threshold`."""
    key = dp.resolve(ref)
    if key == BASE:
        return False
    entry = dp.svc.registry.entries.get(key)
    if entry is not None:
        return entry.knn_threshold is not None
    try:
        manifest = await asyncio.to_thread(read_manifest, dp.svc.runtime.store.resolve(key)[2])
    except BundleError as e:
        raise from_library(e) from None
    return (manifest.get("calibration") or {}).get("knn_threshold") is not None


async def model_metadata(dp: DataPlane, name: str, version: str = "") -> dict:
    """Name, versions, platform and tensor signatures of one adapter (or `base`); shapes have the
    batch dimension first (-1). `pixels` is declared as the model input (FP32 [N, 3, S, S])."""
    ref = model_ref(name, version)
    info = await dp.model_info(ref)
    s = input_size(dp)
    outputs = [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, info.classes]},
        {"name": "embedding", "datatype": "FP32", "shape": [-1, info.dim]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]
    if await calibrated(dp, ref):
        outputs.append({"name": "unknown", "datatype": "BOOL", "shape": [-1]})
    return {
        "name": info.name,
        "versions": info.versions,
        "platform": f"metalora_{info.backend}",
        "inputs": [
            {"name": "image", "datatype": INPUTS["image"], "shape": [-1, 1]},  # [N] is taken too; a tool sizing a request from this needs the per-image 1
            {"name": "pixels", "datatype": INPUTS["pixels"], "shape": [-1, 3, s, s]},
        ],
        "outputs": outputs,
    }


def model_config(dp: DataPlane, meta: dict) -> dict:
    """Triton's model configuration (the model-configuration extension; `model_config.proto` in JSON)
    for one model, from its metadata (`model_metadata`): batched, `max_batch_size` = the service's
    images per request, so each tensor's `dims` is its metadata shape without the leading batch -1.
    A per-item scalar (`image` [N, 1] or [N]; `label`, `unknown` [N]) is `dims [1]` with `reshape
    {shape: []}`, Triton's own spelling of one element per batch item.
    Both inputs are `optional`: a request sends one of them (Triton's convention for inputs that are
    alternatives; perf_analyzer then sends only the inputs its data names)."""

    def tensor(t: dict, optional: bool | None = None) -> dict:
        dims = t["shape"][1:]
        out = {"name": t["name"], "data_type": CONFIG_TYPES[t["datatype"]], "dims": dims or [1]}
        if dims in ([], [1]) and t["datatype"] in ("BYTES", "BOOL"):  # one element per image
            out["reshape"] = {"shape": []}
        if optional is not None:
            out["optional"] = optional
        return out

    return {
        "name": meta["name"],
        "platform": meta["platform"],
        "backend": "metalora",
        "max_batch_size": dp.settings.max_images,
        "input": [tensor(t, optional=True) for t in meta["inputs"]],
        "output": [tensor(t) for t in meta["outputs"]],
    }


# ------------------------------------------------------------------------ statistics extension
def _duration(d, ns: int | None = None) -> dict:
    return {"count": d.count, "ns": d.ns if ns is None else ns}


def model_statistics(dp: DataPlane, name: str = "", version: str = "") -> dict:
    """Triton's statistics extension (`GET /v2/models[/{m}[/versions/{v}]]/stats`, gRPC
    `ModelStatistics`): per model version, since the server started, from the data plane's
    counters. No name: every version that has answered or is loaded (`base` included); a name
    without a version: the version it resolves to (the latest). `success` / `fail` time whole
    requests (decode, queue, compute); `queue` and `compute_infer` count images (each one's wait in
    the batcher, its share of its batch's forward); `compute_input` and `compute_output` are not
    measured apart: `compute_infer`'s count with 0 ns (Triton's three compute counts are equal, and
    perf_analyzer refuses statistics where they are not); `batch_stats` is empty."""
    if not name and version:
        raise bad("invalid_request", "a model version needs a model name")
    rows = dp.model_statistics(model_ref(name, version) if name else None)
    return {
        "model_stats": [
            {
                "name": n,
                "version": v,
                "last_inference": st.last_inference_ms,
                "inference_count": st.inference_count,
                "execution_count": st.execution_count,
                "inference_stats": {
                    "success": _duration(st.success),
                    "fail": _duration(st.fail),
                    "queue": _duration(st.queue),
                    "compute_input": _duration(st.compute_infer, ns=0),
                    "compute_infer": _duration(st.compute_infer),
                    "compute_output": _duration(st.compute_infer, ns=0),
                },
                "batch_stats": [],
            }
            for n, v, st in rows
        ]
    }


# ------------------------------------------------------------------------ infer
def _images(dp: DataPlane, req: InferRequest) -> list:
    """The request's one input -> raw images: files (bytes, or base64 str from JSON), (H, W, 3)
    uint8 RGB arrays, or (3, S, S) float32 model inputs."""
    if len(req.inputs) != 1:
        raise bad("invalid_input", f"send exactly one input, {INPUT_HELP}; got {[t.name for t in req.inputs]}")
    (t,) = req.inputs
    if t.name not in INPUTS:
        raise bad("invalid_input", f"unknown input {t.name!r}; the inputs are {INPUT_HELP}")
    if t.datatype not in ACCEPTED[t.name]:
        raise bad("invalid_datatype", f"input {t.name!r} must be {' or '.join(ACCEPTED[t.name])}, not {t.datatype}")
    if t.name == "image":
        if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
            raise bad("invalid_shape", f"input 'image' has shape [N] (or [N, 1]), got {list(t.shape)}")
        # bytes (binary data, gRPC) are the file itself; str (JSON text) is base64 or a data: URL, as in /v1 JSON
        items = list(t.data.reshape(-1))
    elif t.datatype == "FP32":
        s = input_size(dp)
        if len(t.shape) != 4 or tuple(t.shape[1:]) != (3, s, s):
            raise bad("invalid_shape", f"input 'pixels' FP32 is the model input, shape [N, 3, {s}, {s}], got {list(t.shape)}")
        if not np.isfinite(t.data).all():
            raise bad("invalid_data", "input 'pixels' holds NaN or infinite values")
        items = list(np.ascontiguousarray(t.data, dtype=np.float32))  # (3, S, S) each: used as they are, no decode, no preprocessing
    else:
        if len(t.shape) != 4 or t.shape[3] != 3:
            raise bad("invalid_shape", f"input 'pixels' UINT8 has shape [N, H, W, 3] (RGB), got {list(t.shape)}")
        if t.shape[1] == 0 or t.shape[2] == 0:
            raise bad("invalid_shape", "input 'pixels' has an empty image")
        items = list(np.ascontiguousarray(t.data))
    if not items:
        raise bad("invalid_shape", f"input {t.name!r} holds no images")
    return items


def _outputs(dp: DataPlane, req: InferRequest) -> list[RequestedOutput] | None:
    """The requested outputs, checked; None: the defaults."""
    if req.outputs is None:
        return None
    seen = set()
    for o in req.outputs:
        if o.name not in OUTPUTS:
            raise bad("invalid_output", f"unknown output {o.name!r}; the outputs are {', '.join(OUTPUTS)}")
        if o.name in seen:
            raise bad("invalid_output", f"output {o.name!r} is asked for twice")
        seen.add(o.name)
        if o.classification and o.name != "probabilities":
            raise bad("invalid_parameter", f"classification applies to 'probabilities', not {o.name!r}")
        dp.check_top_k(o.classification, "classification", "invalid_parameter")
        _ = o.binary  # a binary_data that is not a bool fails here, before any work
    return list(req.outputs)


def prepare(dp: DataPlane, req: InferRequest) -> tuple[AdapterRef, list, list[RequestedOutput] | None]:
    """Everything checkable before any decoding: the model exists, the input and outputs are valid."""
    ref = model_ref(req.model_name, req.model_version)
    dp.resolve(ref)  # an unknown model fails fast, before any image is decoded
    outs = _outputs(dp, req)
    items = _images(dp, req)
    dp.check_images(items)
    return ref, items, outs


async def infer(dp: DataPlane, req: InferRequest, deadline) -> InferResponse:
    """Run one protocol request through the data plane, within `deadline`."""
    ref, items, outs = prepare(dp, req)
    scored = await dp.infer([ref], items, deadline)
    s0 = scored[0]
    calibrated = s0.entry.knn_threshold is not None and s0.entry.key != BASE
    if outs is None:
        outs = [RequestedOutput(n) for n in (*DEFAULT_OUTPUTS, *(["unknown"] if calibrated else []))]
    return InferResponse(s0.adapter, s0.version, req.id, [_tensor(o, scored) for o in outs])


def _tensor(o: RequestedOutput, scored: list[Scored]) -> Tensor:
    if o.name == "embedding":
        emb = np.stack([s.embedding.numpy() for s in scored]).astype(np.float32)  # (N, D)
        return Tensor("embedding", "FP32", emb.shape, emb)
    if o.name == "unknown":
        data = np.array([bool(s.unknown) for s in scored], dtype=np.bool_)  # (N,)
        return Tensor("unknown", "BOOL", data.shape, data)
    probs = np.stack([s.probabilities.numpy() for s in scored]).astype(np.float32)  # (N, C)
    labels = scored[0].labels
    if o.name == "label":
        data = np.empty(len(probs), dtype=object)
        data[:] = [labels[i].encode() for i in probs.argmax(1)]
        return Tensor("label", "BYTES", data.shape, data)
    if k := o.classification:
        data = classify(probs, k, labels)
        return Tensor("probabilities", "BYTES", data.shape, data)
    return Tensor("probabilities", "FP32", probs.shape, probs)


# ------------------------------------------------------------------------ repository extension
def repository_index(dp: DataPlane, ready_only: bool = False) -> list[dict]:
    """Every model version in the store (and `base`), READY when on the device, else UNAVAILABLE."""
    return [{"name": r.name, "version": r.version, "state": "READY" if r.loaded else "UNAVAILABLE", "reason": r.reason} for r in dp.repository_index(ready_only)]


async def load(dp: DataPlane, name: str, parameters) -> None:
    """Load (latest unless `name@version`) onto the device; a refused bundle is CONFLICT. Takes no
    parameters but Triton's `unload_dependents` (no config or file overrides)."""
    if set(parameters) - {"unload_dependents"}:
        raise bad("invalid_parameter", f"load takes no parameters here (no config or file overrides); got {sorted(parameters)}")
    await dp.load(_repository_ref(name))


def unload(dp: DataPlane, name: str) -> list[str]:
    """Unload `name@version`, or every loaded version of `name` (the repository's unload is idempotent)."""
    return dp.unload_all(_repository_ref(name))


def _repository_ref(name: str) -> AdapterRef:
    """The repository extension names a model `name` or `name@version` in one string."""
    try:
        return AdapterRef.parse(name)
    except RefError as e:
        raise from_library(e) from None
