"""Open Inference Protocol wire formats <-> numpy tensors, for REST (JSON + binary) and gRPC.

Knows nothing of models: it turns a request body or a `ModelInferRequest` into an `InferRequest`
of numpy tensors, and an `InferResponse` back into bytes on the wire. What the tensors mean is
`dataplane.py`'s business.

Formats, from the protocol and its extensions (sources):

* tensor data is the flattened, row-major element list; JSON may also nest it by shape
  (KServe predict API v2, "Tensor Data");
* binary tensor data extension: the JSON header's byte length travels in the
  `Inference-Header-Content-Length` HTTP header, tensors follow it in input order, each input
  says its size in `parameters.binary_data_size`; an output is sent binary when the requested
  output says `binary_data: true`, or, when it says nothing, when the request parameters say
  `binary_data_output: true`; little-endian, no padding; a BYTES element is a 4-byte
  little-endian length and its bytes (Triton docs, protocol/extension_binary_data.md);
* request compression is HTTP's (`service/http/body.py`); `Inference-Header-Content-Length`
  counts the decompressed body;
* classification extension: `parameters.classification = k` on a requested output turns it into
  a BYTES [N, k] tensor of `"<value>:<index>:<label>"` strings, highest value first (Triton docs,
  protocol/extension_classification.md).

Every malformed request raises an INVALID `DomainError` with a stable code (a 400 on `/v2`,
INVALID_ARGUMENT on gRPC).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DomainError, invalid

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIMS = 8  # no tensor here has more than 4; a cap keeps a hostile shape from costing anything

# Protocol datatype -> numpy dtype (little-endian). BYTES elements are Python `bytes` in an object array.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
# gRPC InferTensorContents field per datatype (FP16 has none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def bad(code: str, message: str) -> DomainError:
    """A malformed protocol request."""
    return invalid(code, message)


# ------------------------------------------------------------------------ the neutral model
@dataclass
class Tensor:
    """One named tensor; `data` has shape `shape` (BYTES: an object array of `bytes`)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def classification(self) -> int:
        """Top-k classes asked for (0 = the raw tensor)."""
        k = self.parameters.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise bad("invalid_parameter", f"output {self.name!r}: classification must be a non-negative integer, got {k!r}")
        return k

    @property
    def binary(self) -> bool | None:
        b = self.parameters.get("binary_data")
        if b is not None and not isinstance(b, bool):
            raise bad("invalid_parameter", f"output {self.name!r}: binary_data must be true or false")
        return b


@dataclass
class InferRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[RequestedOutput] | None = None  # None: every output the model has
    parameters: dict[str, Any] = field(default_factory=dict)

    def binary_output(self, out: RequestedOutput | None) -> bool:
        """Whether an output goes back as binary data (REST only; gRPC is always raw)."""
        if out is not None and out.binary is not None:
            return out.binary
        return bool(self.parameters.get("binary_data_output", False))


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]


# ------------------------------------------------------------------------ shapes and elements
def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad("invalid_shape", f"input {name!r}: shape must be a list of at most {MAX_DIMS} non-negative integers, got {shape!r}")
    return tuple(int(d) for d in shape)


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def dtype_of(name: str, datatype: str) -> np.dtype:
    try:
        return DTYPES[datatype]
    except KeyError:
        raise bad("invalid_datatype", f"input {name!r}: unknown datatype {datatype!r}; one of {', '.join(DTYPES)}") from None


def serialize_bytes(arr: np.ndarray) -> bytes:
    """BYTES tensor -> its binary form: per element (row-major) a uint32 LE length, then the bytes."""
    parts = []
    for obj in arr.reshape(-1):
        b = obj if isinstance(obj, bytes) else str(obj).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes(buf: bytes | memoryview, count: int, name: str = "") -> np.ndarray:
    """The inverse of `serialize_bytes`: exactly `count` elements that use up the buffer exactly."""
    buf = memoryview(buf)
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(buf):
            raise bad("invalid_binary_data", f"input {name!r}: BYTES data ends inside element {i} of {count}")
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise bad("invalid_binary_data", f"input {name!r}: BYTES element {i} says {n} bytes, only {len(buf) - pos} left")
        out[i] = bytes(buf[pos : pos + n])
        pos += n
    if pos != len(buf):
        raise bad("invalid_binary_data", f"input {name!r}: {len(buf) - pos} bytes left after {count} BYTES elements")
    return out


