"""The operator's dashboard (DESIGN §4 `GET /dashboard`): static pages shipped in the package,
and the few reads they need beyond the API's own.

The pages call the API with the key the operator typed in (an admin key sees every job and may
act; a tenant key sees its own jobs), so the HTML and its assets carry no data and are open.
One Server-Sent Events stream per open dashboard tells it when the fleet or the jobs change:
it is woken by the fleet's and the jobs' pulses, never by a timer, and coalesces bursts. It
carries the events of the jobs whose pages are open too, so that a browser's tabs, which share
it, need no stream of their own (a browser opens six connections to a host at most).
"""

from __future__ import annotations

import asyncio
import html
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette import EventSourceResponse, ServerSentEvent

from comfyfleet import json_codec
from comfyfleet.api.deliveries import delivery_json
from comfyfleet.api.depends import ServicesDep
from comfyfleet.api.errors import ApiError
from comfyfleet.api.events import job_stream
from comfyfleet.api.security import Caller, CallerDep, Guard, visible_job
from comfyfleet.api.tenants import unnamed
from comfyfleet.jobs.overview import ACTIVITY_WINDOW, Overview
from comfyfleet.pulse import first_of
from comfyfleet.services import Services

STATIC = Path(__file__).resolve().parent.parent / "dashboard"
# Seconds between two events to an open dashboard while the fleet is busy (the first change
# after a quiet spell goes out at once): each `jobs` event makes the page re-read what it
# lists, about 11 ms of the service's CPU for a page of jobs or the backlog with 100,000 jobs,
# so that once a second cost just over 1 % of a core per dashboard (bench/dashboard.py).
MIN_EVENT_INTERVAL = 2.0
PING_SECONDS = 15
# Jobs one dashboard stream follows at most (a browser's tabs on job pages).
MAX_FOLLOWED_JOBS = 100
# Events of the followed jobs waiting for a slow reader before their streams wait too.
MERGED_BACKLOG = 64
# The pages hold no secrets beyond the key in the tab's storage; nothing from elsewhere runs.
# Output images may come from the storage's own host (S3 presigned URLs).
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob: http: https:; "
                           "media-src 'self' blob: http: https:; frame-ancestors 'none'")

router = APIRouter(tags=["dashboard"])


async def _overview(svc: ServicesDep) -> Overview:
    return Overview(svc.engine)


OverviewDep = Annotated[Overview, Depends(_overview)]


@router.get("/dashboard/me", summary="Who the dashboard's key is")
async def whoami(request: Request, caller: CallerDep) -> dict[str, Any]:
    """`admin`: sees every job and may change the fleet; `keys`: the API needs a key;
    `tenants` (admin keys): the name of every key, to choose whose jobs to list."""
    tenants: list[str] = []
    if caller.sees_all and caller.key_hash is not None:
        tenants = sorted((await _guard(request).all_names()).values())
    return {"admin": caller.sees_all, "keys": caller.key_hash is not None, "tenants": tenants}


def _guard(request: Request) -> Guard:
    guard = request.app.state.guard
    assert isinstance(guard, Guard)
    return guard


@router.get("/dashboard/backlog", summary="The unfinished jobs by workflow and by tenant")
async def backlog(request: Request, caller: CallerDep, overview: OverviewDep) -> dict[str, Any]:
    """`tenants` (admin keys only): each key's unfinished jobs, named as GET /tenants names
    them; empty when keys are off."""
    entries = await overview.backlog(caller.owner_filter)
    queued = [entry.oldest_queued_at for entry in entries if entry.oldest_queued_at]
    # With keys off there is one tenant: nobody to tell apart.
    by_tenant = caller.sees_all and caller.key_hash is not None
    tenants = await _backlog_by_tenant(request, overview) if by_tenant else []
    return {
        "tenants": tenants,
        "queued": sum(entry.counts.get("queued", 0) for entry in entries),
        "oldest_queued_at": min(queued).isoformat() if queued else None,
        "workflows": [
            {"workflow": entry.workflow, "counts": entry.counts,
             "oldest_queued_at": entry.oldest_queued_at.isoformat()
             if entry.oldest_queued_at else None}
            for entry in entries
        ],
    }


async def _backlog_by_tenant(request: Request, overview: Overview) -> list[dict[str, Any]]:
    names = await _guard(request).all_names()
    found = [{"tenant": names.get(digest, unnamed(digest)) if digest else unnamed(None),
              "counts": counts}
             for digest, counts in (await overview.backlog_by_key()).items()]
    return sorted(found, key=lambda entry: (-entry["counts"].get("queued", 0), entry["tenant"]))


@router.get("/dashboard/activity",
            summary="Jobs submitted and finished per minute, backends' busy share: last hour")
async def activity(caller: CallerDep, overview: OverviewDep) -> dict[str, Any]:
    """A tenant key sees its own jobs' minutes, and no backend's share."""
    found = await overview.activity(caller.owner_filter)
    return {
        "window_seconds": int(ACTIVITY_WINDOW.total_seconds()),
        "minutes": [{**minute, "minute": minute["minute"].isoformat()}
                    for minute in found.minutes],
        "utilisation": [{"backend": backend, "busy": share}
                        for backend, share in sorted(found.utilisation.items())],
    }


