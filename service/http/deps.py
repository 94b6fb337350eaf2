"""FastAPI dependencies as `Annotated` aliases: the service, the ready service, the admin token."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..container import Service
from ..errors import ServiceError


async def get_service(request: Request) -> Service:
    return request.app.state.service


async def get_ready_service(request: Request) -> Service:
    svc: Service = request.app.state.service
    if not svc.ready:
        raise ServiceError(503, "not_ready", "the server is still loading and warming its adapters", {"Retry-After": "2"})
    return svc


def check_admin(settings, authorization: str) -> None:
    """The admin bearer token check, for HTTP and gRPC alike: no token configured -> 403 for
    everyone; a wrong or missing token -> 401."""
    token = settings.admin_token
    if token is None:
        raise ServiceError(403, "admin_disabled", "admin routes are disabled: set METALORA_ADMIN_TOKEN to enable them")
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise ServiceError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


# Declares the bearer scheme in the OpenAPI document (Swagger UI's "Authorize" button); it never
# refuses by itself (auto_error=False): check_admin does, with the service's own 401/403 errors.
bearer = HTTPBearer(auto_error=False, scheme_name="adminToken", description="`Authorization: Bearer $METALORA_ADMIN_TOKEN` (admin and gallery-write routes)")


async def require_admin(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None) -> None:
    """`check_admin` on the Authorization header.

    Dependencies are `async def` so FastAPI runs them on the loop, not via a thread hand-off.
    """
    check_admin(request.app.state.service.settings, request.headers.get("authorization", ""))


ServiceDep = Annotated[Service, Depends(get_service)]
ReadyDep = Annotated[Service, Depends(get_ready_service)]
AdminDep = Depends(require_admin)
RefPath = Annotated[str, Path(description="`name` or `name@version`", max_length=130)]
