"""The job statements that run for every job or at every periodic pass (sql/jobs.sql): each
walks an index however many jobs there are (those reading the backlog, in sql/claim.sql too,
whatever jobs came before it in the table), planned as a pooled connection plans a statement
it has prepared once it settles on the generic plan; the statements that write a job with
its webhook write the outbox row exactly when they write the job, and wake the workers; a job
put back in the backlog wakes every process's dispatcher; a job stored under an idempotency key
lets go of the request's claim on it."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet import sql
from comfyfleet.jobs.deliveries import NOTIFY_CHANNEL
from comfyfleet.jobs.models import Job, JobStatus, utcnow
from comfyfleet.jobs.repository import BacklogLimits, Choice, JobRepository
from comfyfleet.peers import QUEUED_CHANNEL
from tests.test_dashboard_queries import SCANNED, scans

# A process reading a job back and leasing its webhook before any other work (a restart
# recovering the jobs on its backends, its webhook worker starting): the status of the job
# with id argv[2] in the database argv[1], and the events of the deliveries it leases.
READ_BACK = """
import asyncio, sys, uuid
from datetime import timedelta
from comfyfleet.db import make_engine
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.webhooks.outbox import Outbox

async def main() -> None:
    engine = make_engine(sys.argv[1])
    job = await JobRepository(engine).get(uuid.UUID(sys.argv[2]))
    leased = await Outbox(engine).claim(limit=10, per_host=10, busy={},
                                        lease=timedelta(seconds=60))
    await engine.dispose()
    print(job.status if job is not None else None, [delivery.event_type for delivery in leased])

asyncio.run(main())
"""

# The named statements of sql/jobs.sql that a job's life or a periodic pass runs and that
# read or write jobs beyond one by its id.
PLANNED = ("insert", "transition", "finish", "requeue", "release", "move", "take_over",
           "on_backend", "unfollowed")
JOBS = 6000
# The statements that read queued jobs (sql/claim.sql, sql/jobs.sql), and a backlog stored
# after as many ended jobs as that test needs for PostgreSQL to read part of it from the heap.
BACKLOG_READS = (("claim", "claim"), ("claim", "insert_taken"), ("claim", "place"),
                 ("claim", "deep"), ("jobs", "insert"), ("jobs", "queued"))
ENDED_BEFORE_BACKLOG = 4000
BACKLOG = 1000
KEYED = 3
CALLBACK = "http://127.0.0.1:9/hooks"  # never called: deliveries are only written

# Copies of one stored job: most finished on one of four backends, one in fifty running there
# for one of three processes.
COPY_JOBS = """
INSERT INTO jobs (id, workflow, params, prompt, status, progress, priority, attempts,
    created_at, started_at, finished_at, outputs, backend, prompt_id, dispatched_by, source)
SELECT gen_random_uuid(), workflow, params, prompt,
    CASE WHEN n % 50 = 0 THEN 'running' ELSE 'succeeded' END, 0, 0, 1,
    now() - n * interval '10 s', now() - n * interval '10 s',
    CASE WHEN n % 50 <> 0 THEN now() - n * interval '5 s' END, '[]', 'gpu' || n % 4,
    gen_random_uuid()::text, n % 3 + 1, source
FROM jobs, generate_series(1, $1) AS n
"""


# Copies of the one queued job, queued after it, the first $2 of them for key "k".
QUEUE_JOBS = """
INSERT INTO jobs (id, workflow, params, prompt, status, progress, priority, attempts,
    created_at, api_key_hash, source)
SELECT gen_random_uuid(), workflow, params, prompt, status, 0, 0, 0,
    created_at + n * interval '1 ms', CASE WHEN n <= $2 THEN 'k' END, source
FROM jobs, generate_series(1, $1) AS n WHERE status = 'queued'
"""

# EXPLAIN of a statement with parameters, sent as text (asyncpg would take its `$n` for its
# own parameters).
EXPLAIN_GENERIC = """
CREATE FUNCTION pg_temp.generic_plan(statement text) RETURNS json LANGUAGE plpgsql AS $$
DECLARE plan json;
BEGIN
    EXECUTE 'EXPLAIN (GENERIC_PLAN, FORMAT JSON) ' || statement INTO plan;
    RETURN plan;
