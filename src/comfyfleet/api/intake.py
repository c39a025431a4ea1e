"""How a job request becomes a job (DESIGN §2, §3): parameters typed, image inputs taken, the
prompt built, earlier outputs reused when asked, and the job stored once however often the
request is repeated. Nothing is left in storage by a submit that makes no job."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, Field

from comfyfleet.api.errors import ApiError
from comfyfleet.api.security import Caller
from comfyfleet.db import NotStorable
from comfyfleet.egress import UrlNotAllowed, check_url
from comfyfleet.intake import inputs
from comfyfleet.intake.admission import backlog_limits, refusal, retry_after
from comfyfleet.jobs.models import Job, reused_outputs
from comfyfleet.jobs.repository import QueueFull, Tenant
from comfyfleet.services import Services
from comfyfleet.storage import StorageError
from comfyfleet.workflows.catalog import BrokenWorkflow, UnknownWorkflow, Workflow
from comfyfleet.workflows.params import ParamError
from comfyfleet.workflows.service_functions import BuildError

REUSE_DESCRIPTION = (
    "true: when this API key already ran the same workflow with the same parameters and input "
    "bytes, answer at once with a new job holding those outputs; false: always run; unset: "
    "as the workflow says (its sidecar's reuse_outputs)")

# What a submit whose input image storage cannot take now tells the client to wait.
STORAGE_RETRY_SECONDS = 5


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


async def accept(
    svc: Services, request: JobRequest, idempotency_key: str | None, caller: Caller, *,
    warnings: list[dict[str, Any]] | None = None, webhook_format: str | None = None,
) -> tuple[Job, bool]:
    """Validate and store the job (or find the earlier one with the same key); returns it and
    whether it was created. `warnings` and `webhook_format` are stored with a new job."""
    key = _idempotency_key(request, idempotency_key)
    workflow = _workflow(svc, request.workflow)
    try:
        values = workflow.validate(request.params)
    except ParamError as exc:
        raise ApiError(422, "invalid_params", f"invalid parameters: {exc}",
                       params=exc.problems) from exc
    callback_url = await _callback_url(svc, request)
    job_id = uuid.uuid4()
    pictures = await _pictures(svc, workflow, values)
    records = {name: inputs.describe(str(job_id), name, picture)
               for name, picture in pictures.items()}
    prompt = await _prompt(workflow, values, records)
    fingerprint = workflow.fingerprint(inputs.by_content({**values, **records}))
    reuse = workflow.reuse_outputs if request.reuse_outputs is None else request.reuse_outputs
    source = await svc.repository.reusable(fingerprint, caller.key_hash) if reuse else None
    if source is None:
        _check_capable(svc, prompt)
        records = await _store(svc, job_id, pictures)
    job = Job(
        id=job_id,
        workflow=workflow.name,
        params={**values, **records},
        prompt=prompt,
        callback_url=callback_url,
        client_task_id=key,
        priority=request.priority,
        webhook_events=sorted(set(request.webhook_events or ())) or None,
        api_key_hash=caller.key_hash,
        fingerprint=fingerprint,
        warnings=warnings or None,
        webhook_format=webhook_format,
        **(reused_outputs(source) if source is not None else {}),
    )
    # A job that ends as it is stored never joins the backlog.
    backlog = backlog_limits(caller.limits.max_queued, svc.settings.max_queued) \
        if source is None else None
    # The inputs are deleted only when no job was made for sure: after an error whose outcome
    # is unknown (the database gone mid-commit) a leftover file beats a job without its input.
    try:
        stored, created = await svc.repository.insert(job, backlog=backlog)
    except NotStorable:
        await inputs.discard(svc.storage, records.values())
        raise
    except QueueFull as exc:
        await inputs.discard(svc.storage, records.values())
        raise await _queue_full(svc, exc, caller) from exc
    if not created:
        await inputs.discard(svc.storage, records.values())
        _check_repeat(stored, job, key, caller)
    return stored, created


async def _queue_full(svc: Services, full: QueueFull, caller: Caller) -> ApiError:
    seconds = await retry_after(svc.repository, full, Tenant(caller.key_hash))
    return ApiError(429, "queue_full", refusal(full, seconds),
                    scope=full.scope, queued=full.queued, limit=full.limit,
                    retry_after=seconds, headers={"Retry-After": str(seconds)})


def _idempotency_key(request: JobRequest, header: str | None) -> str | None:
    if header is not None and request.client_task_id not in (None, header):
        raise ApiError(422, "idempotency_conflict",
                       "Idempotency-Key and client_task_id differ; send one of them")
    return header if header is not None else request.client_task_id


def _workflow(svc: Services, name: str) -> Workflow:
    try:
        return svc.catalog.find(name)
    except BrokenWorkflow as exc:
        raise ApiError(422, "workflow_broken", str(exc), field="workflow") from exc
    except UnknownWorkflow as exc:
        raise ApiError(422, "unknown_workflow", str(exc), field="workflow") from exc


async def _callback_url(svc: Services, request: JobRequest) -> str | None:
    if request.callback_url is None:
        return None
    callback_url = str(request.callback_url)
    try:
        await check_url(callback_url, allow_private=svc.settings.allow_private_callbacks)
    except UrlNotAllowed as exc:
        raise ApiError(422, "callback_url_not_allowed", str(exc), field="callback_url") from exc
    return callback_url


async def _pictures(
    svc: Services, workflow: Workflow, values: dict[str, Any]
) -> dict[str, inputs.ImageInput]:
    """Each image parameter's bytes, fetched or decoded and checked (nothing stored yet)."""
    settings = svc.settings
    pictures = {}
    for name in workflow.image_params:
        value = values.get(name)
        try:
            if isinstance(value, bytes):  # a multipart upload
                pictures[name] = inputs.image(value, max_pixels=settings.max_image_pixels)
            elif isinstance(value, str):
                pictures[name] = await inputs.resolve(
                    value, max_bytes=settings.max_upload_bytes,
                    max_pixels=settings.max_image_pixels,
                    allow_private=settings.allow_private_callbacks,
                    fetch_seconds=settings.input_url_timeout)
        except inputs.InputTooLarge as exc:
            raise ApiError(413, "input_too_large", f"{name}: {exc} (MAX_UPLOAD_BYTES)",
                           params={name: str(exc)}) from exc
        except inputs.InputError as exc:
            raise ApiError(422, "invalid_params", f"invalid parameters: {name}: {exc}",
                           params={name: str(exc)}) from exc
    return pictures


