"""Waiting for a job to end (POST /jobs?wait=...), woken when this process ends it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from comfyfleet.jobs.models import Job, JobStatus

# Another process may end the job: look in the database this often too.
RECHECK_SECONDS = 1.0


class JobWaiters:
    def __init__(self) -> None:
        self._events: dict[uuid.UUID, asyncio.Event] = {}

    def finished(self, job: Job) -> None:
        event = self._events.get(job.id)
        if event is not None:
            event.set()

    async def wait(
        self, job_id: uuid.UUID, seconds: float, load: Callable[[], Awaitable[Job | None]]
    ) -> Job | None:
        """The job once it has ended, or as it is when `seconds` run out."""
        event = self._events.setdefault(job_id, asyncio.Event())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        try:
            while True:
                job = await load()
                remaining = deadline - loop.time()
                if job is None or JobStatus(job.status).terminal or remaining <= 0:
                    return job
                try:
                    async with asyncio.timeout(min(remaining, RECHECK_SECONDS)):
                        await event.wait()
                except TimeoutError:
                    pass
        finally:
            self._events.pop(job_id, None)
