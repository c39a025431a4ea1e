"""GET /jobs/{id}/events: Server-Sent Events of one job, until it ends (DESIGN §4).

Each `state` event carries the status, progress (0..1 over all nodes), queue position and an
ETA: for a queued job, the work ahead of it (what the jobs on backends have left, and its
queue position's jobs, each as long as its workflow's recent runs) over the backends at
work, then its own run; once dispatched, the rest of its run (by the workflow's runs on its
backend, once that has run it before), after the prompts sent there before it; `preview`
events (with `?previews=true`) carry the backend's live preview images; the last event is
named after the terminal status and carries the whole job. Event ids name the state, so a
client reconnecting with Last-Event-ID gets the next change, not a repeat.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header
from sse_starlette import EventSourceResponse, ServerSentEvent

from comfyfleet import json_codec
from comfyfleet.api.depends import ServicesDep
from comfyfleet.api.security import CallerDep, visible_job
from comfyfleet.dispatch.fair_share import expected_end
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.jobs.notices import PreviewImage
from comfyfleet.services import Services

router = APIRouter(tags=["jobs"])

PING_SECONDS = 15


@router.get("/jobs/{job_id}/events", summary="A job's progress as Server-Sent Events",
            response_class=EventSourceResponse)
async def job_events(
    job_id: uuid.UUID,
    svc: ServicesDep,
    caller: CallerDep,
    previews: bool = False,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    await visible_job(svc, caller, job_id)
    return EventSourceResponse(job_stream(svc, job_id, previews, last_event_id),
                               ping=PING_SECONDS)


async def job_stream(
    svc: Services, job_id: uuid.UUID, previews: bool, last_id: str | None
) -> AsyncIterator[ServerSentEvent]:
    """The events of the job `job_id` (one the caller may see) until it ends; also carried,
    for the jobs its tabs show, by the dashboard's shared stream (api/dashboard.py)."""
    notices = svc.events.listen(job_id)
    job: Job | None = None
    try:
        while True:
            job = await svc.repository.reread(job_id, job)  # whole the first time
            if job is None:
                return
            event_id = f"{job.status}:{job.attempts}:{job.progress:.3f}"
            terminal = JobStatus(job.status).terminal
            if event_id != last_id:
                last_id = event_id
                if terminal:
                    # Whole: its client_task_id too, which a later submit may have cleared.
                    ended = await svc.repository.get(job_id) or job
                    yield ServerSentEvent(json_codec.dumps_text(await svc.render(ended)),
                                          event=job.status, id=event_id)
                    return
                yield ServerSentEvent(json_codec.dumps_text(await _state(svc, job)), event="state",
                                      id=event_id)
            elif terminal:
                return  # resumed after the end: nothing more to tell
            # Until the job changes here or another process says that its jobs changed
            # (peers.py): previews as they come.
            while (notice := await notices.get()) is not None:
                if previews and isinstance(notice, PreviewImage):
                    yield _preview_event(notice)
    finally:
        svc.events.stop(job_id, notices)


async def _state(svc: Services, job: Job) -> dict[str, Any]:
    position, eta = await place_and_eta(svc, job)
    return {
        "status": job.status,
        "progress": job.progress,
        "backend": job.backend,
        "queue_position": position,
        "waiting": svc.fleet.why_waiting(job.prompt) if position is not None else None,
        "eta_seconds": eta,
    }


async def place_and_eta(svc: Services, job: Job) -> tuple[int | None, float | None]:
    """A queued job's position (1: the next free slot takes it) and, while it is unfinished,
    the seconds until it is expected to end; None where they do not apply or nothing is
    known yet (no run of its workflow seen)."""
    if JobStatus(job.status).terminal:
        return None, None
    position = await svc.repository.queue_position(job) if job.status == JobStatus.QUEUED \
        else None
    eta: float | None = None
    if position is not None:
        # Measured fleet-wide: which backend takes it is not known yet. As recent as the
        # position (each serve process reads them once per POSITION_MAX_AGE, not per ask).
        typical = await svc.repository.recent_run_seconds(job.workflow)
        if typical is not None:
            eta = expected_end(position - 1, typical,
                               await svc.repository.recent_work_on_backends_seconds(),
                               sum(s.accepts_work for s in svc.fleet.sessions))
    else:
        # Once dispatched, how long this workflow takes on that backend (GPUs differ), as
        # recent as a queued job's; one not started yet waits there for the prompts sent
        # before it.
        typical = await svc.repository.recent_run_seconds(job.workflow, job.backend)
        if typical is not None:
            eta = typical * (1 - job.progress)
            if job.status == JobStatus.DISPATCHED and job.started_at is None:
                eta += await svc.repository.work_on_backends_seconds(ahead_of=job)
    return position, round(eta, 1) if eta is not None else None


def _preview_event(preview: PreviewImage) -> ServerSentEvent:
    data = base64.b64encode(preview.image).decode()
    return ServerSentEvent(
        json_codec.dumps_text({"node_id": preview.node_id,
                               "image": f"data:{preview.image_type};base64,{data}"}),
        event="preview",
    )
