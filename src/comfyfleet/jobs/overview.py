"""What the operator's dashboard shows of the jobs at once: the backlog and the webhook
deliveries in trouble. Aggregates in one statement each, never a query per row."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from comfyfleet.db import single_statements
from comfyfleet.jobs.deliveries import Delivery, DeliveryStatus
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.jobs.repository import UNFINISHED_STATES

# Dead or failed for good, or pending after a failed attempt. Literal values, not bound ones:
# so the planner knows that the partial index webhook_deliveries_troubled covers them.
TROUBLED = text(
    f"webhook_deliveries.status IN ('{DeliveryStatus.DEAD}', '{DeliveryStatus.FAILED}') OR "
    f"(webhook_deliveries.status = '{DeliveryStatus.PENDING}' AND webhook_deliveries.attempts > 0)")


# Literal too: with bound values the generic plan guesses that most jobs match, and reads them
# all; with these, it counts the unfinished jobs from the partial indexes that hold only them.
UNFINISHED = text("jobs.status IN ({})".format(
    ", ".join(f"'{state}'" for state in sorted(UNFINISHED_STATES))))


@dataclass(frozen=True)
class WorkflowBacklog:
    workflow: str
    # Jobs per unfinished status (queued, dispatched, running, uploading).
    counts: dict[str, int]
    oldest_queued_at: datetime | None


class Overview:
    def __init__(self, engine: AsyncEngine) -> None:
        self._statements = single_statements(engine)

    async def backlog(self, api_key_hash: str | None = None) -> list[WorkflowBacklog]:
        """The unfinished jobs by workflow, most queued first; with `api_key_hash`, only the
        jobs of that key."""
        query = (
            select(col(Job.workflow), col(Job.status), func.count(), func.min(Job.created_at))
            .where(UNFINISHED)
            .group_by(col(Job.workflow), col(Job.status))
        )
        if api_key_hash is not None:
            query = query.where(col(Job.api_key_hash) == api_key_hash)
        async with self._statements() as session:
            rows = (await session.exec(query)).all()
        counts: dict[str, dict[str, int]] = {}
        oldest: dict[str, datetime] = {}
        for workflow, status, count, first in rows:
            counts.setdefault(workflow, {})[status] = count
            if status == JobStatus.QUEUED:
                oldest[workflow] = first
        found = [WorkflowBacklog(workflow, by_status, oldest.get(workflow))
                 for workflow, by_status in counts.items()]
        return sorted(found, key=lambda entry: (-entry.counts.get(JobStatus.QUEUED, 0),
                                                entry.workflow))

    async def troubled_deliveries(
        self, limit: int, api_key_hash: str | None = None
    ) -> list[Delivery]:
        """Deliveries that are dead or failed for good, or pending after a failed attempt;
        newest first. With `api_key_hash`, only those of that key's jobs."""
        query = (
            select(Delivery)
            .where(TROUBLED)
            .order_by(col(Delivery.created_at).desc())
            .limit(limit)
        )
        if api_key_hash is not None:
            query = query.join(Job, col(Job.id) == col(Delivery.job_id)).where(
                col(Job.api_key_hash) == api_key_hash)
        async with self._statements() as session:
            return list((await session.exec(query)).all())
