"""What an Open Inference Protocol request does, on the one `Service` core (STYLE.md item 13).

REST (`rest.py`) and gRPC (`grpc_server.py`) only translate wire formats into calls here; both
reach the same decoder pool, micro-batcher and adapter registry as `/v1`, so a `/v1` request and
a gRPC request for different adapters can share one engine batch.

The mapping onto the protocol:

* a **model is an adapter** (`base` = the frozen backbone with its ImageNet head), and a **model
  version is a bundle version** (`base` has none);
* inputs (exactly one): `image` BYTES [N] (or [N, 1]), each element an encoded image file, decoded
  by the same code as `/v1` (in JSON a base64 string or data: URL, as `/v1` JSON takes); or
  `pixels` UINT8 [N, H, W, 3], RGB already decoded, which runs through the same preprocessing;
* outputs (all by default): `probabilities` FP32 [N, C] (softmax of the logits, as `/v1/predict`
  scores), `embedding` FP32 [N, D] (L2-normalised, as `/v1/embed`), `label` BYTES [N] (top-1);
  the classification extension applies to `probabilities`.

Limits are the service's: `max_images` per request (413), `max_pixels` per image (413), and
`max_aspect_ratio` (`extreme_aspect_ratio`; 400 on /v2, INVALID_ARGUMENT on gRPC), for `pixels`
as for files; the body
size limit is the HTTP middleware's and the gRPC server's maximum message size.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import numpy as np

from metalora.bundle import BundleError, read_manifest
from metalora.runtime import BASE

from ..errors import ServiceError
from .codec import InferRequest, InferResponse, RequestedOutput, Tensor, bad, classify

SERVER_NAME = "metalora-serve"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository"]
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32"}  # protocol datatype -> Triton's config name
INPUTS = {"image": "BYTES", "pixels": "UINT8"}
OUTPUTS = ("probabilities", "embedding", "label")


def server_version() -> str:
    try:
        return package_version("metalora-serve")
    except PackageNotFoundError:
        return "0"


def model_ref(name: str, version: str = "") -> str:
    """Protocol (model, version) -> the registry's `name` / `name@version`."""
    if not name:
        raise bad("invalid_request", "the model name is empty")
    if version:
        if name == BASE:
            raise ServiceError(404, "unknown_version", "'base' (the frozen backbone) has no versions; leave the version empty")
        return f"{name}@{version}"
    return name


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}


def model_ready(svc, name: str, version: str = "") -> bool:
    """Whether the model (version) is on the device now; unknown models raise 404."""
    key = svc.registry.resolve(model_ref(name, version))
    return svc.ready and (key == BASE or key in svc.registry.entries)


async def model_metadata(svc, name: str, version: str = "") -> dict:
    """Name, versions, platform and tensor signatures of one adapter (or `base`)."""
    key = svc.registry.resolve(model_ref(name, version))
    store = svc.runtime.store
    if key == BASE:
        versions, classes = [], len(svc.runtime.base_labels)
    else:
        entry = svc.registry.entries.get(key)
        if entry is not None:
            classes = len(entry.labels)
        else:
            try:
                manifest = await asyncio.to_thread(read_manifest, store.resolve(key)[2])
            except BundleError as e:
                raise ServiceError.from_bundle(e) from None
            classes = len(manifest["adapter"].get("labels", []))
        versions = store.versions(key.split("@", 1)[0])
    dim = svc.runtime.backbone.embed_dim
    return {
        "name": key.split("@", 1)[0],
        "versions": versions,
        "platform": f"metalora_{svc.backend_name}",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "embedding", "datatype": "FP32", "shape": [-1, dim]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }


def model_config(svc, meta: dict) -> dict:
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
        "max_batch_size": svc.settings.max_images,
        "input": [tensor(t) for t in meta["inputs"]],
        "output": [tensor(t) for t in meta["outputs"]],
    }


# ------------------------------------------------------------------------ infer
def _images(svc, req: InferRequest) -> tuple[str, list]:
    """The request's one input -> ('image', raw files) or ('pixels', (H, W, 3) uint8 arrays)."""
    if len(req.inputs) != 1:
        raise bad("invalid_input", f"send exactly one input, 'image' (BYTES [N]) or 'pixels' (UINT8 [N, H, W, 3]); got {[t.name for t in req.inputs]}")
    (t,) = req.inputs
    if t.name not in INPUTS:
        raise bad("invalid_input", f"unknown input {t.name!r}; the inputs are 'image' (BYTES [N]) and 'pixels' (UINT8 [N, H, W, 3])")
    if t.datatype != INPUTS[t.name]:
        raise bad("invalid_datatype", f"input {t.name!r} must be {INPUTS[t.name]}, not {t.datatype}")
    s = svc.settings
    if t.name == "image":
        if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
            raise bad("invalid_shape", f"input 'image' has shape [N] (or [N, 1]), got {list(t.shape)}")
        # bytes (binary data, gRPC) are the file itself; str (JSON text) is base64 or a data: URL,
        # as in /v1 JSON: `Service.decode` tells them apart.
        items = list(t.data.reshape(-1))
    else:
        if len(t.shape) != 4 or t.shape[3] != 3:
            raise bad("invalid_shape", f"input 'pixels' has shape [N, H, W, 3] (RGB), got {list(t.shape)}")
        _, h, w, _ = t.shape
        if h == 0 or w == 0:
            raise bad("invalid_shape", "input 'pixels' has an empty image")
        if h * w > s.max_pixels:
            raise ServiceError(413, "image_too_large", f"pixels images are {w}x{h}, the limit is {s.max_pixels} pixels")
        if max(w, h) > s.max_aspect_ratio * min(w, h):  # the rule and wording of metalora.images for files
            raise ServiceError(422, "extreme_aspect_ratio", f"pixels images are {w}x{h}; the long side may be at most {s.max_aspect_ratio:g} times the short side")
        items = list(np.ascontiguousarray(t.data))
    if not items:
        raise bad("invalid_shape", f"input {t.name!r} holds no images")
    if len(items) > s.max_images:
        raise ServiceError(413, "too_many_images", f"{len(items)} images in one request; the limit is {s.max_images}")
    return t.name, items