def from_binary(name: str, datatype: str, shape: tuple[int, ...], buf: bytes | memoryview) -> np.ndarray:
    """Binary tensor data -> array of `shape`; the size must match the shape exactly (BYTES: `bytes` elements)."""
    dt = dtype_of(name, datatype)
    n = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(buf, n, name).reshape(shape)
    if len(buf) != n * dt.itemsize:
        raise bad("invalid_binary_data", f"input {name!r}: {len(buf)} bytes of binary data for shape {list(shape)} of {datatype} ({n * dt.itemsize} expected)")
    arr = np.frombuffer(buf, dtype=dt).reshape(shape)
    if datatype == "BOOL" and arr.size and np.frombuffer(buf, dtype=np.uint8).max() > 1:
        raise bad("invalid_binary_data", f"input {name!r}: BOOL bytes must be 0 or 1")
    return arr


def to_binary(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(arr)
    return np.ascontiguousarray(arr, dtype=DTYPES[datatype]).tobytes()


def _flatten(data: Any) -> list:
    """Nested JSON lists -> one flat list (row-major)."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(d, list) for d in data):
        return data
    out: list = []
    stack = [iter(data)]
    while stack:
        for d in stack[-1]:
            if isinstance(d, list):
                stack.append(iter(d))
                break
            out.append(d)
        else:
            stack.pop()
    return out


def from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """JSON `data` (flat or nested) -> array of `shape`. BYTES elements stay `str` (JSON text), so a
    reader can tell them from the raw `bytes` of binary data and gRPC."""
    dt = dtype_of(name, datatype)
    flat = _flatten(data)
    n = element_count(shape)
    if len(flat) != n:
        raise bad("shape_mismatch", f"input {name!r}: {len(flat)} elements of data for shape {list(shape)} ({n} expected)")
    if datatype == "BYTES":
        if not all(isinstance(s, str) for s in flat):
            raise bad("invalid_data", f"input {name!r}: BYTES data in JSON must be strings")
        out = np.empty(n, dtype=object)
        out[:] = flat
        return out.reshape(shape)
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise bad("invalid_data", f"input {name!r}: BOOL data must be true or false")
        return np.asarray(flat, dtype=dt).reshape(shape)
    if dt.kind in "iu":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            raise bad("invalid_data", f"input {name!r}: {datatype} data must be integers")
        info = np.iinfo(dt)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise bad("invalid_data", f"input {name!r}: {datatype} values must lie in [{info.min}, {info.max}]")
        return np.asarray(flat, dtype=dt).reshape(shape)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        raise bad("invalid_data", f"input {name!r}: {datatype} data must be numbers")
    return np.asarray(flat, dtype=dt).reshape(shape)


def to_json(arr: np.ndarray, datatype: str) -> list:
    """Array -> the flat JSON element list (BYTES as UTF-8 strings)."""
    if datatype == "BYTES":
        return [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in arr.reshape(-1)]
    return arr.reshape(-1).tolist()


def classify(values: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Classification extension: (N, C) scores -> BYTES (N, min(k, C)) of "value:index:label",
    highest value first, ties by lower index. `value` is printed as the shortest decimal that
    reads back as the same float32."""
    n, c = values.shape
    k = min(k, c)
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]  # (N, k)
    out = np.empty((n, k), dtype=object)
    for i in range(n):
        for j, idx in enumerate(order[i]):
            label = labels[idx] if idx < len(labels) else ""
            out[i, j] = f"{np.float32(values[i, idx])!s}:{int(idx)}:{label}".encode()
    return out


