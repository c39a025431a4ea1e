"""How a request for a catalog workflow becomes a job (DESIGN §2, §3): parameters typed, image
inputs taken, the prompt built, earlier outputs reused when asked, and the job stored once
however often the request is repeated. Nothing is left in storage by a submit that makes no job.
A submission that makes none is refused with an error of intake/errors.py."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Sequence
from typing import Any, NamedTuple, Protocol

from comfyfleet.db import NotStorable
from comfyfleet.egress import UrlNotAllowed, check_url
from comfyfleet.fleet.fleet import Fleet
from comfyfleet.intake import admission, inputs
from comfyfleet.intake.errors import (
    BacklogFull,
    BuildFailed,
    CallbackNotAllowed,
    IdempotencyConflict,
    ImageTooLarge,
    InvalidParams,
    NoCapableBackend,
    StorageUnavailable,
)
from comfyfleet.jobs.models import Job, JobStatus, new_job, reused_outputs, utcnow
from comfyfleet.jobs.repository import BacklogLimits, Dispatch, JobRepository
from comfyfleet.settings import Settings
from comfyfleet.storage import Storage, StorageError
from comfyfleet.workflows.catalog import Catalog, Workflow
from comfyfleet.workflows.params import ParamError
from comfyfleet.workflows.service_functions import BuildError

# What a submit whose input image storage cannot take now tells the client to wait.
STORAGE_RETRY_SECONDS = 5


class Parts(Protocol):
    """The running service's parts the intake works with."""

    settings: Settings
    repository: JobRepository
    storage: Storage
    catalog: Catalog
    fleet: Fleet


class Submission(NamedTuple):
    """A request for a job of the catalog's `workflow`, as the API read it. (A tuple: one is
    made for every submit, and a frozen dataclass set each field through object.__setattr__,
    at four times the cost.)"""

    workflow: str
    params: dict[str, Any]
    api_key_hash: str | None  # of the caller's API key; None without keys
    max_queued: int | None = None  # the caller's key's own backlog limit
    callback_url: str | None = None
    client_task_id: str | None = None
    idempotency_key: str | None = None  # given beside the request (a header)
    priority: int = 0
    webhook_events: Sequence[str] | None = None
    reuse_outputs: bool | None = None  # None: as the workflow says
    warnings: list[dict[str, Any]] | None = None  # stored with a new job
    webhook_format: str | None = None  # stored with a new job


class Accepted(NamedTuple):
    """What became of a submission."""

    # The new job as stored (queued, or ended when reused), dispatched or not since; or the
    # earlier one under the same idempotency key, as read.
    job: Job
    created: bool
    dispatched: bool  # the new job was taken by a backend as it was stored (claim_on_submit)


async def accept(parts: Parts, submission: Submission) -> Accepted:
    """Validate and store the job (or find the earlier one with the same key). Raises the
    catalog's UnknownWorkflow or BrokenWorkflow, and the intake's Refused errors."""
    key = _idempotency_key(submission)
    workflow = parts.catalog.find(submission.workflow)
    try:
        values = workflow.validate(submission.params)
    except ParamError as exc:
        raise InvalidParams(exc.problems) from exc
    callback_url = await _callback_url(parts, submission)
    job_id = uuid.uuid4()
    pictures = await _pictures(parts, workflow, values)
    records = {name: inputs.describe(str(job_id), name, picture)
               for name, picture in pictures.items()}
    prompt = await _prompt(workflow, values, records)
    fingerprint = workflow.fingerprint(inputs.by_content({**values, **records}))
    reuse = workflow.reuse_outputs if submission.reuse_outputs is None \
        else submission.reuse_outputs
    source = await parts.repository.reusable(fingerprint, submission.api_key_hash) \
        if reuse else None
    if source is None:
        _check_capable(parts, prompt)
        records = await _store(parts, job_id, pictures)
    # Built past the model's validation, as the repository builds jobs from its rows
    # (jobs/repository.py `_job`): the values are the intake's own, and Job(...) would only
    # set them more slowly.
    job = new_job(
        id=job_id,
        created_at=utcnow(),
        workflow=workflow.name,
        params={**values, **records},
        prompt=prompt,
        callback_url=callback_url,
        client_task_id=key,
        priority=submission.priority,
        webhook_events=sorted(set(submission.webhook_events or ())) or None,
        api_key_hash=submission.api_key_hash,
        fingerprint=fingerprint,
        warnings=submission.warnings or None,
        webhook_format=submission.webhook_format,
        **(reused_outputs(source) if source is not None else {}),
    )
    # A job that ends as it is stored never joins the backlog.
    backlog = admission.backlog_limits(submission.max_queued, parts.settings.max_queued) \
        if source is None else None
    stored, created = await _insert(parts, job, backlog, records)
    if not created:
        _check_repeat(stored, job, key)
        return Accepted(stored, created=False, dispatched=False)
    if stored.status == JobStatus.QUEUED:  # not dispatched as it was stored
        parts.fleet.job_submitted()
    # Answered as it was stored (queued, or ended when reused), dispatched or not since.
    return Accepted(job, created=True, dispatched=stored.status != job.status)