def _outputs(req: InferRequest, max_top_k: int) -> list[RequestedOutput]:
    outs = req.outputs if req.outputs is not None else [RequestedOutput(n) for n in OUTPUTS]
    seen = set()
    for o in outs:
        if o.name not in OUTPUTS:
            raise bad("invalid_output", f"unknown output {o.name!r}; the outputs are {', '.join(OUTPUTS)}")
        if o.name in seen:
            raise bad("invalid_output", f"output {o.name!r} is asked for twice")
        seen.add(o.name)
        if o.classification and o.name != "probabilities":
            raise bad("invalid_parameter", f"classification applies to 'probabilities', not {o.name!r}")
        if o.classification > max_top_k:
            raise bad("invalid_parameter", f"classification is at most {max_top_k}")
        _ = o.binary  # a binary_data that is not a bool fails here, before any work
    return outs


def prepare(svc, req: InferRequest) -> tuple[str, list]:
    """Everything checkable before any decoding: the model exists, the input and outputs are valid.
    Returns the model ref and the raw images (files or pixel arrays)."""
    ref = model_ref(req.model_name, req.model_version)
    svc.registry.resolve(ref)  # an unknown model fails fast, before any image is decoded
    _outputs(req, svc.settings.max_top_k)
    _, items = _images(svc, req)
    return ref, items


async def infer(svc, req: InferRequest, watch) -> InferResponse:
    """Run one protocol request through the service's decoder pool and micro-batcher, within
    `watch`'s deadline (`service.inputs.Watch`: 504 past it, 499 when an HTTP client hangs up)."""
    ref, items = prepare(svc, req)
    xs = await svc.decode(items, watch)
    entries, results = await svc.compute(xs, [ref], watch)
    (entry,) = entries
    labels = svc.labels(entry)
    outs = _outputs(req, svc.settings.max_top_k)
    probs = None
    tensors = []
    for o in outs:
        if o.name == "embedding":
            emb = np.stack([r.embedding.numpy() for r in results]).astype(np.float32)  # (N, D)
            tensors.append(Tensor("embedding", "FP32", emb.shape, emb))
            continue
        if probs is None:
            # the bundle's calibrated temperature, as /v1/predict (1 without one)
            probs = np.stack([(r.logits / entry.temperature).softmax(-1).numpy() for r in results]).astype(np.float32)  # (N, C)
        if o.name == "label":
            top = probs.argmax(1)
            data = np.empty(len(top), dtype=object)
            data[:] = [labels[i].encode() for i in top]
            tensors.append(Tensor("label", "BYTES", data.shape, data))
        elif k := o.classification:
            data = classify(probs, k, labels)
            tensors.append(Tensor("probabilities", "BYTES", data.shape, data))
        else:
            tensors.append(Tensor("probabilities", "FP32", probs.shape, probs))
    return InferResponse(entry.name, entry.version, req.id, tensors)


# ------------------------------------------------------------------------ repository extension
def repository_index(svc, ready_only: bool = False) -> list[dict]:
    """Every model version in the store (and `base`), READY when on the device, else UNAVAILABLE."""
    rows = [{"name": BASE, "version": "", "state": "READY" if svc.ready else "UNAVAILABLE", "reason": ""}]
    store = svc.runtime.store
    for name in store.adapter_names():
        for v in store.versions(name):
            key = f"{name}@{v}"
            loaded = key in svc.registry.entries
            rows.append({"name": name, "version": v, "state": "READY" if loaded else "UNAVAILABLE", "reason": svc.public(svc.registry.failed.get(key, "" if loaded else "unloaded"))})
    return [r for r in rows if r["state"] == "READY"] if ready_only else rows


async def load(svc, name: str) -> None:
    """Load (latest unless `name@version`) onto the device; a refused bundle is 409."""
    await svc.registry.load(name)


def unload(svc, name: str) -> list[str]:
    """Unload `name@version`, or every loaded version of `name`; busy ones go when their last image
    is done. A known model with nothing loaded is a no-op (the protocol's unload is idempotent)."""
    key = svc.registry.resolve(name)
    if key == BASE:
        raise bad("cannot_unload_base", "the frozen backbone ('base') is always loaded")
    keys = [key] if "@" in name else [k for k in svc.registry.loaded() if k.split("@", 1)[0] == key.split("@", 1)[0]]
    for k in keys:
        if k in svc.registry.entries:
            svc.registry.unload(k)
    return keys