@router.get("/dashboard/deliveries", summary="Webhook deliveries failing or dead")
async def troubled_deliveries(
    caller: CallerDep, overview: OverviewDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    found = await overview.troubled_deliveries(limit, caller.owner_filter)
    return {"deliveries": [delivery_json(delivery, []) for delivery in found]}


@router.get("/dashboard/events", summary="The dashboard's live stream",
            response_class=EventSourceResponse)
async def dashboard_events(
    request: Request, svc: ServicesDep, caller: CallerDep,
    job: Annotated[list[uuid.UUID], Query(max_length=MAX_FOLLOWED_JOBS)] = [],  # noqa: B006
) -> EventSourceResponse:
    """`fleet` events carry every backend as GET /backends shows it, whenever that changes;
    `jobs` events say that jobs changed, so that the page re-reads what it lists. With
    `?job=<id>` (repeated for more), `job` events carry each such job's events as
    GET /jobs/{id}/events?previews=true has them, as `{"job": id, "event": name, "data": …}`,
    until it ends; a job the key may not see is left out."""
    followed = [_job_events(svc, job_id) for job_id in await _visible(svc, caller, job)]
    return EventSourceResponse(_merged(_stream(svc, _snapshot(request, svc)), *followed),
                               ping=PING_SECONDS)


async def _visible(svc: Services, caller: Caller, job_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    visible = []
    for job_id in dict.fromkeys(job_ids):
        try:
            await visible_job(svc, caller, job_id)
        except ApiError:
            continue
        visible.append(job_id)
    return visible


async def _job_events(svc: Services, job_id: uuid.UUID) -> AsyncIterator[ServerSentEvent]:
    async for event in job_stream(svc, job_id, previews=True, last_id=None):
        # The event's data is JSON already (a preview's image is large): put in as it is.
        name = json_codec.dumps_text(event.event)
        data = f'{{"job": "{job_id}", "event": {name}, "data": {event.data}}}'
        yield ServerSentEvent(data, event="job")


async def _merged(*streams: AsyncIterator[ServerSentEvent]) -> AsyncIterator[ServerSentEvent]:
    """The events of all `streams` as they come, until the client leaves or one fails."""
    arrived: asyncio.Queue[ServerSentEvent | Exception] = asyncio.Queue(MERGED_BACKLOG)

    async def pump(stream: AsyncIterator[ServerSentEvent]) -> None:
        try:
            async for event in stream:
                await arrived.put(event)
        except Exception as error:  # raised below, where the response is written
            await arrived.put(error)

    pumps = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        while True:
            item = await arrived.get()
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        for task in pumps:
            task.cancel()


class FleetSnapshot:
    """The fleet as GET /backends shows it, in JSON, described once for every open dashboard
    until the fleet or a job changes (a job's end changes what its backend holds)."""

    def __init__(self, svc: Services) -> None:
        self._svc = svc
        self._as_of: tuple[asyncio.Event, asyncio.Event] | None = None
        self._text = ""

    def text(self, *, fresh: bool = False) -> str:
        """`fresh`: described now whatever the last description was (the times it shows, such
        as how long a backend has been unreachable, count from when it was made)."""
        as_of = (self._svc.fleet.changes.next(), self._svc.events.any_job.next())
        if fresh or self._as_of is None or any(
                a is not b for a, b in zip(as_of, self._as_of, strict=True)):
            fleet = self._svc.fleet
            self._text = json_codec.dumps_text(
                [fleet.describe(session) for session in fleet.sessions])
            self._as_of = as_of
        return self._text


def _snapshot(request: Request, svc: Services) -> FleetSnapshot:
    """The app's one snapshot, made by the first dashboard to open."""
    found = getattr(request.app.state, "fleet_snapshot", None)
    if not isinstance(found, FleetSnapshot):
        found = request.app.state.fleet_snapshot = FleetSnapshot(svc)
    return found


async def _stream(svc: Services, snapshot: FleetSnapshot) -> AsyncIterator[ServerSentEvent]:
    jobs_changed = svc.events.any_job.next()
    shown: str | None = None
    while True:
        fleet_changed = svc.fleet.changes.next()
        fleet = snapshot.text(fresh=shown is None)
        if fleet != shown:
            shown = fleet
            yield ServerSentEvent(fleet, event="fleet")
        if jobs_changed.is_set():
            jobs_changed = svc.events.any_job.next()
            yield ServerSentEvent("{}", event="jobs")
        await asyncio.sleep(MIN_EVENT_INTERVAL)  # a burst of changes becomes one event
        await first_of(fleet_changed, jobs_changed)


def install_dashboard(app: FastAPI, route_prefix: str) -> None:
    """The page at /dashboard and its assets at /dashboard/static/, open like /docs: they
    hold no data. The page is told where the API is."""
    page = (STATIC / "index.html").read_text().replace(
        "{{API_PREFIX}}", html.escape(route_prefix, quote=True))

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                           "Cache-Control": "no-cache"})

    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")
