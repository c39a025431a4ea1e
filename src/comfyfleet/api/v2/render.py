"""A comfyfleet job as the Comfy API v2 Job object: states mapped, a progress snapshot, each
output as an asset with its URL, the error, follow-up links, timestamps and metrics."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Request
from starlette.datastructures import URL

from comfyfleet.jobs.models import Job, JobStatus, utcnow
from comfyfleet.services import Services

PREFIX = "/api/v2"  # where api.v2 is mounted

# Dispatched is still waiting to start (on its backend now, first in line); uploading is the
# end of the run (outputs going to storage).
STATUSES = {
    JobStatus.QUEUED: "queued",
    JobStatus.DISPATCHED: "queued",
    JobStatus.RUNNING: "running",
    JobStatus.UPLOADING: "running",
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "canceled",
}
TERMINAL = frozenset({"succeeded", "failed", "canceled", "expired"})
# Jobs are kept until an operator removes them: no retention deadline.
NEVER = datetime.max.replace(tzinfo=UTC).isoformat()


def origin(request: Request) -> str:
    """Scheme and host the client reached us at: where the absolute URLs point. As the
    request's URL has them (`request.url`), from the few parts of the request they are made
    of, not from its whole URL made and parsed again at each submit and poll (40 us)."""
    scope = request.scope
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    server = scope.get("server")
    return _origin(scope.get("scheme", "http"), host,
                   tuple(server) if server is not None else None)


@functools.lru_cache(maxsize=64)  # a Host header is the client's: a bounded few kept
def _origin(scheme: str, host: bytes | None, server: tuple[str, int] | None) -> str:
    url = URL(scope={"scheme": scheme, "server": server, "path": "/", "query_string": b"",
                     "headers": [] if host is None else [(b"host", host)]})
    return f"{url.scheme}://{url.netloc}"


def status_of(job: Job) -> str:
    return STATUSES[JobStatus(job.__dict__["status"])]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _ms(start: datetime | None, end: datetime | None) -> int | None:
    return round((end - start).total_seconds() * 1000) if start and end else None


def output_id(job: Job, index: int) -> str:
    """An output's asset id: its job and its place among the job's outputs."""
    return f"{job.id}.{index}"


def progress(job: Job) -> dict[str, Any]:
    """Nodes done out of all, from the fraction the tracker records ((nodes finished + the
    running node's step fraction) / nodes), and while it runs, the node running and its step
    out of how many."""
    fields = job.__dict__  # as `job_object` reads them
    status = fields["status"]
    total = max(len(fields["prompt"]), 1)
    value = 1.0 if status == JobStatus.SUCCEEDED else fields["progress"]
    done = min(int(value * total + 1e-9), total)
    detail = fields["progress_detail"] if status == JobStatus.RUNNING else None
    node, class_type, step, steps = (
        (detail.get("node"), detail.get("class_type"), detail.get("step"), detail.get("steps"))
        if detail else (None, None, None, None))
    if class_type is not None and steps is not None:
        message = f"{class_type} {step}/{steps}"
    elif class_type is not None:
        message = f"{class_type}, node {done + 1} of {total}"
    else:
        message = f"{done}/{total} nodes"
    return {"value": value, "nodes_done": done, "nodes_total": total, "current_node": node,
            "current_node_class": class_type, "step": step, "steps": steps,
            "message": message}


def _kind(content_type: str) -> str:
    major = content_type.split("/", 1)[0]
    return major if major in ("image", "video", "audio", "text") else "file"


async def outputs(svc: Services, job: Job, base_url: str) -> list[dict[str, Any]]:
    rendered = []
    for index, output in enumerate(job.__dict__["outputs"]):  # as `job_object` reads them
        asset_id = output_id(job, index)
        key = output.get("key")
        signed = None
        if isinstance(key, str):
            content_type = str(output.get("content_type") or "application/octet-stream")
            name = str(output.get("filename") or key.rsplit("/", 1)[-1])
            size = int(output.get("size") or 0)
            kind = "latent" if name.endswith(".latent") else _kind(content_type)
            signed = await svc.storage.signed_url(key)
        else:
            content_type, kind = "text/plain; charset=utf-8", "text"
            name = f"{output.get('node_id')}_{index}.txt"
            size = len(str(output.get("text", "")).encode())
        # A URL of the API's own (/content) signs afresh when it is fetched.
        expires = (signed.expires_at if signed is not None
                   else utcnow() + timedelta(seconds=svc.settings.s3_url_ttl))
        rendered.append({
            "node_id": str(output.get("node_id")), "name": name, "type": kind,
            "content_type": content_type, "size_bytes": size, "id": asset_id, "hash": None,
            "url": signed.url if signed is not None
            else f"{base_url}{PREFIX}/assets/{asset_id}/content",
            "url_expires_at": expires.isoformat(), "job_id": str(job.id),
        })
    return rendered


def error(job: Job) -> dict[str, Any] | None:
    failure = job.__dict__["error"]  # as `job_object` reads it
    if failure is None:
        return None
    code, message = failure.get("type"), failure.get("message")
    node_id, class_type = failure.get("node_id"), failure.get("node_type")
    details = failure.get("details")
    traceback = details.get("traceback") if isinstance(details, dict) else None
    if isinstance(traceback, list):
        traceback = "".join(str(line) for line in traceback)
    if code == "prompt_rejected" and isinstance(details, dict) and details:
        # The backend's node_errors: the first node it names, and what it said of it.
        node_id, node = next(iter(details.items()))
        if isinstance(node, dict):
            class_type = node.get("class_type")
            said = [f"{e.get('message')}: {e.get('details')}" for e in node.get("errors", [])
                    if isinstance(e, dict)]
            message = "; ".join([str(message), *said])
    return {
        "code": "canceled" if code == "cancelled" else code,
        "message": message,
        "node_id": node_id,
        "class_type": class_type,
        "traceback": traceback if isinstance(traceback, str) else None,
    }


async def queue_position(svc: Services, job: Job) -> int | None:
    """1 for the job the next free slot takes; 0 once it is on its backend, waiting there."""
    status = job.__dict__["status"]  # as `job_object` reads it
    if status == JobStatus.QUEUED:
        return await svc.repository.queue_position(job)
    return 0 if status == JobStatus.DISPATCHED else None


async def job_object(svc: Services, job: Job, base_url: str) -> dict[str, Any]:
    """The 201 of a submit and every poll's answer. The job's fields read from its
    `__dict__`, as jobs/render.py's `job_json` reads them (where every model keeps them, the
    ORM's loads too, never expired here): each through the ORM's attribute was a third of
    this."""
    fields = job.__dict__
    created, started, finished = fields["created_at"], fields["started_at"], fields["finished_at"]
    url = f"{PREFIX}/jobs/{fields['id']}"
    return {
        "id": str(fields["id"]),
        "status": status_of(job),
        "created_at": _iso(created),
        "started_at": _iso(started),
        "completed_at": _iso(finished),
        "expires_at": NEVER,
        "queue_position": await queue_position(svc, job),
        "progress": progress(job),
        "outputs": await outputs(svc, job, base_url),
        "error": error(job),
        "metrics": {"queue_ms": _ms(created, fields["dispatched_at"] or finished),
                    "execution_ms": _ms(started, finished)},
        "urls": {"self": url, "events": f"{url}/events", "cancel": f"{url}/cancel"},
        "metadata": fields["labels"] or {},
    }
