"""Job routes: submit and read (DESIGN §4)."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import AnyHttpUrl, BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from comfyfleet.api.comfyui_server import known_params
from comfyfleet.api.depends import ServicesDep, services
from comfyfleet.api.errors import ApiError
from comfyfleet.api.events import place_and_eta
from comfyfleet.api.job_poll import JobPoll, JobPollRoute, job_response
from comfyfleet.api.job_submit import SubmitRoute
from comfyfleet.api.security import Caller, CallerDep, Guard, caller_of, visible_job
from comfyfleet.api.workflows import workflow_at
from comfyfleet.intake import errors as refusals
from comfyfleet.intake.workflow_jobs import Accepted, Submission, accept
from comfyfleet.jobs.comfyui_server import COMFYUI_SERVER_FORMAT, comfyui_server_record
from comfyfleet.jobs.models import JobStatus
from comfyfleet.services import Services
from comfyfleet.workflows.catalog import BrokenWorkflow, UnknownWorkflow

router = APIRouter(tags=["jobs"])

MAX_WAIT_SECONDS = 300.0
REUSE_DESCRIPTION = (
    "true: when this API key already ran the same workflow with the same parameters and input "
    "bytes, answer at once with a new job holding those outputs; false: always run; unset: "
    "as the workflow says (its sidecar's reuse_outputs)")


class WorkflowJobRequest(BaseModel):
    """A job for the workflow named in the path; each workflow's own parameter schema is in
    /openapi.json under its path."""

    params: dict[str, Any] = Field(default_factory=dict)
    callback_url: AnyHttpUrl | None = None
    client_task_id: str | None = Field(default=None, min_length=1, max_length=200)
    priority: int = Field(default=0, ge=-1000, le=1000)
    webhook_events: list[Literal["job.started", "job.progress"]] | None = Field(
        default=None, description="Webhooks besides the terminal one (always sent)"
    )
    reuse_outputs: bool | None = Field(default=None, description=REUSE_DESCRIPTION)


class JobRequest(WorkflowJobRequest):
    workflow: str = Field(min_length=1, max_length=200)


WaitQuery = Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS, description=(
    "Seconds to wait for the job to end; the job is returned as it is then"))]
IDEMPOTENCY_KEY_LENGTH = 200
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=IDEMPOTENCY_KEY_LENGTH,
    description="A repeat with the same key returns the same job (200)")]


@router.post("/jobs", status_code=202, summary="Submit a job")
async def submit_job(
    request: JobRequest, response: Response, svc: ServicesDep, caller: CallerDep,
    wait: WaitQuery = 0, idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    job, response.status_code = await _submit(svc, request, wait, idempotency_key,
                                              caller=caller)
    return job


@router.post("/workflows/{name}/jobs", status_code=202, include_in_schema=False)
async def submit_workflow_job(
    name: str, http_request: Request, response: Response, svc: ServicesDep, caller: CallerDep,
    wait: WaitQuery = 0, idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    """JSON ({"params": {...}, ...}) or multipart/form-data (one field per parameter, files
    for image parameters, plus callback_url / client_task_id / priority / reuse_outputs
    fields)."""
    workflow_at(svc, name)  # before reading a body meant for it
    media_type = _media_type(http_request)
    try:
        if media_type == "multipart/form-data":
            request = await _from_form(http_request, svc.settings.max_upload_bytes)
        elif media_type == "application/json" or media_type.endswith("+json"):
            request = WorkflowJobRequest.model_validate_json(await http_request.body())
        else:
            # A text/plain body used to be read as JSON: a page on another site could send
            # a JSON job that way without the CORS preflight a JSON content type needs.
            raise ApiError(415, "unsupported_media_type",
                           f"the body is {media_type or 'of no stated type'}: send "
                           f"application/json or multipart/form-data")
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    job_request = JobRequest(workflow=name, **request.model_dump())
    job, response.status_code = await _submit(svc, job_request, wait, idempotency_key,
                                              caller=caller)
    return job


def _media_type(http_request: Request) -> str:
    """The request's Content-Type without its parameters, lowercase; "" when there is none."""
    return http_request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def _from_form(http_request: Request, max_bytes: int) -> WorkflowJobRequest:
    try:
        form = await http_request.form(max_part_size=max_bytes)
    except MultiPartException as exc:
        raise ApiError(422, "invalid_request", f"multipart body: {exc.message}") from exc
    params: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            params[key] = await value.read()
        elif key in WorkflowJobRequest.model_fields and key != "params":
            fields[key] = value
        else:
            params[key] = value
    return WorkflowJobRequest.model_validate({**fields, "params": params})


class ComfyServerRequest(BaseModel):
    """The request body of ComfyUI-server, so its users can switch by changing a URL."""

    service_type: str = Field(min_length=1, max_length=200, description="The workflow name")
    client_task_id: str | None = Field(default=None, min_length=1, max_length=200)
    client_callback_url: AnyHttpUrl | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    reuse_outputs: bool | None = Field(default=None, description=REUSE_DESCRIPTION)


