"""Which indexes of `jobs` a job has an entry in, state by state. No change of a job's status
is a HOT update (status is in most of the indexes' keys or predicates), so each writes an entry
into every index whose predicate its new row meets: a job's claim and the states it passes
through on its backend are the most frequent of these writes, and enter the fewest indexes
(migration 0039)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.db import MIGRATIONS_DIR, driver_connection, make_engine
from comfyfleet.jobs.models import Job, JobSource, JobStatus, utcnow
from comfyfleet.jobs.repository import JobRepository

# The indexes every row of `jobs` is in, whatever its state.
EVERY_ROW = {"jobs_pkey", "jobs_newest", "jobs_by_workflow_newest"}


async def indexes_holding(engine: AsyncEngine, job_id: uuid.UUID) -> set[str]:
    """The indexes of `jobs` whose predicate (if any) job `job_id`'s row meets."""
    async with driver_connection(engine) as connection:
        indexes = await connection.fetch(
            "SELECT indexrelid::regclass::text AS name, pg_get_expr(indpred, indrelid) AS pred"
            " FROM pg_index WHERE indrelid = 'jobs'::regclass")
        return {index["name"] for index in indexes
                if index["pred"] is None or await connection.fetchval(
                    f"SELECT {index['pred']} FROM jobs WHERE id = $1", job_id)}


async def test_a_job_on_its_backend_is_in_no_index_of_the_other_states(
    engine: AsyncEngine,
) -> None:
    repository = JobRepository(engine)
    now = utcnow()
    started = now - timedelta(seconds=2)

    def job(status: str, **columns: Any) -> Job:
        on_backend = {} if status in (JobStatus.QUEUED, JobStatus.FAILED) else {
            "backend": "a", "attempts": 1}
        return Job(workflow="w", status=status, **{"fingerprint": "f", **on_backend, **columns})

    jobs = {
        JobStatus.QUEUED: job(JobStatus.QUEUED),
        JobStatus.DISPATCHED: job(JobStatus.DISPATCHED),
        JobStatus.RUNNING: job(JobStatus.RUNNING, started_at=started),
        JobStatus.UPLOADING: job(JobStatus.UPLOADING, started_at=started, uploading_at=now),
        JobStatus.SUCCEEDED: job(JobStatus.SUCCEEDED, started_at=started, finished_at=now),
        "succeeded, a v2 graph": job(JobStatus.SUCCEEDED, started_at=started, finished_at=now,
                                     source=JobSource.GRAPH, fingerprint=None),
        JobStatus.FAILED: job(JobStatus.FAILED, finished_at=now),  # never started
        "running, labelled": job(JobStatus.RUNNING, started_at=started, labels={"team": "a"}),
    }
    held = {}
    for state, made in jobs.items():
        stored, _ = await repository.insert(made)
        held[state] = await indexes_holding(engine, stored.id) - EVERY_ROW
    on_backend = {"jobs_unfinished_by_key_status", "jobs_on_backend"}
    ran_to_its_end = {"jobs_by_status_newest", "jobs_finished", "jobs_run_times",
                      "jobs_run_times_by_backend"}
    assert held == {
        JobStatus.QUEUED: {"jobs_unfinished_by_key_status", "jobs_queued_by_tenant",
                           "jobs_by_status_newest"},
        JobStatus.DISPATCHED: on_backend,
        JobStatus.RUNNING: on_backend,
        JobStatus.UPLOADING: on_backend,
        JobStatus.SUCCEEDED: ran_to_its_end | {"jobs_reusable"},
        "succeeded, a v2 graph": ran_to_its_end,
        JobStatus.FAILED: {"jobs_by_status_newest", "jobs_finished"},
        # A v2 job with metadata: in the labels' index (0046) in every state.
        "running, labelled": on_backend | {"jobs_labelled"},
    }


async def schema_after(database_url: str, *steps: tuple[str, str]) -> list[Any]:
    """Every index and constraint of the database once alembic has taken each of `steps`
    (`upgrade` or `downgrade`, to a revision) in turn."""

    def take(connection: Connection, step: tuple[str, str]) -> None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection"] = connection
        getattr(command, step[0])(config, step[1])

    engine = make_engine(database_url)
    try:
        for step in steps:
            async with engine.begin() as connection:
                await connection.run_sync(take, step)
        async with driver_connection(engine) as connection:
            return [*await connection.fetch(
                "SELECT tablename, indexname, indexdef FROM pg_indexes"
                " WHERE schemaname = 'public' ORDER BY indexname"), *await connection.fetch(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
                " FROM pg_constraint WHERE connamespace = 'public'::regnamespace"
                " ORDER BY conname")]
    finally:
        await engine.dispose()


async def test_the_downgrade_of_0039_restores_every_index_it_dropped(
    database_url: str, other_database_url: str,
) -> None:
    at_0038 = await schema_after(other_database_url, ("upgrade", "0038"))
    assert await schema_after(database_url, ("upgrade", "head"), ("downgrade", "0038")) == at_0038
    assert await schema_after(database_url, ("upgrade", "head")) != at_0038