END
$$
"""


def driver_url(engine: AsyncEngine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


async def generic_plan(db: asyncpg.Connection, statement: str) -> dict[str, Any]:
    """`statement`'s plan for any values of its parameters: the plan PostgreSQL keeps for a
    prepared statement once it settles on a generic one."""
    explained = await db.fetchval("SELECT pg_temp.generic_plan($1)", statement)
    plan: dict[str, Any] = json.loads(explained)[0]["Plan"]
    return plan


async def test_every_statement_of_a_jobs_life_walks_an_index(engine: AsyncEngine) -> None:
    await JobRepository(engine).insert(Job(workflow="invert", prompt={"1": {}}))
    db = await asyncpg.connect(driver_url(engine))
    try:
        await db.execute(COPY_JOBS, JOBS)
        await db.execute("ANALYZE")
        await db.execute(EXPLAIN_GENERIC)
        statements = sql.queries("jobs")
        full_scans = []
        for name in PLANNED:
            plan = await generic_plan(db, statements[name])
            if any(kind == "Seq Scan" and table in SCANNED for kind, table in scans(plan)):
                full_scans.append(name)
        assert full_scans == []
    finally:
        await db.close()


async def history_then_burst(engine: AsyncEngine) -> asyncpg.Connection:
    """A connection to the test's database holding a day's ended jobs, then a burst queued
    (BACKLOG jobs of no key, KEYED of key "k"): the queued ones are a large share of the
    table and sit at the end of its heap."""
    await JobRepository(engine).insert(Job(workflow="invert", prompt={"1": {}}))
    db = await asyncpg.connect(driver_url(engine))
    await db.execute(COPY_JOBS, ENDED_BEFORE_BACKLOG)
    await db.execute(QUEUE_JOBS, BACKLOG - 1, KEYED)
    await db.execute("ANALYZE")
    return db


async def test_the_backlogs_reads_walk_its_index_whatever_jobs_came_before(
    engine: AsyncEngine,
) -> None:
    # Read in no order, a `LIMIT` of the queued jobs (or EXISTS) looks cheapest read from the
    # heap's start, where there are none: every claim read the whole heap (0.1-0.6 s at
    # 400,000 ended and 100,000 queued).
    db = await history_then_burst(engine)
    try:
        await db.execute(EXPLAIN_GENERIC)
        full_scans = []
        for file, name in BACKLOG_READS:
            plan = await generic_plan(db, sql.queries(file)[name])
            if any(kind == "Seq Scan" and table == "jobs" for kind, table in scans(plan)):
                full_scans.append(name)
        assert full_scans == []
    finally:
        await db.close()


async def test_a_keys_backlog_is_counted_reading_only_its_own_jobs(engine: AsyncEngine) -> None:
    # (QueueFull's per-key count, on the plan a pooled connection settles on.)
    db = await history_then_burst(engine)
    try:
        await prepare_generic(db, sql.queries("jobs")["queued"])
        for arguments, count in (("true, 'k'", KEYED), ("true, NULL", BACKLOG - KEYED),
                                 ("true, 'other'", 0), ("false, 'k'", BACKLOG)):
            assert await executed(db, arguments) == (count, 0)
    finally:
        await db.close()


async def test_a_workflows_mean_run_time_reads_only_the_runs_it_averages(
    engine: AsyncEngine,
) -> None:
    # A queued job's ETA reads the mean on any backend (the backend null) in the background
    # every 2 s, and a dispatched job's GET its backend's: walking every run of the workflow
    # for a backend that ran none, each read grew with the history (0.2 s at 400,000 runs).
    db = await history_then_burst(engine)  # runs of 5 s, 10 s, ... newest first, on gpu0-3
    try:
        await prepare_generic(db, sql.queries("reads")["mean_run_seconds"])
        for arguments, mean in (("'invert', NULL", 52.5), ("'invert', 'gpu1'", 195.0),
                                ("'invert', 'new'", 52.5), ("'other', 'gpu1'", None)):
            assert await executed(db, f"{arguments}, 20") == (mean, 0)
    finally:
        await db.close()


async def prepare_generic(db: asyncpg.Connection, statement: str) -> None:
    """`statement` prepared on `db` as `planned`, on the plan a pooled connection settles on."""
    await db.execute("PREPARE planned AS " + statement)
    await db.execute("SET plan_cache_mode = force_generic_plan")


async def executed(db: asyncpg.Connection, arguments: str) -> tuple[Any, int]:
    """`planned` executed with `arguments` (SQL): its value, and the rows its plan read and
    then filtered out."""
    value = await db.fetchval(f"EXECUTE planned({arguments})")
    explained = await db.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE planned({arguments})")
    plan = json.loads(explained)[0]["Plan"]
    return value, sum(node.get("Rows Removed by Filter", 0) for node in nodes(plan))


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan."""
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


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