@router.post("", status_code=202, summary="Submit a job, ComfyUI-server style")
async def submit_comfy_server_job(
    request: ComfyServerRequest, response: Response, svc: ServicesDep, caller: CallerDep,
    wait: WaitQuery = 0,
) -> dict[str, Any]:
    """With COMFYUI_SERVER_COMPAT (default true), as ComfyUI-server: parameters the workflow
    does not take are ignored (a warning each in the job's `warnings`), and the answer and the
    callback are the job with ComfyUI-server's record fields (`comfyui_task_id`, `s3_key`,
    `comfyui_filepath`, `error_code`, ...), the callback signed as every webhook."""
    compat = svc.settings.comfyui_server_compat
    params, warnings = (known_params(svc.catalog, request.service_type, request.params)
                        if compat else (request.params, []))
    job_request = JobRequest(
        workflow=request.service_type, params=params,
        callback_url=request.client_callback_url, client_task_id=request.client_task_id,
        reuse_outputs=request.reuse_outputs,
    )
    job, response.status_code = await _submit(
        svc, job_request, wait, None, caller=caller, warnings=warnings,
        webhook_format=COMFYUI_SERVER_FORMAT if compat else None)
    return comfyui_server_record(job) if compat else job


async def _submit(
    svc: Services, request: JobRequest, wait: float, idempotency_key: str | None, *,
    caller: Caller, warnings: list[dict[str, Any]] | None = None,
    webhook_format: str | None = None,
) -> tuple[dict[str, Any], int]:
    """The job's object, and the answer's status: 202 for a new job, 200 for a repeat's."""
    job, created, dispatched = await _accept(svc, Submission(
        workflow=request.workflow, params=request.params, api_key_hash=caller.key_hash,
        max_queued=caller.limits.max_queued,
        callback_url=None if request.callback_url is None else str(request.callback_url),
        client_task_id=request.client_task_id, idempotency_key=idempotency_key,
        priority=request.priority, webhook_events=request.webhook_events,
        reuse_outputs=request.reuse_outputs, warnings=warnings, webhook_format=webhook_format))
    status = 202 if created else 200
    if wait > 0 and not JobStatus(job.status).terminal:
        waited = await svc.waiters.wait(job.id, wait, lambda: svc.repository.get(job.id))
        if waited is not None:
            return await svc.render(waited), status
    return await svc.render(job, dispatched=dispatched), status


async def _accept(svc: Services, submission: Submission) -> Accepted:
    try:
        return await accept(svc, submission)
    except BrokenWorkflow as exc:
        raise ApiError(422, "workflow_broken", str(exc), field="workflow") from exc
    except UnknownWorkflow as exc:
        raise ApiError(422, "unknown_workflow", str(exc), field="workflow") from exc
    except refusals.Refused as exc:
        raise _refusal(exc) from exc


def _refusal(refused: refusals.Refused) -> ApiError:
    """The HTTP answer to a submission the intake refused."""
    message = str(refused)
    match refused:
        case refusals.InvalidParams():
            return ApiError(422, "invalid_params", message, params=refused.problems)
        case refusals.ImageTooLarge():
            return ApiError(413, "input_too_large", f"{refused.field}: {message} "
                            f"(MAX_UPLOAD_BYTES)", params={refused.field: message})
        case refusals.IdempotencyConflict() if refused.job_id is not None:
            return ApiError(422, "idempotency_conflict", message, job_id=str(refused.job_id))
        case refusals.IdempotencyConflict():
            return ApiError(422, "idempotency_conflict", message)
        case refusals.BuildFailed():
            # The operator's code failed, not the request: said plainly, never a 5xx.
            return ApiError(422, "workflow_build_failed", message, workflow=refused.workflow)
        case refusals.NoCapableBackend():
            return ApiError(422, "no_capable_backend", message, missing=refused.missing)
        case refusals.StorageUnavailable():
            return ApiError(503, "storage_unavailable", message,
                            headers={"Retry-After": str(refused.retry_after)})
        case refusals.BacklogFull():
            return ApiError(429, "queue_full", message, **refused.details(),
                            retry_after=refused.retry_after,
                            headers={"Retry-After": str(refused.retry_after)})
        case refusals.CallbackNotAllowed():
            return ApiError(422, "callback_url_not_allowed", message, field=refused.field)
    return ApiError(422, "invalid_request", message, field=refused.field)


TimeQuery = Annotated[datetime | None, Query(description=(
    "ISO 8601; without an offset it is UTC"))]


