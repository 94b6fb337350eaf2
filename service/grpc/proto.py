"""The gRPC service definition, compiled from the shipped `grpc_predict_v2.proto` when first used.

Why at run time, in memory, into a private descriptor pool:

* no generated code in the repository and no build step, so a clean clone on `PYTHONPATH`,
  an editable install and the wheel all behave the same, and an edit to the .proto takes effect
  at the next start (nothing stale to regenerate);
* nothing is written next to the package, so it works on a read-only root filesystem (the
  Kubernetes manifests set one); protoc's descriptor set goes through a temporary directory that
  is removed at once;
* a private `DescriptorPool` instead of protobuf's global one: `tritonclient.grpc` registers its
  own `inference.*` messages globally, and two files defining the same names in one pool refuse
  to load, so a process that holds both (a test, a gateway) would break.

`grpc_tools.protoc` (grpcio-tools, a runtime dependency) does the parsing; it takes ~30 ms once.
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path
from types import SimpleNamespace

PROTO = Path(__file__).with_name("grpc_predict_v2.proto")
SERVICE = "inference.GRPCInferenceService"


@cache
def file_descriptor_proto():
    """The compiled .proto as a `FileDescriptorProto` (protoc via grpcio-tools)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(prefix="metalora-proto-") as tmp:
        out = Path(tmp) / "oip.pb"
        rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={out}", PROTO.name])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {PROTO}")
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (fdp,) = fds.file
    return fdp


@cache
def messages() -> SimpleNamespace:
    """Every top-level message class of the protocol by its short name (`pb.ModelInferRequest`),
    built in a private descriptor pool; nested types hang off their parents as usual."""
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_descriptor_proto())
    fd = pool.FindFileByName(PROTO.name)
    classes = {name: message_factory.GetMessageClass(d) for name, d in fd.message_types_by_name.items()}
    ns = SimpleNamespace(**classes)
    ns.DESCRIPTOR = fd
    return ns


def methods() -> dict[str, tuple[type, type]]:
    """RPC name -> (request class, response class), read from the service in the .proto."""
    pb = messages()
    service = pb.DESCRIPTOR.services_by_name[SERVICE.rsplit(".", 1)[1]]
    return {m.name: (getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)) for m in service.methods}
