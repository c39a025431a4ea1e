"""What the operator's dashboard shows of the jobs at once: the backlog, the last hour's
activity and the webhook deliveries in trouble. Aggregates in one statement each, never a
query per row, each reading an index over the rows it counts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from comfyfleet.db import single_statements
from comfyfleet.jobs.deliveries import Delivery, DeliveryStatus
from comfyfleet.jobs.models import ON_BACKEND_STATES, Job, JobStatus
from comfyfleet.jobs.repository import UNFINISHED

# Dead or failed for good, or pending after a failed attempt. Literal values, not bound ones:
# so the planner knows that the partial index webhook_deliveries_troubled covers them.
TROUBLED = text(
    f"webhook_deliveries.status IN ('{DeliveryStatus.DEAD}', '{DeliveryStatus.FAILED}') OR "
    f"(webhook_deliveries.status = '{DeliveryStatus.PENDING}' AND webhook_deliveries.attempts > 0)")


ON_BACKEND = text("jobs.status IN ({})".format(
    ", ".join(f"'{state}'" for state in sorted(ON_BACKEND_STATES))))
ACTIVITY_WINDOW = timedelta(hours=1)


@dataclass(frozen=True)
class Activity:
    """The last hour, minute by minute (oldest first), and each backend's busy share."""

    # {"minute": start, "submitted": n, "succeeded": n, "failed": n, "cancelled": n}
    minutes: list[dict[str, Any]]
    # backend -> the share of the hour a job of it was executing there (started to finished)
    utilisation: dict[str, float]


@dataclass(frozen=True)
class WorkflowBacklog:
    workflow: str
    # Jobs per unfinished status (queued, dispatched, running, uploading).
    counts: dict[str, int]
    oldest_queued_at: datetime | None


def _minute(moment: Any) -> Any:
    """The start of `moment`'s minute (the unit written out, so that GROUP BY sees one
    expression)."""
    return func.date_trunc(text("'minute'"), moment)


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

    async def backlog_by_key(self) -> dict[str | None, dict[str, int]]:
        """Every API key's unfinished jobs (None: those submitted without one), by status."""
        query = (select(col(Job.api_key_hash), col(Job.status), func.count())
                 .where(UNFINISHED).group_by(col(Job.api_key_hash), col(Job.status)))
        async with self._statements() as session:
            rows = (await session.exec(query)).all()
        found: dict[str | None, dict[str, int]] = {}
        for digest, status, count in rows:
            found.setdefault(digest, {})[status] = count
        return found

    async def activity(self, api_key_hash: str | None = None) -> Activity:
        """Jobs submitted and finished per minute over the last hour, and (without
        `api_key_hash`) the share of it each backend spent executing jobs."""
        since = _minute(func.now()) - text(
            f"interval '{int(ACTIVITY_WINDOW.total_seconds()) - 60} s'")
        created, ended = _minute(col(Job.created_at)), _minute(col(Job.finished_at))
        submitted = (select(created, func.count())
                     .where(col(Job.created_at) >= since).group_by(created))
        finished = (select(ended, col(Job.status), func.count())
                    .where(col(Job.finished_at) >= since).group_by(ended, col(Job.status)))
        if api_key_hash is not None:
            submitted = submitted.where(col(Job.api_key_hash) == api_key_hash)
            finished = finished.where(col(Job.api_key_hash) == api_key_hash)
        async with self._statements() as session:
            start = (await session.exec(select(since))).one()
            buckets = {start + timedelta(minutes=n): {"submitted": 0} for n in range(60)}
            for at, count in (await session.exec(submitted)).all():
                buckets.setdefault(at, {})["submitted"] = count
            for at, status, count in (await session.exec(finished)).all():
                buckets.setdefault(at, {})[status] = count
            utilisation = {} if api_key_hash is not None else await self._busy(session)
        minutes = [{"minute": at, "submitted": 0, "succeeded": 0, "failed": 0, "cancelled": 0,
                    **counts} for at, counts in sorted(buckets.items())]
        return Activity(minutes, utilisation)

    async def _busy(self, session: Any) -> dict[str, float]:
        window = ACTIVITY_WINDOW.total_seconds()
        since = func.now() - text(f"interval '{int(window)} s'")
        ran = func.extract("epoch", func.coalesce(col(Job.finished_at), func.now())
                           - func.greatest(col(Job.started_at), since))
        query = (select(col(Job.backend), func.sum(ran))
                 .where(col(Job.started_at).is_not(None), col(Job.backend).is_not(None),
                        (col(Job.finished_at) >= since) | ON_BACKEND)
                 .group_by(col(Job.backend)))
        rows = (await session.exec(query)).all()
        return {backend: round(min(float(seconds) / window, 1.0), 4)
                for backend, seconds in rows if seconds is not None}

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
