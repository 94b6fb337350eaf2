"""The Open Inference Protocol codec against the real `tritonclient` as the reference: requests that
tritonclient builds parse to the tensors it was given, responses we encode read back through
tritonclient's own result parsers, and our .proto is wire-compatible with its compiled one."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient")
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import _utils as grpc_utils
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from service.errors import DomainError
from service.http import body as http_body
from service.oip.status import status as v2_status
from service.oip import codec
from service.grpc import proto
from service.oip.codec import InferRequest, InferResponse, RequestedOutput, Tensor

RNG = np.random.default_rng(0)


def _bytes_tensor(n: int) -> np.ndarray:
    a = np.empty(n, dtype=object)
    a[:] = [RNG.integers(0, 256, RNG.integers(0, 40)).astype(np.uint8).tobytes() for _ in range(n)]
    return a


# (name, datatype, array) inputs as a client sends them
TENSORS = [
    ("image", "BYTES", _bytes_tensor(5)),
    ("pixels", "UINT8", RNG.integers(0, 256, (2, 3, 4, 3)).astype(np.uint8)),
    ("x", "FP32", RNG.standard_normal((3, 7)).astype(np.float32)),
    ("i", "INT64", RNG.integers(-(2**40), 2**40, (4,)).astype(np.int64)),
    ("b", "BOOL", np.array([[True, False], [False, True]])),
]


# ------------------------------------------------------------------------ BYTES elements
@pytest.mark.parametrize("n", [0, 1, 7])
def test_bytes_serialization_matches_tritonclient(n):
    a = _bytes_tensor(n)
    ref = serialize_byte_tensor(a)
    ref = ref.item() if ref.size else b""
    assert codec.serialize_bytes(a) == ref
    back = codec.deserialize_bytes(ref, n)
    assert list(back) == list(deserialize_bytes_tensor(ref)) if n else back.size == 0


@pytest.mark.parametrize(
    "buf, count",
    [
        (struct.pack("<I", 5) + b"abc", 1),  # element shorter than its length says
        (struct.pack("<I", 1) + b"a" + b"zz", 1),  # bytes left over
        (b"\x01\x00", 1),  # length prefix cut short
        (struct.pack("<I", 1) + b"a", 2),  # fewer elements than the shape says
    ],
)
def test_malformed_bytes_are_400(buf, count):
    with pytest.raises(DomainError) as e:
        codec.deserialize_bytes(buf, count, "image")
    assert (v2_status(e.value), e.value.code) == (400, "invalid_binary_data")


# ------------------------------------------------------------------------ REST requests
def _http_inputs(binary: bool):
    inputs = []
    for name, dt, arr in TENSORS:
        if dt == "BYTES" and not binary:
            arr = np.array([f"text-{i}" for i in range(3)], dtype=object)  # JSON BYTES must be UTF-8 text
        inp = httpclient.InferInput(name, list(arr.shape), dt)
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append((inp, arr))
    return inputs


@pytest.mark.parametrize("binary", [True, False])
def test_rest_request_built_by_tritonclient_parses_to_its_tensors(binary):
    pairs = _http_inputs(binary)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=False, class_count=3), httpclient.InferRequestedOutput("embedding")]
    body, json_size = httpclient.InferenceServerClient.generate_request_body([p[0] for p in pairs], outputs=outputs, request_id="r1")
    assert (json_size is not None) == binary
    req = codec.parse_rest("m", "2", body, None if json_size is None else str(json_size))
    assert (req.model_name, req.model_version, req.id) == ("m", "2", "r1")
    for t, (_, want) in zip(req.inputs, pairs):
        assert t.shape == want.shape
        if t.datatype == "BYTES":
            # binary BYTES are the raw bytes; JSON BYTES stay text, as the client wrote them
            assert list(t.data.reshape(-1)) == list(want.reshape(-1))
        else:
            np.testing.assert_array_equal(t.data, want)
            assert t.data.dtype == want.dtype
    probs, emb = req.outputs
    assert (probs.classification, probs.binary, emb.classification, emb.binary) == (3, False, 0, True)


def test_rest_nested_json_data_is_row_major():
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [[[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]]]}]}).encode()
    (t,) = codec.parse_rest("m", "", body, None).inputs
    np.testing.assert_array_equal(t.data.reshape(-1), np.arange(1, 13))
    assert t.data.shape == (1, 2, 2, 3)


def _doc(**inp):
    return json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3], **inp}]}).encode()


@pytest.mark.parametrize(
    "body, header, code",
    [
        (b"{not json", None, "invalid_json"),
        (b"[]", None, "invalid_request"),
        (b'{"inputs": []}', None, "invalid_request"),
        (_doc(data=[1, 2]), None, "shape_mismatch"),
        (_doc(data=[1, 2, 256]), None, "invalid_data"),
        (_doc(data=[1, 2, 3.5]), None, "invalid_data"),
        (_doc(data=[1, 2, 3], shape=[1, -1, 1, 3]), None, "invalid_shape"),
        (_doc(datatype="FP8", data=[1, 2, 3]), None, "invalid_datatype"),
        (_doc(), None, "invalid_request"),
        (_doc(parameters={"binary_data_size": 3}) + b"\x01\x02\x03", "abc", "invalid_header_length"),
        (_doc(parameters={"binary_data_size": 3}) + b"\x01\x02\x03", "99999", "invalid_header_length"),
        (_doc(parameters={"binary_data_size": 4}) + b"\x01\x02\x03", "len", "invalid_binary_data"),
        (_doc(parameters={"binary_data_size": 2}) + b"\x01\x02", "len", "invalid_binary_data"),
        (_doc(parameters={"binary_data_size": 3}) + b"\x01\x02\x03\x04", "len", "invalid_binary_data"),
        (_doc(parameters={"binary_data_size": 3}, data=[1, 2, 3]) + b"\x01\x02\x03", "len", "invalid_request"),
        (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [5]}]}).encode(), None, "invalid_data"),
    ],
)
def test_malformed_rest_requests_are_400(body, header, code):
    if header == "len":
        header = str(body.index(b"}]}") + 3)
    with pytest.raises(DomainError) as e:
        codec.parse_rest("m", "", body, header)
    assert (v2_status(e.value), e.value.code) == (400, code)


# ------------------------------------------------------------------------ REST responses
def _response() -> InferResponse:
    probs = RNG.random((2, 5)).astype(np.float32)
    labels = np.array([b"cat", "d\u00f6g".encode()], dtype=object)
    return InferResponse("m", "3", "r9", [Tensor("probabilities", "FP32", probs.shape, probs), Tensor("label", "BYTES", labels.shape, labels)])


@pytest.mark.parametrize("binary_output, per_output", [(False, None), (True, None), (False, True), (True, False)])
def test_rest_response_reads_back_through_tritonclient(binary_output, per_output):
    resp = _response()
    outs = None if per_output is None else [RequestedOutput("probabilities", {"binary_data": per_output}), RequestedOutput("label")]
    req = InferRequest("m", outputs=outs, parameters={"binary_data_output": binary_output})
    body, header = codec.encode_rest(resp, req)
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=header)
    got = result.get_response()
    assert (got["model_name"], got["model_version"], got["id"]) == ("m", "3", "r9")
    np.testing.assert_array_equal(result.as_numpy("probabilities"), resp.outputs[0].data)
    assert [x if isinstance(x, bytes) else x.encode() for x in result.as_numpy("label")] == list(resp.outputs[1].data)
    prob_binary = per_output if per_output is not None else binary_output
    assert ("binary_data_size" in result.get_output("probabilities").get("parameters", {})) == prob_binary
    assert (header is not None) == (prob_binary or binary_output)


# ------------------------------------------------------------------------ classification
def test_classification_strings_are_top_k_in_order_and_round_trip():
    probs = np.array([[0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=np.float32)
    out = codec.classify(probs, 2, ["a", "b", "c"])
    assert out.shape == (2, 2)
    assert [s.decode().split(":")[1:] for s in out[0]] == [["1", "b"], ["2", "c"]]
    assert [s.decode().split(":")[1:] for s in out[1]] == [["2", "c"], ["0", "a"]]  # ties: lower index first
    for i, row in enumerate(out):
        for s in row:
            value, idx, _ = s.decode().split(":", 2)
            assert np.float32(value) == probs[i, int(idx)]  # exact after the round trip
    assert codec.classify(probs, 10, ["a", "b", "c"]).shape == (2, 3)  # k is capped at C


# ------------------------------------------------------------------------ gRPC
def test_our_proto_is_wire_compatible_with_tritonclient():
    """Every field we declare has the same number and type in Triton's compiled protos (grpc_service.proto,
    and model_config.proto for the configuration's messages), and every enum value the same number."""
    ours = proto.messages().DESCRIPTOR
    theirs = triton_pb2.DESCRIPTOR

    def check(a, b):
        for f in a.fields:
            g = b.fields_by_name.get(f.name)
            assert g is not None, f"{a.full_name}.{f.name} missing in tritonclient"
            assert (f.number, f.type, f.is_repeated) == (g.number, g.type, g.is_repeated), f"{a.full_name}.{f.name}"
            if f.message_type is not None or f.enum_type is not None:  # the same type by name (inference.ModelConfig, ...)
                assert (f.message_type or f.enum_type).full_name == (g.message_type or g.enum_type).full_name, f"{a.full_name}.{f.name}"
        for n in a.nested_types:
            check(n, b.nested_types_by_name[n.name])

    for name, d in ours.message_types_by_name.items():
        check(d, theirs.message_types_by_name.get(name) or triton_config_pb2.DESCRIPTOR.message_types_by_name[name])
    for name, e in ours.enum_types_by_name.items():
        t = triton_config_pb2.DESCRIPTOR.enum_types_by_name[name]
        assert {v.name: v.number for v in e.values} == {v.name: v.number for v in t.values}, name
    svc_ours, svc_theirs = ours.services_by_name["GRPCInferenceService"], theirs.services_by_name["GRPCInferenceService"]
    for m in svc_ours.methods:
        t = svc_theirs.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (t.input_type.full_name, t.output_type.full_name)


