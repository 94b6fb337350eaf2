"""gRPC: the protocol's `inference.GRPCInferenceService` on its own port, over the same `Service`.

A `grpc.aio` server on the app's event loop, so it shares the decoder pool, micro-batcher and
adapter registry with HTTP (the data plane does the work, through the protocol's model mapping
`service.oip.model`; this file translates messages). The handlers are built from the service in
the shipped .proto (`proto.methods()`), not from generated stubs. It imports no web framework.

Errors: each domain error's kind maps to a gRPC code through `GRPC_CODES` (invalid, unsupported
and too-large input INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, a conflict
FAILED_PRECONDITION, UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED). An UNAVAILABLE error carries its
retry hint as trailing metadata: `retry-after` (seconds, as HTTP) and `grpc-retry-pushback-ms`
(what gRPC's own retry policy reads). The repository RPCs need `authorization: Bearer <token>`
metadata, as the HTTP admin routes do. `ModelConfig` and `ModelStatistics` answer in Triton's messages
(the shipped .proto carries the subset of model_config.proto and grpc_service.proto they need);
Triton's other RPCs (streaming, shared memory, trace, log settings) are grpcio's UNIMPLEMENTED.

Metrics: each call counts in `metalora_requests_total` with `endpoint` = the gRPC method path
(`/inference.GRPCInferenceService/ModelInfer`) and `code` = the HTTP status the same outcome
has on `/v2`, so one alert on `code=~"5.."` covers both front doors.
"""

from __future__ import annotations

import logging
import time

import grpc
from google.protobuf import json_format

from ..dataplane import DataPlane
from ..errors import LIBRARY_ERRORS, DomainError, Kind, from_library
from ..oip import codec
from ..oip import model as oip
from ..oip import status as oip_status
from . import proto

log = logging.getLogger("metalora.service")

GRPC_CODES = {
    Kind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.UNSUPPORTED: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Kind.CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Kind.CANCELLED: grpc.StatusCode.CANCELLED,
}
UNMETERED = {"ServerLive", "ServerReady"}  # probes would drown the request counts, as /healthz would


class Servicer:
    """One method per RPC of `inference.GRPCInferenceService`; each returns its response message."""

    def __init__(self, dp: DataPlane):
        self.dp = dp
        self.pb = proto.messages()

    def _ready(self) -> DataPlane:
        self.dp.check_ready()
        return self.dp

    def _admin(self, context) -> None:
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        self.dp.authorize(md.get("authorization", ""))

    async def ServerLive(self, request, context):
        return self.pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return self.pb.ServerReadyResponse(ready=self.dp.ready)

    async def ModelReady(self, request, context):
        return self.pb.ModelReadyResponse(ready=oip.model_ready(self.dp, request.name, request.version))

    async def ServerMetadata(self, request, context):
        return self.pb.ServerMetadataResponse(**oip.server_metadata())

    async def ModelMetadata(self, request, context):
        meta = await oip.model_metadata(self.dp, request.name, request.version)
        T = self.pb.ModelMetadataResponse.TensorMetadata
        return self.pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"], inputs=[T(**t) for t in meta["inputs"]], outputs=[T(**t) for t in meta["outputs"]]
        )

    async def ModelConfig(self, request, context):
        """Triton's model configuration (its model_config.proto messages), as `/v2/models/{m}/config`."""
        config = oip.model_config(self.dp, await oip.model_metadata(self.dp, request.name, request.version))
        return self.pb.ModelConfigResponse(config=json_format.ParseDict(config, self.pb.ModelConfig()))

    async def ModelStatistics(self, request, context):
        """The statistics extension, as `/v2/models[/{m}[/versions/{v}]]/stats`."""
        return json_format.ParseDict(oip.model_statistics(self.dp, request.name, request.version), self.pb.ModelStatisticsResponse())

    async def ModelInfer(self, request, context):
        dp = self._ready()
        deadline = dp.deadline(context.time_remaining())  # the client's deadline, when it set one
        resp = await oip.infer(dp, codec.parse_grpc(request), deadline)
        return codec.encode_grpc(resp, self.pb)

    async def RepositoryIndex(self, request, context):  # open, as the HTTP index is
        rows = oip.repository_index(self._ready(), request.ready)
        return self.pb.RepositoryIndexResponse(models=[self.pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    async def RepositoryModelLoad(self, request, context):
        self._admin(context)
        dp = self._ready()
        await oip.load(dp, request.model_name, request.parameters)
        return self.pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        self._admin(context)
        oip.unload(self._ready(), request.model_name)
        return self.pb.RepositoryModelUnloadResponse()


def _metered(dp: DataPlane, name: str, fn):
    """Wrap one RPC: errors -> gRPC status (+ retry hint), and the request metrics."""
    endpoint = f"/{proto.SERVICE}/{name}"
    metrics = dp.svc.metrics

    async def call(request, context):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await fn(request, context)
            status = 200
            return response
        except (DomainError, *LIBRARY_ERRORS) as e:
            de = from_library(e)
            status = oip_status.status(de)  # as /v2 answers it
            if de.retry_after_s is not None:
                retry = str(int(de.retry_after_s)) if float(de.retry_after_s).is_integer() else str(de.retry_after_s)
                context.set_trailing_metadata((("retry-after", retry), ("grpc-retry-pushback-ms", str(int(de.retry_after_s * 1000)))))
            await context.abort(GRPC_CODES[de.kind], f"{de.code}: {dp.public(de.message)}")
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            log.exception("unhandled error in %s", endpoint)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal_error: internal error ({type(e).__name__}); this is a bug, please report it")
        finally:
            if name not in UNMETERED:
                adapter = metrics.label(getattr(request, "model_name", None) or getattr(request, "name", None))
                metrics.requests.labels(endpoint, adapter, str(status)).inc()
                metrics.request_duration.labels(endpoint, adapter).observe(time.perf_counter() - t0)

    return call


def build_server(dp: DataPlane, host: str, port: int) -> grpc.aio.Server:
    """A `grpc.aio` server for the service, bound to host:port (not started). Messages are limited to
    the HTTP body limit, so both front doors refuse the same sizes.

    Binds without `SO_REUSEPORT` (grpcio's default sets it): a port another process holds is
    refused here (RuntimeError naming the address, so the start-up fails as uvicorn's
    `[Errno 98]` does for HTTP), instead of the kernel silently spreading clients over both."""
    limit = dp.settings.max_body_bytes
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", max(limit, 64 * 2**20)), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    servicer = Servicer(dp)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(_metered(dp, name, getattr(servicer, name)), request_deserializer=req.FromString, response_serializer=resp.SerializeToString)
        for name, (req, resp) in proto.methods().items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(proto.SERVICE, handlers),))
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"  # IPv6 in brackets
    why = f"gRPC could not bind {address}: the port is in use (or the address is not this host's); set METALORA_GRPC_PORT to a free port, or 0 to turn gRPC off"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio >= 1.5x raises "Failed to bind to address ..."
        raise RuntimeError(why) from e
    if bound == 0:  # older grpcio returns 0
        raise RuntimeError(why)
    return server


async def start(dp: DataPlane) -> grpc.aio.Server | None:
    """Start gRPC on `METALORA_GRPC_PORT` (same host as HTTP) for the app's lifespan; None when 0."""
    s = dp.settings
    if not s.grpc_port:
        return None
    server = build_server(dp, s.host, s.grpc_port)
    await server.start()
    log.info("gRPC (inference.GRPCInferenceService) on %s:%d", s.host, s.grpc_port)
    return server
