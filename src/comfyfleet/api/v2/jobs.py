"""Comfy API v2 jobs: submit a verbatim API-format graph, read, list, cancel, follow (SSE).
Thin: a v2 job is a comfyfleet job, run by the same dispatcher, tracker and collector."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, SecretStr
from sse_starlette import EventSourceResponse, ServerSentEvent

from comfyfleet import db, json_codec
from comfyfleet.api.depends import ServicesDep, services
from comfyfleet.api.job_poll import job_response
from comfyfleet.api.jobs import decode_cursor, encode_cursor
from comfyfleet.api.security import Caller, CallerDep, caller_of, visible_job
from comfyfleet.api.v2 import render
from comfyfleet.api.v2.assets import asset_store
from comfyfleet.api.v2.errors import V2Error
from comfyfleet.api.v2.idempotency import IdempotencyKey
from comfyfleet.intake.admission import backlog_limits
from comfyfleet.intake.errors import (
    BacklogFull,
    IdempotencyConflict,
    InvalidLabels,
    KeyInFlight,
    MissingAsset,
)
from comfyfleet.intake.graph_jobs import GraphRequest, accept_graph
from comfyfleet.intake.graphs import InvalidGraph, UiFormatGraph
from comfyfleet.jobs.extra_data import ExtraData
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.jobs.notices import LogLine, Notice, PreviewImage
from comfyfleet.services import Services

router = APIRouter(tags=["jobs"])
public = APIRouter(tags=["health"])

# The header of an answer to a repeat of an idempotency key: the job it first created.
REPLAYED = "Idempotency-Replayed"
# A queued job's position moves with every other job dispatched or cancelled: its event stream
# reads it again on any job's change, at most this often.
QUEUED_REREAD_SECONDS = 1.0
PING_SECONDS = 15
# The statuses of the v2 contract and the job states each stands for.
V2_STATUSES = {v2: [ours for ours, mapped in render.STATUSES.items() if mapped == v2]
               for v2 in set(render.STATUSES.values())}


class ExtraDataRequest(BaseModel):
    """The contract's closed extra_data: the Comfy API key partner (API) nodes authenticate
    with, which the SDK's `submit(..., api_key=...)` sends. A secret: no repr shows it."""

    model_config = ConfigDict(extra="forbid")
    api_key_comfy_org: SecretStr


class JobRequest(BaseModel):
    workflow: Any
    metadata: dict[str, Any] | None = None
    # Passed to ComfyUI with the prompt and never stored: held in this process's memory,
    # which alone sends the job (jobs/extra_data.py).
    extra_data: ExtraDataRequest | None = None
    # Reserved by the contract for later, and refused until then.
    webhook_url: Any = None
    inputs: Any = None