def _grpc_request(raw: bool):
    inputs = []
    for name, dt, arr in TENSORS:
        inp = grpcclient.InferInput(name, list(arr.shape), dt)
        inp.set_data_from_numpy(arr)
        if not raw:  # the typed `contents` fields instead of raw_input_contents
            inp._raw_content = None
            fld = codec.CONTENTS_FIELD[dt]
            getattr(inp._input.contents, fld).extend(arr.reshape(-1).tolist())
        inputs.append(inp)
    outputs = [grpcclient.InferRequestedOutput("probabilities", class_count=4)]
    msg = grpc_utils._get_inference_request("m", inputs, "1", "id7", outputs, 0, False, False, 0, None, None)
    return proto.messages().ModelInferRequest.FromString(msg.SerializeToString())


@pytest.mark.parametrize("raw", [True, False])
def test_grpc_request_from_tritonclient_parses_to_its_tensors(raw):
    req = codec.parse_grpc(_grpc_request(raw))
    assert (req.model_name, req.model_version, req.id) == ("m", "1", "id7")
    for t, (name, dt, want) in zip(req.inputs, TENSORS):
        assert (t.name, t.datatype, t.shape) == (name, dt, want.shape)
        if dt == "BYTES":
            assert list(t.data.reshape(-1)) == list(want)
        else:
            np.testing.assert_array_equal(t.data, want)
    assert req.outputs[0].classification == 4


