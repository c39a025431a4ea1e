"""Webhook delivery of a job's terminal state, in the Standard Webhooks format (DESIGN §5).

This is one attempt per event, off the job's own path so a slow receiver delays nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp

from comfyfleet.jobs.models import Job
from comfyfleet.webhooks.signing import signed_headers

log = logging.getLogger(__name__)

_EVENT_IDS = uuid.UUID("4b2f8e1c-62a3-4c55-9d2e-6f1c0b7a9e31")
RESPONSE_SNIPPET_BYTES = 1024


def event_id(job: Job, event_type: str) -> str:
    """Stable for a job's event, so a receiver can deduplicate retries by `webhook-id`."""
    return "msg_" + uuid.uuid5(_EVENT_IDS, f"{job.id}:{event_type}").hex


class WebhookSender:
    def __init__(
        self,
        secret: str,
        render: Callable[[Job], Awaitable[dict[str, Any]]],
        timeout: float = 15.0,
    ) -> None:
        self._secret = secret
        self._render = render
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._http = aiohttp.ClientSession()
        self._pending: set[asyncio.Task[None]] = set()

    def job_finished(self, job: Job) -> None:
        if job.callback_url:
            task = asyncio.create_task(self._send(job, job.callback_url))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _send(self, job: Job, url: str) -> None:
        event_type = f"job.{job.status}"
        event = {
            "type": event_type,
            "timestamp": datetime.now(UTC).isoformat(),
            "data": await self._render(job),
        }
        body = json.dumps(event, separators=(",", ":"))
        headers = signed_headers(self._secret, event_id(job, event_type), body)
        try:
            async with self._http.post(
                url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as response:
                snippet = await response.content.read(RESPONSE_SNIPPET_BYTES)
                level = logging.INFO if 200 <= response.status < 300 else logging.WARNING
                log.log(level, "webhook %s for job %s: HTTP %s %r", event_type, job.id,
                        response.status, snippet[:200])
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("webhook %s for job %s failed: %r", event_type, job.id, exc)

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=self._timeout.total)
        await self._http.close()
