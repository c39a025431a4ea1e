"""What the API handlers work with, built once at startup (see app.lifespan)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.fleet.fleet import Fleet
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.jobs.notices import JobNotices
from comfyfleet.jobs.render import job_json
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.jobs.waiters import JobWaiters
from comfyfleet.settings import Settings
from comfyfleet.storage import Storage
from comfyfleet.workflows.catalog import Catalog, load_served_catalog


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    repository: JobRepository
    storage: Storage
    catalog: Catalog
    fleet: Fleet
    waiters: JobWaiters
    events: JobNotices

    async def reload_catalog(self) -> None:
        # The same catalog, with new files: it keeps what the backends reported (the fleet
        # tells it when they do).
        self.catalog.take_files(
            await asyncio.to_thread(load_served_catalog, self.settings.workflows_dir))

    async def render(self, job: Job, *, dispatched: bool = False) -> dict[str, Any]:
        """The job for API answers: what the webhooks say, plus why a queued job waits (none
        for a queued `job` that a backend took since it was read: `dispatched`)."""
        rendered = await job_json(job, self.storage.url)
        rendered["waiting"] = (self.fleet.why_waiting(job.prompt)
                               if job.status == JobStatus.QUEUED and not dispatched else None)
        return rendered

