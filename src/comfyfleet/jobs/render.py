"""The job as clients see it, in API responses and webhooks (DESIGN §2)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from comfyfleet.jobs.models import Job

UrlFor = Callable[[str], Awaitable[str | None]]
# The webhook body of most jobs: {"type", "timestamp", "data": <job>} (DESIGN §5).
STANDARD_WEBHOOKS = "standard"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


async def job_json(job: Job, url_for: UrlFor) -> dict[str, Any]:
    outputs = []
    for output in job.outputs:
        key = output.get("key")
        url = await url_for(key) if isinstance(key, str) else None
        outputs.append({**output, "url": url})
    return {
        "id": str(job.id),
        "client_task_id": job.client_task_id,
        "workflow": job.workflow,
        "params": job.params,
        "status": job.status,
        "progress": job.progress,
        "priority": job.priority,
        "callback_url": job.callback_url,
        "backend": job.backend,
        "prompt_id": job.prompt_id,
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "dispatched_at": _iso(job.dispatched_at),
        "started_at": _iso(job.started_at),
        "uploading_at": _iso(job.uploading_at),
        "finished_at": _iso(job.finished_at),
        "outputs": outputs,
        "error": job.error,
        "reused_from": str(job.reused_from) if job.reused_from is not None else None,
        "warnings": job.warnings or [],
        "webhook_format": job.webhook_format or STANDARD_WEBHOOKS,
    }
