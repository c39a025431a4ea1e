"""Fleet routes: see the backends, add one at run time, drain or enable it, remove it.

Changes are kept in the database: every process takes them up (fleet/registry.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from comfyfleet.api.depends import ServicesDep
from comfyfleet.api.errors import ApiError
from comfyfleet.api.security import AdminDep
from comfyfleet.comfy.endpoints import NAME_PATTERN, InvalidBackend, make_backend
from comfyfleet.execution.session import BackendSession
from comfyfleet.fleet.registry import BackendBusy, BackendExists
from comfyfleet.services import Services

router = APIRouter(tags=["backends"])


class NewBackend(BaseModel):
    url: str = Field(min_length=1, max_length=500,
                     description="host:port or http(s)://host:port[/path]; no credentials, "
                                 "query or fragment")
    name: str | None = Field(default=None, max_length=100, pattern=NAME_PATTERN,
                             description="default: host:port")


class DrainRequest(BaseModel):
    wait: float = Field(default=0.0, ge=0, le=3600,
                        description="seconds to wait until no job is on the backend")


class BackendChange(BaseModel):
    drain: bool = Field(description="true: take no new work and finish what it has; false: enable")


def _session(svc: Services, name: str) -> BackendSession:
    session = svc.fleet.session(name)
    if session is None:
        raise ApiError(404, "backend_not_found", f"no backend named {name!r}")
    return session


@router.get("/backends", summary="Every backend with its health, queue and work in flight")
async def list_backends(svc: ServicesDep) -> list[dict[str, Any]]:
    return [svc.fleet.describe(session) for session in svc.fleet.sessions]


@router.post("/backends", status_code=201, summary="Add a backend at run time",
             dependencies=[AdminDep])
async def add_backend(request: NewBackend, svc: ServicesDep) -> dict[str, Any]:
    try:
        backend = make_backend(request.url, request.name)
    except InvalidBackend as exc:
        raise ApiError(422, "invalid_backend", str(exc), field=exc.field) from exc
    try:
        session = await svc.fleet.add_backend(backend)
    except BackendExists as exc:
        raise ApiError(409, "backend_exists", str(exc), field=exc.field) from exc
    return svc.fleet.describe(session)


@router.patch("/backends/{name}", summary="Drain a backend, or enable it again",
              dependencies=[AdminDep])
async def change_backend(name: str, change: BackendChange, svc: ServicesDep) -> dict[str, Any]:
    _session(svc, name)
    return svc.fleet.describe(await svc.fleet.set_draining(name, change.drain))


@router.post("/backends/{name}/drain", summary="Drain a backend and wait until it is idle",
             dependencies=[AdminDep],
             responses={202: {"description": "Drained, but jobs were still on it at the end"}})
async def drain_backend(name: str, request: DrainRequest, svc: ServicesDep,
                        response: Response) -> dict[str, Any]:
    """For a GPU server about to stop (a Kubernetes preStop hook): no new work goes to it,
    and the answer comes once every job on it has ended, in every comfyfleet process (200),
    or when `wait` runs out (202), with `jobs_left` saying how many were still there."""
    _session(svc, name)
    left = await svc.fleet.drain_and_wait(name, request.wait)
    if left:
        response.status_code = 202
    session = svc.fleet.session(name)  # discovery may have removed it meanwhile
    return {**(svc.fleet.describe(session) if session else {"name": name}), "jobs_left": left}


@router.delete("/backends/{name}", status_code=204, summary="Remove a drained, idle backend",
               dependencies=[AdminDep])
async def remove_backend(name: str, svc: ServicesDep) -> Response:
    _session(svc, name)
    try:
        await svc.fleet.remove_backend(name)
    except BackendBusy as exc:
        raise ApiError(409, "backend_busy", str(exc)) from exc
    return Response(status_code=204)