@router.get("/jobs", summary="A page of jobs, newest first")
async def list_jobs(
    request: Request,
    svc: ServicesDep,
    caller: CallerDep,
    status: JobStatus | None = None,
    workflow: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
    tenant: Annotated[str | None, Query(description=(
        "Only the jobs of the key GET /tenants names so (admin keys only)"))] = None,
    created_after: TimeQuery = None,
    created_before: TimeQuery = None,
) -> dict[str, Any]:
    after = decode_cursor(cursor) if cursor else None
    owner = caller.owner_filter
    if tenant is not None:
        owner = await _tenant_digest(request, caller, tenant)
    created = (_utc("created_after", created_after), _utc("created_before", created_before))
    jobs = await svc.repository.page(limit=limit, status=status, workflow=workflow,
                                     after=after, api_key_hash=owner, created=created)
    last = jobs[-1] if len(jobs) == limit else None
    return {
        "jobs": [await svc.render(job) for job in jobs],
        "next_cursor": encode_cursor(last.created_at, last.id) if last else None,
    }


async def _tenant_digest(request: Request, caller: Caller, name: str) -> str:
    if not caller.sees_all:
        raise ApiError(403, "admin_only", "filtering by tenant needs an admin API key",
                       field="tenant")
    guard = request.app.state.guard
    assert isinstance(guard, Guard)
    digest = await guard.digest_of(name)
    if digest is None:
        raise ApiError(422, "unknown_tenant", f"no API key is named {name!r} (GET /tenants)",
                       field="tenant")
    return digest


def _utc(field: str, moment: datetime | None) -> datetime | None:
    """`moment` in UTC (UTC if it has no offset); 422 for a time UTC cannot express."""
    if moment is None:
        return None
    try:
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise ApiError(422, "invalid_time", f"{field} has no UTC equivalent",
                       field=field) from exc


def encode_cursor(created_at: datetime, job_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{job_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created_at, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        # In UTC, as given out: a time in year 1 or 9999 with an offset has no UTC time.
        return datetime.fromisoformat(created_at).astimezone(UTC), uuid.UUID(job_id)
    except (ValueError, OverflowError) as exc:
        raise ApiError(422, "invalid_cursor", "cursor is not one this API gave out",
                       field="cursor") from exc


@router.get("/jobs/{job_id}", summary="One job")
async def get_job(job_id: uuid.UUID, request: Request, svc: ServicesDep, caller: CallerDep
                  ) -> dict[str, Any]:
    """Answered by `JobPoll` (api/job_poll.py, with `job_answer`) unless the request has a
    JSON body to check, or the job id is not a UUID in its canonical form."""
    return await job_answer(request, svc, caller, str(job_id))


async def job_answer(_: Request, svc: Services, caller: Caller, job_id: str) -> dict[str, Any]:
    """`get_job`'s answer for the job `job_id`, a UUID: the status poll of a client waiting
    for its job."""
    job = await visible_job(svc, caller, uuid.UUID(job_id))
    position, eta = await place_and_eta(svc, job)
    return {**await svc.render(job), "queue_position": position, "eta_seconds": eta}


def install_job_poll(app: FastAPI, prefix: str) -> None:
    """`get_job` answered by JobPoll past the app's router and dependency solving. Called
    before the middlewares that must wrap it too are added (each is added outside those
    before it)."""
    app.add_middleware(JobPollRoute, jobs=f"{prefix}/jobs/", poll=JobPoll(app, job_answer))


def install_job_submit(app: FastAPI, prefix: str) -> None:
    """`submit_job` answered by SubmitRoute past the app's router and dependency solving,
    for a body the route would take as it is (as `install_job_poll`)."""
    app.add_middleware(SubmitRoute[JobRequest], jobs=f"{prefix}/jobs", errors=app,
                       body=JobRequest, key_length=IDEMPOTENCY_KEY_LENGTH,
                       answer=_submit_answer)


async def _submit_answer(request: Request, job_request: JobRequest,
                         idempotency_key: str | None) -> Response:
    """`submit_job`'s answer, its dependencies first as FastAPI solves them."""
    caller = await caller_of(request)
    svc = await services(request)
    job, status = await _submit(svc, job_request, 0, idempotency_key, caller=caller)
    return job_response(job, status)


async def _cancel(job_id: uuid.UUID, svc: Services, caller: Caller) -> dict[str, Any]:
    await visible_job(svc, caller, job_id)
    job = await svc.fleet.cancel(job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id}")
    if job.status != JobStatus.CANCELLED:
        raise ApiError(409, "job_finished", f"job {job_id} already ended {job.status}",
                       job_status=job.status)
    return await svc.render(job)


@router.post("/jobs/{job_id}/cancel", summary="Cancel a job")
async def cancel_job(job_id: uuid.UUID, svc: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    """Queued: cancelled at once. On a backend: removed from its queue, or interrupted if
    running. The job ends `cancelled` and its webhook says so."""
    return await _cancel(job_id, svc, caller)


@router.delete("/jobs/{job_id}", summary="Cancel a job (same as POST .../cancel)")
async def delete_job(job_id: uuid.UUID, svc: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    return await _cancel(job_id, svc, caller)