def test_grpc_response_reads_back_through_tritonclient():
    resp = _response()
    msg = codec.encode_grpc(resp, proto.messages())
    result = grpcclient.InferResult(triton_pb2.ModelInferResponse.FromString(msg.SerializeToString()))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), resp.outputs[0].data)
    assert list(result.as_numpy("label")) == list(resp.outputs[1].data)
    assert result.get_response().id == "r9"


def test_grpc_uint8_contents_out_of_range_is_400():
    pb = proto.messages()
    msg = pb.ModelInferRequest(model_name="m")
    t = msg.inputs.add(name="pixels", datatype="UINT8", shape=[1, 1, 1, 3])
    t.contents.uint_contents.extend([1, 2, 300])
    with pytest.raises(DomainError) as e:
        codec.parse_grpc(msg)
    assert (v2_status(e.value), e.value.code) == (400, "invalid_data")


# ------------------------------------------------------------------------ Content-Encoding (request compression)
def _raw_deflate(b: bytes) -> bytes:
    import zlib

    c = zlib.compressobj(wbits=-15)  # RFC 1951 without the zlib header, as some clients send "deflate"
    return c.compress(b) + c.flush()


PLAIN = json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a" * 3000]}]}).encode()


@pytest.mark.parametrize(
    "encoding, compress",
    [
        ("gzip", lambda b: __import__("gzip").compress(b)),  # what tritonclient sends for "gzip"
        ("deflate", lambda b: __import__("zlib").compress(b)),  # ... and for "deflate" (zlib format)
        ("Deflate", _raw_deflate),
        ("gzip", lambda b: __import__("gzip").compress(b[:100]) + __import__("gzip").compress(b[100:])),  # two members
        ("identity", lambda b: b),
        (None, lambda b: b),
    ],
)
def test_decompress_gives_back_what_the_standard_library_compressed(encoding, compress):
    body = compress(PLAIN)
    assert http_body.decompress(body, encoding, len(PLAIN)) == PLAIN


def test_decompress_holds_the_limit_on_the_decompressed_size():
    import gzip
    import zlib

    assert http_body.decompress(gzip.compress(PLAIN), "gzip", len(PLAIN)) == PLAIN  # exactly the limit: fine
    with pytest.raises(DomainError) as e:
        http_body.decompress(gzip.compress(PLAIN), "gzip", len(PLAIN) - 1)
    assert (v2_status(e.value), e.value.code) == (413, "body_too_large")
    bomb = zlib.compress(bytes(200_000_000), 9)  # ~200 kB that inflate to 200 MB
    assert len(bomb) < 300_000
    with pytest.raises(DomainError) as e:
        http_body.decompress(bomb, "deflate", 1_000_000)
    assert (v2_status(e.value), e.value.code) == (413, "body_too_large")


@pytest.mark.parametrize(
    "body, encoding, status, code",
    [
        (PLAIN, "gzip", 400, "invalid_compressed_body"),  # not gzip at all
        (__import__("gzip").compress(PLAIN)[:-10], "gzip", 400, "invalid_compressed_body"),  # truncated
        (__import__("zlib").compress(PLAIN) + b"junk", "deflate", 400, "invalid_compressed_body"),  # trailing bytes
        (__import__("gzip").compress(PLAIN) + b"junk", "gzip", 400, "invalid_compressed_body"),
        (PLAIN, "br", 415, "unsupported_content_encoding"),
        (PLAIN, "gzip, br", 415, "unsupported_content_encoding"),
    ],
)
def test_decompress_refuses_what_it_cannot_read(body, encoding, status, code):
    with pytest.raises(DomainError) as e:
        http_body.decompress(body, encoding, 10 * len(PLAIN))
    assert (v2_status(e.value), e.value.code) == (status, code)
