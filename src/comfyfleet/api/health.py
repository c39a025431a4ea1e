"""Liveness and readiness, outside the API prefix and any authentication."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from comfyfleet import db
from comfyfleet.api.depends import ServicesDep
from comfyfleet.storage import StorageError

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database, storage and a backend (if any) are reachable")
async def readyz(svc: ServicesDep) -> JSONResponse:
    checks: dict[str, Any] = {"database": await db.ping(svc.engine)}
    try:
        await svc.storage.check()
        checks["storage"] = True
    except StorageError as exc:
        checks["storage"] = False
        checks["storage_error"] = str(exc)
    checks["backends"] = {s.name: s.connected for s in svc.fleet.sessions}
    # With backends configured, a process that reaches none of them can run no job.
    backend_ready = not checks["backends"] or any(checks["backends"].values())
    ready = checks["database"] and checks["storage"] and backend_ready
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)
