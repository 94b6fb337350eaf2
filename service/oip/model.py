"""The Open Inference Protocol's model mapping, shared by its two doors (REST `/v2` in
service/http/v2.py and gRPC in service/grpc/server.py): protocol requests -> data-plane calls,
data-plane results -> protocol tensors. It imports no web framework.

The mapping onto the protocol:

* a **model is an adapter** (`base` = the frozen backbone with its ImageNet head), and a **model
  version is a bundle version** (`base` has none);
* inputs (exactly one): `image` BYTES [N] (or [N, 1]), each element an encoded image file, decoded
  by the same code as `/v1` (in JSON a base64 string or data: URL, as `/v1` JSON takes); or
  `pixels` UINT8 [N, H, W, 3], RGB already decoded, which runs through the same preprocessing;
* outputs (all by default): `probabilities` FP32 [N, C] (softmax of the logits over the bundle's
  calibrated temperature, as `/v1/predict` scores), `embedding` FP32 [N, D] (L2-normalised, as
  `/v1/embed`), `label` BYTES [N] (top-1), and, for bundles with a k-NN threshold, `unknown`
  BOOL [N] (as `/v1/predict`'s `unknown`; false where the gallery is empty or its store is down);
  the classification extension applies to `probabilities`.

Every limit is the data plane's (images per request, pixels and aspect ratio of `pixels` as of
files); the body size limit is the HTTP middleware's and the gRPC server's maximum message size.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import numpy as np

from metalora.refs import BASE, AdapterRef, RefError

from ..dataplane import DataPlane, Scored
from ..errors import from_library, not_found
from .codec import InferRequest, InferResponse, RequestedOutput, Tensor, bad, classify

SERVER_NAME = "metalora-serve"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository"]
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32", "BOOL": "TYPE_BOOL"}  # protocol datatype -> Triton's config name
INPUTS = {"image": "BYTES", "pixels": "UINT8"}
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


async def model_metadata(dp: DataPlane, name: str, version: str = "") -> dict:
    """Name, versions, platform and tensor signatures of one adapter (or `base`)."""
    ref = model_ref(name, version)
    info = await dp.model_info(ref)
    outputs = [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, info.classes]},
        {"name": "embedding", "datatype": "FP32", "shape": [-1, info.dim]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]
    return {
        "name": info.name,
        "versions": info.versions,
        "platform": f"metalora_{info.backend}",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        ],
        "outputs": outputs,
    }


def model_config(dp: DataPlane, meta: dict) -> dict:
    """Triton's model configuration (the model-configuration extension; `model_config.proto` in JSON)
    for one model, from its metadata (`model_metadata`): batched, `max_batch_size` = the service's
    images per request, so each tensor's `dims` is its metadata shape without the leading batch -1.
    A per-item scalar (`image`, `label`: shape [N]) is `dims [1]` with `reshape {shape: []}`, Triton's
    own spelling of a batched [N] tensor (the service takes `image` as [N] or [N, 1])."""

    def tensor(t: dict) -> dict:
        dims = t["shape"][1:]
        out = {"name": t["name"], "data_type": CONFIG_TYPES[t["datatype"]], "dims": dims or [1]}
        if not dims:
            out["reshape"] = {"shape": []}
        return out

    return {
        "name": meta["name"],
        "platform": meta["platform"],
        "backend": "metalora",
        "max_batch_size": dp.settings.max_images,
        "input": [tensor(t) for t in meta["inputs"]],
        "output": [tensor(t) for t in meta["outputs"]],
    }


# ------------------------------------------------------------------------ infer
def _images(req: InferRequest) -> list:
    """The request's one input -> raw images: files (bytes, or base64 str from JSON) or (H, W, 3) uint8 arrays."""
    if len(req.inputs) != 1:
        raise bad("invalid_input", f"send exactly one input, 'image' (BYTES [N]) or 'pixels' (UINT8 [N, H, W, 3]); got {[t.name for t in req.inputs]}")
    (t,) = req.inputs
    if t.name not in INPUTS:
        raise bad("invalid_input", f"unknown input {t.name!r}; the inputs are 'image' (BYTES [N]) and 'pixels' (UINT8 [N, H, W, 3])")
    if t.datatype != INPUTS[t.name]:
        raise bad("invalid_datatype", f"input {t.name!r} must be {INPUTS[t.name]}, not {t.datatype}")
    if t.name == "image":
        if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
            raise bad("invalid_shape", f"input 'image' has shape [N] (or [N, 1]), got {list(t.shape)}")
        # bytes (binary data, gRPC) are the file itself; str (JSON text) is base64 or a data: URL, as in /v1 JSON
        items = list(t.data.reshape(-1))
    else:
        if len(t.shape) != 4 or t.shape[3] != 3:
            raise bad("invalid_shape", f"input 'pixels' has shape [N, H, W, 3] (RGB), got {list(t.shape)}")
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
    items = _images(req)
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
