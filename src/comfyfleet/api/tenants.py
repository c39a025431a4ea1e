"""GET /tenants (admin): each API key's weight, limits, backlog, jobs on backends and share of
the GPU time over the last hour (DESIGN §4). Also what /metrics shows per key."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request

from comfyfleet.api.depends import ServicesDep
from comfyfleet.api.security import AdminDep, Guard
from comfyfleet.api_keys import KeyLimits
from comfyfleet.jobs.repository import JobRepository, TenantActivity

WINDOW = timedelta(hours=1)
# The tenant of the jobs submitted while keys were off.
WITHOUT_KEY = "(no key)"

router = APIRouter(tags=["tenants"])


@dataclass(frozen=True)
class TenantState:
    name: str
    admin: bool
    revoked: bool
    weight: int
    max_concurrent: int | None
    max_queued: int | None
    queued: int
    running: int  # dispatched, running or uploading: what max_concurrent counts
    gpu_seconds: float  # in the last WINDOW
    gpu_share: float  # of every key's gpu_seconds in the window (0 when none ran)


def unnamed(digest: str | None) -> str:
    """The name of a key no longer configured (None: jobs submitted while keys were off)."""
    return WITHOUT_KEY if digest is None else f"unknown key {digest[:12]}"


async def tenant_states(guard: Guard, repository: JobRepository) -> list[TenantState]:
    """Every key there is (configured, or live in the database) and every key with jobs now or
    in the last WINDOW (a revoked one, the jobs of no key), by name."""
    activity = {entry.api_key_hash: entry for entry in await repository.tenant_activity(WINDOW)}
    total = sum(entry.gpu_seconds for entry in activity.values())
    states: dict[str | None, TenantState] = {}

    def add(digest: str | None, name: str, admin: bool, revoked: bool,
            limits: KeyLimits) -> None:
        found = activity.get(digest, TenantActivity(digest, 0, 0, 0.0))
        states[digest] = TenantState(
            name, admin, revoked, limits.weight, limits.max_concurrent, limits.max_queued,
            found.queued, found.on_backend, round(found.gpu_seconds, 3),
            round(found.gpu_seconds / total, 4) if total else 0.0)

    for digest, name in guard.names.items():
        add(digest, name, guard.admin(digest), False, guard.defaults)
    for key in await guard.store.all() if guard.store is not None else ():
        if key.revoked_at is None or key.key_hash in activity:
            add(key.key_hash, key.name, key.admin, key.revoked_at is not None,
                key.limits.or_defaults(guard.defaults))
    for other in activity.keys() - states.keys():  # a key no longer configured, or none
        add(other, unnamed(other),
            False, other is not None, guard.defaults)
    if not states:  # keys are off and nothing ran: the one tenant there is
        add(None, WITHOUT_KEY, False, False, guard.defaults)
    return sorted(states.values(), key=lambda state: state.name)


@router.get("/tenants", summary="Each API key's weight, limits, backlog, running jobs and "
            "share of the GPU time in the last hour (admin)", dependencies=[AdminDep])
async def list_tenants(request: Request, svc: ServicesDep) -> dict[str, Any]:
    guard = request.app.state.guard
    assert isinstance(guard, Guard)
    states = await tenant_states(guard, svc.repository)
    return {"window_seconds": int(WINDOW.total_seconds()),
            "tenants": [asdict(state) for state in states]}