# ------------------------------------------------------------------------ parameters
def _params(obj: Any, where: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise bad("invalid_parameter", f"{where}: parameters must be an object")
    return obj


# ------------------------------------------------------------------------ REST
def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """Body -> (JSON header, binary tail) using `Inference-Header-Content-Length` (absent: all JSON)."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if n < 0 or n > len(body):
        raise bad("invalid_header_length", f"{HEADER_LENGTH} must be an integer between 0 and the body size ({len(body)}), got {header_length!r}")
    return body[:n], memoryview(body)[n:]


def parse_rest(model_name: str, model_version: str, body: bytes, header_length: str | None) -> InferRequest:
    """A REST infer body (JSON, optionally followed by binary tensors) -> `InferRequest`."""
    head, tail = split_body(body, header_length)
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad("invalid_json", f"the inference request is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise bad("invalid_request", "the inference request must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad("invalid_request", "the request needs a non-empty 'inputs' list")
    req = InferRequest(model_name, model_version, str(doc.get("id", "") or ""), parameters=_params(doc.get("parameters"), "request"))
    offset = 0
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("datatype"), str):
            raise bad("invalid_request", f"inputs[{i}] needs a 'name', a 'datatype' and a 'shape'")
        name, datatype = t["name"], t["datatype"]
        shape = check_shape(name, t.get("shape"))
        params = _params(t.get("parameters"), f"input {name!r}")
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in t:
                raise bad("invalid_request", f"input {name!r} has both 'data' and binary_data_size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(tail):
                raise bad("invalid_binary_data", f"input {name!r}: binary_data_size {size!r} does not fit the {len(tail) - offset} bytes of binary data left")
            data = from_binary(name, datatype, shape, tail[offset : offset + size])
            offset += size
        elif "data" in t:
            data = from_json(name, datatype, shape, t["data"])
        else:
            raise bad("invalid_request", f"input {name!r} has no 'data' and no binary_data_size")
        req.inputs.append(Tensor(name, datatype, shape, data, params))
    if offset != len(tail):
        raise bad("invalid_binary_data", f"{len(tail) - offset} bytes of binary data after the last binary input")
    outs = doc.get("outputs")
    if outs is not None:
        if not isinstance(outs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outs):
            raise bad("invalid_request", "'outputs' must be a list of objects with a 'name'")
        req.outputs = [RequestedOutput(o["name"], _params(o.get("parameters"), f"output {o['name']!r}")) for o in outs]
    return req


def encode_rest(resp: InferResponse, req: InferRequest) -> tuple[bytes, int | None]:
    """`InferResponse` -> (body, JSON header length or None when the body is all JSON)."""
    wanted = {o.name: o for o in req.outputs or []}
    outputs, blobs = [], []
    for t in resp.outputs:
        o: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        params = dict(t.parameters)
        if req.binary_output(wanted.get(t.name)):
            blob = to_binary(t.data, t.datatype)
            params["binary_data_size"] = len(blob)
            blobs.append(blob)
        else:
            o["data"] = to_json(t.data, t.datatype)
        if params:
            o["parameters"] = params
        outputs.append(o)
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id:
        doc["id"] = resp.id
    doc["outputs"] = outputs
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


# ------------------------------------------------------------------------ gRPC
def param_value(p) -> Any:
    """An `InferParameter` / `ModelRepositoryParameter` message -> its Python value."""
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def parse_grpc(msg) -> InferRequest:
    """A `ModelInferRequest` -> `InferRequest` (tensor contents or raw_input_contents)."""
    if not msg.inputs:
        raise bad("invalid_request", "the request needs at least one input")
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise bad("invalid_request", f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs")
    req = InferRequest(msg.model_name, msg.model_version, msg.id, parameters={k: param_value(v) for k, v in msg.parameters.items()})
    for i, t in enumerate(msg.inputs):
        shape = check_shape(t.name, list(t.shape))
        dtype_of(t.name, t.datatype)
        if raw:
            if t.HasField("contents"):
                raise bad("invalid_request", f"input {t.name!r} has contents and raw_input_contents")
            data = from_binary(t.name, t.datatype, shape, raw[i])
        else:
            fld = CONTENTS_FIELD.get(t.datatype)
            if fld is None:
                raise bad("invalid_request", f"input {t.name!r}: {t.datatype} must be sent as raw_input_contents")
            values = getattr(t.contents, fld)
            if len(values) != element_count(shape):
                raise bad("shape_mismatch", f"input {t.name!r}: {len(values)} elements for shape {list(shape)} ({element_count(shape)} expected)")
            if t.datatype == "BYTES":
                data = np.empty(len(values), dtype=object)
                data[:] = list(values)
                data = data.reshape(shape)
            else:
                dt = DTYPES[t.datatype]
                vals = np.asarray(values)
                if dt.kind in "iu" and vals.size:
                    info = np.iinfo(dt)
                    if vals.min() < info.min or vals.max() > info.max:
                        raise bad("invalid_data", f"input {t.name!r}: {t.datatype} values must lie in [{info.min}, {info.max}]")
                data = vals.astype(dt).reshape(shape)
        req.inputs.append(Tensor(t.name, t.datatype, shape, data, {k: param_value(v) for k, v in t.parameters.items()}))
    if msg.outputs:
        req.outputs = [RequestedOutput(o.name, {k: param_value(v) for k, v in o.parameters.items()}) for o in msg.outputs]
    return req


def set_param(p, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    else:
        p.string_param = str(value)


def encode_grpc(resp: InferResponse, pb):
    """`InferResponse` -> `ModelInferResponse`, every tensor as raw_output_contents (as Triton does)."""
    msg = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id)
    for t in resp.outputs:
        o = msg.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        for k, v in t.parameters.items():
            set_param(o.parameters[k], v)
        msg.raw_output_contents.append(to_binary(t.data, t.datatype))
    return msg
