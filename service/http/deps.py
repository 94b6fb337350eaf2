"""FastAPI dependencies as `Annotated` aliases: the data plane (ready or not) and the admin token."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..dataplane import DataPlane


async def get_plane(request: Request) -> DataPlane:
    return request.app.state.dataplane


async def get_ready_plane(request: Request) -> DataPlane:
    dp: DataPlane = request.app.state.dataplane
    dp.check_ready()
    return dp


# Declares the bearer scheme in the OpenAPI document (Swagger UI's "Authorize" button); it never
# refuses by itself (auto_error=False): the data plane's `authorize` does.
bearer = HTTPBearer(auto_error=False, scheme_name="adminToken", description="`Authorization: Bearer $METALORA_ADMIN_TOKEN` (admin and gallery-write routes)")


async def require_admin(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None) -> None:
    """The data plane's admin check on the Authorization header.

    Dependencies are `async def` so FastAPI runs them on the loop, not via a thread hand-off.
    """
    request.app.state.dataplane.authorize(request.headers.get("authorization", ""))


AnyPlaneDep = Annotated[DataPlane, Depends(get_plane)]
PlaneDep = Annotated[DataPlane, Depends(get_ready_plane)]
AdminDep = Depends(require_admin)
RefPath = Annotated[str, Path(description="`name` or `name@version`", max_length=130)]