async def test_a_job_put_back_in_the_backlog_notifies_once_per_transaction(
    engine: AsyncEngine
) -> None:
    """Requeued, released: each wakes the listeners; a write that queues no job (a claim,
    progress) does not, nor does a job stored (its process tells the others, see peers.py);
    however many jobs one transaction puts back, it notifies once."""
    repository = JobRepository(engine)
    db = await asyncpg.connect(driver_url(engine))
    heard: asyncio.Queue[str] = asyncio.Queue()
    await db.add_listener(QUEUED_CHANNEL, lambda *notice: heard.put_nowait(notice[3]))

    async def notices() -> int:
        """How many notifications came of what was committed since the last call."""
        await db.execute(f"NOTIFY {QUEUED_CHANNEL}, 'mark'")  # delivered after those before
        count = 0
        async with asyncio.timeout(10):
            while await heard.get() != "mark":
                count += 1
        return count

    def pick_first(_: str, read: Any) -> Choice:
        return Choice(read.queued[0].id, charge=1.0)

    try:
        await db.execute("INSERT INTO backends (name, url) VALUES ('gpu', 'x')")
        job, _ = await repository.insert(Job(workflow="invert", prompt={"1": {}}))
        await repository.insert(Job(workflow="invert", status=JobStatus.SUCCEEDED,
                                    finished_at=utcnow()))
        assert await notices() == 0

        claimed = (await repository.claim_next(["gpu"], "p1", max_inflight=1, pick=pick_first)).job
        assert claimed is not None and claimed.id == job.id
        assert await notices() == 0
        released = await repository.release(claimed)
        assert released is not None and released.status == JobStatus.QUEUED
        assert await notices() == 1

        claimed = (await repository.claim_next(["gpu"], "p2", max_inflight=1, pick=pick_first)).job
        assert claimed is not None
        running = await repository.transition(claimed, {JobStatus.DISPATCHED},
                                              status=JobStatus.RUNNING, progress=0.5)
        assert running is not None and await notices() == 0
        assert await repository.requeue(running) is not None
        assert await notices() == 1

        await db.execute("UPDATE jobs SET status = 'running'")
        assert await notices() == 0
        await db.execute("UPDATE jobs SET status = 'queued'")  # two jobs, one transaction
        assert await notices() == 1
    finally:
        await db.close()


async def test_a_job_stored_under_a_key_takes_the_claim_on_it_along(
    engine: AsyncEngine
) -> None:
    """The insert that stores the job lets go of the request's claim on its key (no round
    trip of its own); one that finds the key taken keeps the claim, for its holder to let go
    of."""
    repository = JobRepository(engine)
    db = await asyncpg.connect(driver_url(engine))

    async def claims() -> int:
        count: int = await db.fetchval("SELECT count(*) FROM idempotency_claims")
        return count

    try:
        claim = await repository.claim_key("tenant", "graph", "k1", 60)
        assert claim is not None and await claims() == 1
        assert await repository.claim_key("tenant", "graph", "k1", 60) is None
        job = Job(workflow="invert", client_task_id="k1", api_key_hash="tenant",
                  source="graph")
        stored, created = await repository.insert(job, claim=claim)
        assert created and not claim.held and await claims() == 0

        again = await repository.claim_key("tenant", "graph", "k1", 60)
        assert again is not None
        repeat = job.model_copy(update={"id": uuid.uuid4()})
        found, created = await repository.insert(repeat, backlog=BacklogLimits(None, 100),
                                                 claim=again)
        assert (found.id, created) == (stored.id, False)
        assert again.held and await claims() == 1
        await repository.release_key(again)
        assert not again.held and await claims() == 0
    finally:
        await db.close()


async def test_a_fresh_process_reads_a_job_back_before_any_orm_work(engine: AsyncEngine) -> None:
    """The jobs and deliveries the hot path returns are built past the ORM's constructor;
    their fields read in a process that has not configured the ORM's mappers by other work."""
    repository = JobRepository(engine)
    stored, _ = await repository.insert(Job(workflow="invert", callback_url=CALLBACK))
    assert await repository.finish(stored, JobStatus.CANCELLED, {JobStatus.QUEUED}) is not None
    url = engine.url.render_as_string(hide_password=False)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", READ_BACK, url, str(stored.id),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert out.decode() == "cancelled ['job.cancelled']\n", err.decode()[-2000:]