async def _prompt(
    workflow: Workflow, values: dict[str, Any], records: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The prompt to run, image parameters naming their files on the backend."""
    in_prompt = {name: inputs.in_prompt(record) for name, record in records.items()}
    try:
        return await workflow.make_prompt({**values, **in_prompt})
    except BuildError as exc:
        # The operator's code failed, not the request: said plainly, never a 5xx.
        raise ApiError(422, "workflow_build_failed", str(exc), workflow=workflow.name) from exc


def _check_capable(svc: Services, prompt: dict[str, Any]) -> None:
    lacking = svc.fleet.missing_everywhere(prompt)
    if lacking is not None:
        everything = sorted({piece for pieces in lacking.values() for piece in pieces})
        raise ApiError(422, "no_capable_backend",
                       f"no backend can run this job; missing: {', '.join(everything)}",
                       missing=lacking)


async def _store(
    svc: Services, job_id: uuid.UUID, pictures: dict[str, inputs.ImageInput]
) -> dict[str, dict[str, Any]]:
    """Keep each image until the dispatcher uploads it to the backend that runs the job."""
    records: dict[str, dict[str, Any]] = {}
    for name, picture in pictures.items():
        try:
            records[name] = await inputs.store(svc.storage, svc.settings.s3_prefix,
                                               str(job_id), name, picture)
        except StorageError as exc:
            await inputs.discard(svc.storage, records.values())
            raise ApiError(503, "storage_unavailable", f"cannot keep {name} now: {exc}",
                           headers={"Retry-After": str(STORAGE_RETRY_SECONDS)}) from exc
    return records


def _check_repeat(existing: Job, job: Job, key: str | None, caller: Caller) -> None:
    """A repeat of a stored request is answered with its job; anything else under the same
    key is a conflict."""
    if existing.api_key_hash != caller.key_hash:
        # Taken by another key: say so without showing that key's job.
        raise ApiError(422, "idempotency_conflict", f"key {key!r} is used by another API key")
    asked = (job.workflow, inputs.by_content(job.params), job.callback_url, job.priority)
    if (existing.workflow, inputs.by_content(existing.params), existing.callback_url,
            existing.priority) != asked:
        raise ApiError(422, "idempotency_conflict",
                       f"key {key!r} was used for a different request (job {existing.id})",
                       job_id=str(existing.id))