@router.post("/jobs", status_code=201, summary="Submit an API-format workflow graph")
async def submit_job(
    body: JobRequest, request: Request, response: Response, svc: ServicesDep,
    caller: CallerDep, idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    """Answered by SubmitRoute (api/job_submit.py, with `submit_answer`) for a body it would
    take as it is."""
    job, created = await _submit(request, svc, caller, body, idempotency_key)
    if not created:
        response.headers[REPLAYED] = "true"
    return job


async def submit_answer(request: Request, body: JobRequest, idempotency_key: str | None
                        ) -> Response:
    """`submit_job`'s answer, its dependencies first as FastAPI solves them."""
    caller = await caller_of(request)
    svc = await services(request)
    job, created = await _submit(request, svc, caller, body, idempotency_key)
    answer = job_response(job, 201)
    if not created:
        answer.headers[REPLAYED] = "true"
    return answer


async def _submit(request: Request, svc: Services, caller: Caller, body: JobRequest,
                  idempotency_key: str | None) -> tuple[dict[str, Any], bool]:
    """The submitted job's object, and whether the job is new (not a repeat's)."""
    for reserved in ("webhook_url", "inputs"):
        if reserved in body.model_fields_set:
            raise V2Error(422, "invalid_request",
                          f"{reserved} is reserved for a later version of the API and refused "
                          f"until then", details={"field": reserved})
    extra_data = None if body.extra_data is None else ExtraData(
        {"api_key_comfy_org": body.extra_data.api_key_comfy_org.get_secret_value()})
    try:
        job, created = await accept_graph(
            svc.repository, asset_store(svc), svc.fleet.reported_capabilities(),
            GraphRequest(body.workflow, body.metadata, idempotency_key, caller.key_hash,
                         caller.callback_url, extra_data),
            backlog=backlog_limits(caller.limits.max_queued, svc.settings.max_queued),
            held=svc.fleet.extra_data, claim_on_submit=svc.fleet.dispatcher.claim_on_submit)
    except UiFormatGraph as exc:
        raise V2Error(422, "workflow_format_ui", str(exc)) from exc
    except InvalidGraph as exc:
        details = {"node_errors": {node: [p.as_dict() for p in problems]
                                   for node, problems in exc.node_errors.items()},
                   **exc.details}
        raise V2Error(422, "invalid_workflow", str(exc), details=details) from exc
    except InvalidLabels as exc:
        raise V2Error(422, "metadata_invalid", str(exc),
                      details=None if exc.key is None else {"key": exc.key}) from exc
    except MissingAsset as exc:
        raise V2Error(422, "missing_asset", str(exc),
                      details={"node_id": exc.node_id, "field": exc.field}) from exc
    except IdempotencyConflict as exc:
        raise V2Error(422, "idempotency_key_reuse", str(exc)) from exc
    except KeyInFlight as exc:
        raise V2Error(409, "idempotency_conflict", str(exc),
                      headers={"Retry-After": str(exc.retry_after)}) from exc
    except BacklogFull as exc:
        raise V2Error(429, "queue_full", str(exc), details=exc.details(),
                      headers={"Retry-After": str(exc.retry_after)}) from exc
    if created and job.status == JobStatus.QUEUED:  # not dispatched as it was stored
        svc.fleet.job_submitted()
    return await render.job_object(svc, job, render.origin(request)), created


async def _job(svc: Services, caller: Caller, job_id: str, *, prompt: bool = False) -> Job:
    """Without `prompt`, the job's prompt holds its node ids only (JobRepository.shown): the
    v2 job object shows no more of it than how many nodes it has."""
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        raise V2Error(404, "not_found", f"no job {job_id}") from None
    # The v2 job object has no client_task_id: a job this process ended is not read again
    # (a status poll's last read, the one that sees the end, is on the job's way to its client).
    return await visible_job(svc, caller, parsed, ended_here=True, prompt=prompt)


@router.get("/jobs/{job_id}", summary="One job")
async def get_job(job_id: str, request: Request, svc: ServicesDep, caller: CallerDep
                  ) -> dict[str, Any]:
    """Answered by `JobPoll` (api/job_poll.py, with `job_answer`) unless the request has a
    JSON body to check."""
    return await job_answer(request, svc, caller, job_id)


async def job_answer(request: Request, svc: Services, caller: Caller, job_id: str
                     ) -> dict[str, Any]:
    """`get_job`'s answer: the contract's poll-first path, polled every few milliseconds."""
    return await render.job_object(svc, await _job(svc, caller, job_id), render.origin(request))


@router.get("/jobs/{job_id}/workflow", summary="The graph a job runs")
async def get_job_workflow(job_id: str, svc: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    job = await _job(svc, caller, job_id, prompt=True)
    return {"workflow": job.prompt, "format": "api"}


@router.post("/jobs/{job_id}/cancel", summary="Cancel a job")
async def cancel_job(job_id: str, request: Request, svc: ServicesDep, caller: CallerDep
                     ) -> dict[str, Any]:
    """Queued: canceled at once; on a backend: removed from its queue, or interrupted.
    A job that already ended is returned as it ended."""
    job = await _job(svc, caller, job_id)
    cancelled = await svc.fleet.cancel(job.id)
    if cancelled is None:
        raise V2Error(404, "not_found", f"no job {job_id}")
    return await render.job_object(svc, cancelled, render.origin(request))


@router.get("/jobs", summary="A page of jobs, newest first")
async def list_jobs(
    request: Request, svc: ServicesDep, caller: CallerDep,
    status: Annotated[str | None, Query(description="a v2 job status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    """`metadata[<key>]=<value>` query parameters keep the jobs having all those labels."""
    states = None
    if status is not None:
        if status not in V2_STATUSES:
            raise V2Error(422, "invalid_request", f"status must be one of "
                          f"{', '.join(sorted(V2_STATUSES))}", details={"field": "status"})
        states = V2_STATUSES[status]
    labels = {key[len("metadata["):-1]: value for key, value in request.query_params.items()
              if key.startswith("metadata[") and key.endswith("]")}
    jobs = await svc.repository.page(
        limit=limit, status=states, after=decode_cursor(cursor) if cursor else None,
        api_key_hash=caller.owner_filter, labels=labels or None)
    last = jobs[-1] if len(jobs) == limit else None
    page: dict[str, Any] = {"jobs": [_summary(job) for job in jobs]}
    if last is not None:
        page["next_cursor"] = encode_cursor(last.created_at, last.id)
    return page


def _summary(job: Job) -> dict[str, Any]:
    changed = job.finished_at or job.started_at or job.dispatched_at or job.created_at
    url = f"{render.PREFIX}/jobs/{job.id}"
    return {"id": str(job.id), "status": render.status_of(job),
            "create_time": job.created_at.isoformat(), "update_time": changed.isoformat(),
            "metadata": job.labels or {},
            "urls": {"self": url, "events": f"{url}/events", "cancel": f"{url}/cancel"}}


@router.get("/jobs/{job_id}/events", summary="A job's live state as Server-Sent Events",
            response_class=EventSourceResponse)
async def job_events(job_id: str, request: Request, svc: ServicesDep, caller: CallerDep
                     ) -> EventSourceResponse:
    """On connect the current `status`, `progress`, the outputs committed so far and the
    latest `preview` (when it reached this process); then every change, each output as it is
    committed (`output`, while the job runs: a node's files are stored as soon as it reports
    them), live `preview` images, and `log` lines of the job's execution on its backend (its
    start, the nodes its cache served, an error with its traceback, an interruption, the time
    it took: best-effort, as the contract says, told only while they happen and only by the
    gateway process following the job); the stream ends after the terminal `status`. Not a
    replayable log: the job itself (GET) is the authority."""
    job = await _job(svc, caller, job_id)
    return EventSourceResponse(_stream(svc, job.id, render.origin(request)), ping=PING_SECONDS)


async def _stream(svc: Services, job_id: uuid.UUID, origin: str
                  ) -> AsyncIterator[ServerSentEvent]:
    notices = svc.events.listen(job_id)
    told_status: tuple[str, int | None] | None = None
    told_progress: dict[str, Any] | None = None
    told_outputs = 0
    latest = svc.events.latest_preview(job_id)  # told on connect, after the status
    loop = asyncio.get_running_loop()
    job: Job | None = None
    try:
        while True:
            jobs_changed = svc.events.any_job.next()  # taken before the read (pulse.py)
            read_at = loop.time()
            job = await svc.repository.reread(job_id, job)  # whole the first time
            if job is None:
                return
            status = render.status_of(job)
            if status in render.TERMINAL:
                for output in (await render.outputs(svc, job, origin))[told_outputs:]:
                    yield _event("output", output)
                yield _event("status", {"status": status, "queue_position": None})
                return
            position = await render.queue_position(svc, job)
            if (status, position) != told_status:
                told_status = (status, position)
                yield _event("status", {"status": status, "queue_position": position})
            snapshot = render.progress(job)
            if snapshot != told_progress:
                told_progress = snapshot
                yield _event("progress", snapshot)
            # Each output once, as it is committed (those stored while the job runs come
            # first among its outputs, in the order they came).
            if len(job.outputs) > told_outputs:
                for output in (await render.outputs(svc, job, origin))[told_outputs:]:
                    yield _event("output", output)
                told_outputs = len(job.outputs)
            if latest is not None:
                yield _preview_event(latest)
                latest = None
            # Previews and log lines as they come, until the job changes here or another
            # process says that its jobs changed (peers.py); a queued job's also when any
            # other job changed, for its position.
            others = (jobs_changed, read_at + QUEUED_REREAD_SECONDS) if position else None
            while (notice := await _next_notice(notices, others)) is not None:
                yield (_preview_event(notice) if isinstance(notice, PreviewImage)
                       else _event("log", {"level": notice.level, "message": notice.message}))
    finally:
        svc.events.stop(job_id, notices)


async def _next_notice(notices: asyncio.Queue[Notice],
                       others: tuple[asyncio.Event, float] | None
                       ) -> PreviewImage | LogLine | None:
    """The next preview image or log line; None once the job changed, or with `others` (an
    event and a time) once the event is set, not before that time."""
    if others is None:
        return await notices.get()
    changed, not_before = others
    told = asyncio.ensure_future(notices.get())
    moved = asyncio.ensure_future(_set_not_before(changed, not_before))
    try:
        await asyncio.wait((told, moved), return_when=asyncio.FIRST_COMPLETED)
    finally:
        moved.cancel()
        if not told.done():
            told.cancel()  # a get cancelled before it took an item loses none
    return told.result() if told.done() and not told.cancelled() else None


async def _set_not_before(event: asyncio.Event, when: float) -> None:
    await event.wait()
    await asyncio.sleep(max(0.0, when - asyncio.get_running_loop().time()))


def _preview_event(preview: PreviewImage) -> ServerSentEvent:
    return _event("preview", {
        "node_id": preview.node_id or "", "content_type": preview.image_type,
        "data_base64": base64.b64encode(preview.image).decode()})


def _event(name: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(json_codec.dumps_text(data), event=name)


@public.get("/health", summary="The gateway and its fleet")
async def health(svc: ServicesDep) -> JSONResponse:
    database = await db.ping(svc.engine)
    backends = {s.name: s.connected for s in svc.fleet.sessions}
    healthy = database and (not backends or any(backends.values()))
    return JSONResponse({"status": "healthy" if healthy else "unhealthy", "database": database,
                         "backends": backends}, status_code=200 if healthy else 503)
