"""The FastAPI app, assembled: the `Service` lifespan (with the gRPC door beside it), one router
per resource, the error handlers, the middleware.

`create_app(settings)` builds it; `metalora serve` (service/cli.py) runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from ..container import Service
from ..dataplane import DataPlane
from ..grpc import server as grpc_server
from ..settings import Settings
from . import errors, v2
from .middleware import LimitsAndMetrics
from .routes import adapters, console, inference, operations

log = logging.getLogger("metalora.service")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service = Service(settings)
    dataplane = DataPlane(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        grpc = await grpc_server.start(dataplane)  # None when METALORA_GRPC_PORT=0
        warm = asyncio.create_task(service.warm())
        warm.add_done_callback(partial(_log_failure, service))
        try:
            yield
        finally:
            warm.cancel()
            if grpc is not None:
                await grpc.stop(grace=5)
            await service.stop()

    app = FastAPIOffline(  # /docs and /redoc from bundled assets, not a CDN: they work offline
        title="MetaLoRA Serve",
        version="1",
        summary="One frozen vision backbone, many input-conditioned MetaLoRA adapters, cross-adapter micro-batching.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.dataplane = dataplane
    errors.install(app)
    for module in (inference, adapters, operations, console, v2):
        app.include_router(module.router)
    app.include_router(console.thumbnails)
    service.metrics.init_endpoints(sorted(app.openapi()["paths"]))  # the route templates the middleware labels with
    app.add_middleware(LimitsAndMetrics, service=service)
    return app


def _log_failure(service: Service, task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        service.failed["startup"] = repr(task.exception())
        log.error("start-up failed: %r", task.exception())
