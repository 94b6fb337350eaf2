"""gRPC: the protocol's `inference.GRPCInferenceService` on its own port, over the same `Service`.

A `grpc.aio` server on the app's event loop, so it shares the decoder pool, micro-batcher and
adapter registry with HTTP (`dataplane` does the work; this file translates messages). The
handlers are built from the service in the shipped .proto (`proto.methods()`), not from generated
stubs.

Errors: `ServiceError` statuses map to gRPC codes (400/413/415/422 INVALID_ARGUMENT, 401
UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND, 409 FAILED_PRECONDITION, 503 UNAVAILABLE,
504 DEADLINE_EXCEEDED). A 503 carries its retry hint as trailing metadata: `retry-after`
(seconds, as HTTP) and `grpc-retry-pushback-ms` (what gRPC's own retry policy reads). The
repository RPCs need `authorization: Bearer <token>` metadata, as the HTTP admin routes do.

Metrics: each call counts in `metalora_requests_total` with `endpoint` = the gRPC method path
(`/inference.GRPCInferenceService/ModelInfer`) and `code` = the HTTP status the same outcome
has on `/v2`, so one alert on `code=~"5.."` covers both front doors.
"""

from __future__ import annotations

import logging
import time

import grpc

from metalora.bundle import BundleError
from metalora.images import ImageError

from ..http.deps import check_admin
from ..errors import ServiceError
from ..inputs import Watch
from ..oip import codec, dataplane
from . import proto

log = logging.getLogger("metalora.service")

GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
UNMETERED = {"ServerLive", "ServerReady"}  # probes would drown the request counts, as /healthz would


class Servicer:
    """One method per RPC of `inference.GRPCInferenceService`; each returns its response message."""

    def __init__(self, svc):
        self.svc = svc
        self.pb = proto.messages()

    def _ready(self):
        if not self.svc.ready:
            raise ServiceError(503, "not_ready", "the server is still loading and warming its adapters", {"Retry-After": "2"})
        return self.svc

    def _admin(self, context) -> None:
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        check_admin(self.svc.settings, md.get("authorization", ""))

    async def ServerLive(self, request, context):
        return self.pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return self.pb.ServerReadyResponse(ready=self.svc.ready)

    async def ModelReady(self, request, context):
        return self.pb.ModelReadyResponse(ready=dataplane.model_ready(self.svc, request.name, request.version))

    async def ServerMetadata(self, request, context):
        return self.pb.ServerMetadataResponse(**dataplane.server_metadata())

    async def ModelMetadata(self, request, context):
        meta = await dataplane.model_metadata(self.svc, request.name, request.version)
        T = self.pb.ModelMetadataResponse.TensorMetadata
        return self.pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"], inputs=[T(**t) for t in meta["inputs"]], outputs=[T(**t) for t in meta["outputs"]]
        )

    async def ModelInfer(self, request, context):
        svc = self._ready()
        timeout = svc.settings.request_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:  # the client's deadline, when it set one, is the request's
            timeout = min(timeout, max(remaining, 0.0))
        req = codec.parse_grpc(request)
        resp = await dataplane.infer(svc, req, Watch(None, timeout))
        return codec.encode_grpc(resp, self.pb)

    async def RepositoryIndex(self, request, context):
        self._admin(context)
        rows = dataplane.repository_index(self._ready(), request.ready)
        return self.pb.RepositoryIndexResponse(models=[self.pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    async def RepositoryModelLoad(self, request, context):
        self._admin(context)
        params = set(request.parameters) - {"unload_dependents"}
        if params:
            raise codec.bad("invalid_parameter", f"load takes no parameters here (no config or file overrides); got {sorted(params)}")
        await dataplane.load(self._ready(), request.model_name)
        return self.pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        self._admin(context)
        dataplane.unload(self._ready(), request.model_name)
        return self.pb.RepositoryModelUnloadResponse()


def _as_service_error(e: Exception) -> ServiceError:
    if isinstance(e, ServiceError):
        return e
    if isinstance(e, BundleError):
        return ServiceError.from_bundle(e)
    return ServiceError.from_image(e)


def _metered(svc, name: str, fn):
    """Wrap one RPC: errors -> gRPC status (+ retry hint), and the request metrics."""
    endpoint = f"/{proto.SERVICE}/{name}"

    async def call(request, context):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await fn(request, context)
            status = 200
            return response
        except (ServiceError, BundleError, ImageError) as e:
            se = _as_service_error(e)
            status = 400 if se.status in (415, 422) else se.status  # as /v2 answers it
            retry = se.headers.get("Retry-After")
            if retry is not None:
                context.set_trailing_metadata((("retry-after", retry), ("grpc-retry-pushback-ms", str(int(float(retry) * 1000)))))
            await context.abort(GRPC_CODES.get(se.status, grpc.StatusCode.UNKNOWN), f"{se.code}: {svc.public(se.message)}")
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            log.exception("unhandled error in %s", endpoint)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal_error: internal error ({type(e).__name__}); this is a bug, please report it")
        finally:
            if name not in UNMETERED:
                adapter = svc.metrics.label(getattr(request, "model_name", None) or getattr(request, "name", None))
                svc.metrics.requests.labels(endpoint, adapter, str(status)).inc()
                svc.metrics.request_duration.labels(endpoint, adapter).observe(time.perf_counter() - t0)

    return call


# RPCs of Triton's gRPC service that need messages from Triton's model_config.proto, which the shipped
# .proto (KServe's file + the repository RPCs) does not have: a clear UNIMPLEMENTED, not "Method not found!".
NOT_HERE = {
    "ModelConfig": "ModelConfig is not served over gRPC here: the shipped .proto has no Triton model_config.proto; "
    "the same configuration is on HTTP, GET /v2/models/{name}/config",
}


def _not_here(message: str):
    async def call(request: bytes, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"unimplemented: {message}")

    return call


def build_server(svc, host: str, port: int) -> grpc.aio.Server:
    """A `grpc.aio` server for the service, bound to host:port (not started). Messages are limited to
    the HTTP body limit, so both front doors refuse the same sizes.

    Binds without `SO_REUSEPORT` (grpcio's default sets it): a port another process holds is
    refused here (RuntimeError naming the address, so the start-up fails as uvicorn's
    `[Errno 98]` does for HTTP), instead of the kernel silently spreading clients over both."""
    limit = svc.settings.max_body_bytes
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", max(limit, 64 * 2**20)), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    servicer = Servicer(svc)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(_metered(svc, name, getattr(servicer, name)), request_deserializer=req.FromString, response_serializer=resp.SerializeToString)
        for name, (req, resp) in proto.methods().items()
    }
    handlers.update({name: grpc.unary_unary_rpc_method_handler(_not_here(msg)) for name, msg in NOT_HERE.items() if name not in handlers})
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


async def start(svc) -> grpc.aio.Server | None:
    """Start gRPC on `METALORA_GRPC_PORT` (same host as HTTP) for the app's lifespan; None when 0."""
    s = svc.settings
    if not s.grpc_port:
        return None
    server = build_server(svc, s.host, s.grpc_port)
    await server.start()
    log.info("gRPC (inference.GRPCInferenceService) on %s:%d", s.host, s.grpc_port)
    return server
