"""Job routes: submit and read (DESIGN §4)."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import APIRouter, Response
from pydantic import AnyHttpUrl, BaseModel, Field

from comfyfleet.api.errors import ApiError
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.services import Services, ServicesDep
from comfyfleet.webhooks.ssrf import UrlNotAllowed, check_url
from comfyfleet.workflows.params import ParamError

router = APIRouter(tags=["jobs"])


class JobRequest(BaseModel):
    workflow: str = Field(min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)
    callback_url: AnyHttpUrl | None = None
    client_task_id: str | None = Field(default=None, min_length=1, max_length=200)
    priority: int = Field(default=0, ge=-1000, le=1000)
    webhook_events: list[Literal["job.started", "job.progress"]] | None = Field(
        default=None, description="Webhooks besides the terminal one (always sent)"
    )


@router.post("/jobs", status_code=202, summary="Submit a job")
async def submit_job(
    request: JobRequest, response: Response, svc: ServicesDep
) -> dict[str, Any]:
    workflow = svc.catalog.get(request.workflow)
    if workflow is None:
        known = ", ".join(sorted(svc.catalog.workflows)) or "none"
        raise ApiError(422, "unknown_workflow",
                       f"no workflow named {request.workflow!r} (known: {known})",
                       field="workflow")
    try:
        values, prompt = workflow.build(request.params)
    except ParamError as exc:
        raise ApiError(422, "invalid_params", f"invalid parameters: {exc}",
                       params=exc.problems) from exc
    lacking = svc.fleet.missing_everywhere(prompt)
    if lacking is not None:
        everything = sorted({piece for pieces in lacking.values() for piece in pieces})
        raise ApiError(422, "no_capable_backend",
                       f"no backend can run this job; missing: {', '.join(everything)}",
                       missing=lacking)
    if request.callback_url is not None:
        try:
            await check_url(str(request.callback_url),
                            allow_private=svc.settings.allow_private_callbacks)
        except UrlNotAllowed as exc:
            raise ApiError(422, "callback_url_not_allowed", str(exc),
                           field="callback_url") from exc
    job, created = await svc.repository.insert(
        Job(
            workflow=workflow.name,
            params=values,
            prompt=prompt,
            callback_url=str(request.callback_url) if request.callback_url else None,
            client_task_id=request.client_task_id,
            priority=request.priority,
            webhook_events=sorted(set(request.webhook_events or ())) or None,
        )
    )
    if created:
        svc.fleet.job_available()
    else:
        response.status_code = 200
    return await svc.render(job)


@router.get("/jobs/{job_id}", summary="One job")
async def get_job(job_id: uuid.UUID, svc: ServicesDep) -> dict[str, Any]:
    job = await svc.repository.get(job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id}")
    return await svc.render(job)


async def _cancel(job_id: uuid.UUID, svc: Services) -> dict[str, Any]:
    job = await svc.fleet.cancel(job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id}")
    if job.status != JobStatus.CANCELLED:
        raise ApiError(409, "job_finished", f"job {job_id} already ended {job.status}",
                       job_status=job.status)
    return await svc.render(job)


@router.post("/jobs/{job_id}/cancel", summary="Cancel a job")
async def cancel_job(job_id: uuid.UUID, svc: ServicesDep) -> dict[str, Any]:
    """Queued: cancelled at once. On a backend: removed from its queue, or interrupted if
    running. The job ends `cancelled` and its webhook says so."""
    return await _cancel(job_id, svc)


@router.delete("/jobs/{job_id}", summary="Cancel a job (same as POST .../cancel)")
async def delete_job(job_id: uuid.UUID, svc: ServicesDep) -> dict[str, Any]:
    return await _cancel(job_id, svc)
