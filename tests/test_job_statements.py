"""The statements that write a job with its webhook (sql/jobs.sql) write the outbox row exactly
when they write the job, and wake the workers."""

from __future__ import annotations

import asyncio
import json

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.jobs.deliveries import NOTIFY_CHANNEL
from comfyfleet.jobs.models import Job, JobStatus, utcnow
from comfyfleet.jobs.repository import BacklogLimits, JobRepository

CALLBACK = "http://127.0.0.1:9/hooks"  # never called: deliveries are only written


def driver_url(engine: AsyncEngine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


async def test_a_webhook_row_is_written_with_the_job_on_every_path(engine: AsyncEngine) -> None:
    repository = JobRepository(engine)
    db = await asyncpg.connect(driver_url(engine))
    woken: asyncio.Queue[str] = asyncio.Queue()
    await db.add_listener(NOTIFY_CHANNEL, lambda *notice: woken.put_nowait(notice[2]))

    async def outbox(job: Job) -> list[str]:
        """The events in the outbox for `job`, oldest first, each written for it."""
        rows = await db.fetch("SELECT event_type, payload FROM webhook_deliveries "
                              "WHERE job_id = $1 ORDER BY created_at", job.id)
        assert all(json.loads(row["payload"])["data"]["id"] == str(job.id) for row in rows)
        return [row["event_type"] for row in rows]

    async def wakes() -> None:
        await asyncio.wait_for(woken.get(), timeout=10)

    def ended(task: str) -> Job:
        return Job(workflow="invert", status=JobStatus.SUCCEEDED, callback_url=CALLBACK,
                   client_task_id=task, finished_at=utcnow())

    try:
        # Stored already ended (reused outputs), with and without a backlog limit.
        stored, created = await repository.insert(ended("task-1"))
        assert created and await outbox(stored) == ["job.succeeded"]
        await wakes()
        limited, created = await repository.insert(ended("task-2"),
                                                    backlog=BacklogLimits(None, 100))
        assert created and await outbox(limited) == ["job.succeeded"]
        await wakes()
        # A repeat of a stored job writes nothing.
        repeat = ended("task-1")
        assert await repository.insert(repeat) == (stored, False)
        assert await outbox(repeat) == [] and await outbox(stored) == ["job.succeeded"]

        # Transitions: a subscribed event, a terminal one; nothing for a stale view, nothing
        # unsubscribed.
        queued, _ = await repository.insert(Job(
            workflow="invert", callback_url=CALLBACK, webhook_events=["job.started"]))
        assert await outbox(queued) == []
        running = await repository.transition(queued, {JobStatus.QUEUED}, event="job.started",
                                              status=JobStatus.RUNNING, started_at=utcnow())
        assert running is not None and await outbox(queued) == ["job.started"]
        await wakes()
        assert await repository.transition(queued, {JobStatus.QUEUED}, event="job.started",
                                           status=JobStatus.RUNNING) is None
        stale = running.model_copy(update={"attempts": running.attempts + 1})
        assert await repository.finish(stale, JobStatus.SUCCEEDED, {JobStatus.RUNNING}) is None
        assert await outbox(queued) == ["job.started"]
        finished = await repository.finish(running, JobStatus.SUCCEEDED, {JobStatus.RUNNING})
        assert finished is not None
        assert await outbox(queued) == ["job.started", "job.succeeded"]
        await wakes()

        unsubscribed, _ = await repository.insert(Job(workflow="invert", callback_url=CALLBACK))
        assert await repository.transition(unsubscribed, {JobStatus.QUEUED}, event="job.started",
                                           status=JobStatus.RUNNING) is not None
        assert await outbox(unsubscribed) == []
        assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 4
    finally:
        await db.close()