async def _insert(parts: Parts, job: Job, backlog: BacklogLimits | None,
                  records: dict[str, dict[str, Any]]) -> tuple[Job, bool]:
    """Store `job` (admission's insert), dispatched in its insert's commit when it joins the
    backlog and can be (`claim_on_submit`): the job as stored, or as the claim took it, or
    the earlier one under its idempotency key; the inputs `records` deleted unless a job
    was made or may have been."""
    # The inputs are deleted only when no job was made for sure: after an error whose outcome
    # is unknown (the database gone mid-commit) a leftover file beats a job without its input.
    def store(dispatch: Dispatch | None) -> Awaitable[tuple[Job, bool]]:
        return admission.insert(parts.repository, job, backlog, dispatch=dispatch)

    try:
        stored, created = await (
            parts.fleet.dispatcher.claim_on_submit(job, store)
            if job.status == JobStatus.QUEUED else store(None))
    except (NotStorable, BacklogFull):
        await inputs.discard(parts.storage, records.values())
        raise
    if not created:
        await inputs.discard(parts.storage, records.values())
    return stored, created


def _idempotency_key(submission: Submission) -> str | None:
    header, body = submission.idempotency_key, submission.client_task_id
    if header is not None and body not in (None, header):
        raise IdempotencyConflict("Idempotency-Key and client_task_id differ; send one of them")
    return header if header is not None else body


async def _callback_url(parts: Parts, submission: Submission) -> str | None:
    if submission.callback_url is None:
        return None
    try:
        await check_url(submission.callback_url,
                        allow_private=parts.settings.allow_private_callbacks)
    except UrlNotAllowed as exc:
        raise CallbackNotAllowed(str(exc)) from exc
    return submission.callback_url


async def _pictures(
    parts: Parts, workflow: Workflow, values: dict[str, Any]
) -> dict[str, inputs.ImageInput]:
    """Each image parameter's bytes, fetched or decoded and checked (nothing stored yet)."""
    settings = parts.settings
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
            raise ImageTooLarge(str(exc), name) from exc
        except inputs.InputError as exc:
            raise InvalidParams({name: str(exc)}) from exc
    return pictures


async def _prompt(
    workflow: Workflow, values: dict[str, Any], records: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The prompt to run, image parameters naming their files on the backend."""
    in_prompt = {name: inputs.in_prompt(record) for name, record in records.items()}
    try:
        return await workflow.make_prompt({**values, **in_prompt})
    except BuildError as exc:
        raise BuildFailed(str(exc), workflow.name) from exc


def _check_capable(parts: Parts, prompt: dict[str, Any]) -> None:
    lacking = parts.fleet.missing_everywhere(prompt)
    if lacking is not None:
        raise NoCapableBackend(lacking)


async def _store(
    parts: Parts, job_id: uuid.UUID, pictures: dict[str, inputs.ImageInput]
) -> dict[str, dict[str, Any]]:
    """Keep each image until the dispatcher uploads it to the backend that runs the job."""
    records: dict[str, dict[str, Any]] = {}
    for name, picture in pictures.items():
        try:
            records[name] = await inputs.store(parts.storage, parts.settings.s3_prefix,
                                               str(job_id), name, picture)
        except StorageError as exc:
            await inputs.discard(parts.storage, records.values())
            raise StorageUnavailable(f"cannot keep {name} now: {exc}", name,
                                     STORAGE_RETRY_SECONDS) from exc
    return records


def _check_repeat(existing: Job, job: Job, key: str | None) -> None:
    """A repeat of a stored request is answered with its job; anything else under the same
    key is a conflict. (The stored job is the same caller's, from the same API: that is what
    its key is unique among.)"""
    asked = (job.workflow, inputs.by_content(job.params), job.callback_url, job.priority)
    if (existing.workflow, inputs.by_content(existing.params), existing.callback_url,
            existing.priority) != asked:
        raise IdempotencyConflict(
            f"key {key!r} was used for a different request (job {existing.id})", existing.id)
