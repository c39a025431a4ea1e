"""Reads the API makes of jobs that must not grow with the history: a page of jobs in several
states (v2's `queued` is queued and dispatched), a page of the jobs having some labels, the
check that no unfinished job loads an asset about to be deleted, and a dispatched job's ETA at
every GET of it. Each read is planned as a pooled connection plans a statement it has prepared
once it settles on the generic plan, over a backlog queued before a day's newer history."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from comfyfleet import sql
from comfyfleet.app import serving
from comfyfleet.intake.assets import Asset, AssetInUse, AssetStore
from comfyfleet.jobs.models import Job, JobSource, JobStatus
from comfyfleet.jobs.positions import epoch_microseconds
from comfyfleet.jobs.repository import POSITION_MAX_AGE, JobRepository
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from comfyfleet.storage.local import LocalStorage
from tests.support import statements_run
from tests.test_job_events import ran
from tests.test_job_statements import driver_url, nodes

HISTORY = 4000  # ended jobs, the newest of all
BACKLOG = 1000  # queued jobs, older than every ended one
ON_BACKENDS = 8  # dispatched jobs, older still
LABELLED_ONE_IN = 5  # ended jobs labelled {"batch": "<0-9>"}
PAGE = 20
ASSET = uuid.uuid4()

# Copies of the first job (a v2 graph loading ASSET, queued): the backlog, queued two days ago,
# the jobs on backends before it, then the day's ended jobs, some of them labelled.
COPIES = """
INSERT INTO jobs (id, workflow, params, prompt, status, progress, priority, attempts,
    created_at, started_at, finished_at, outputs, backend, labels, source)
SELECT gen_random_uuid(), workflow, params, prompt, copy.status, 0, 0, copy.attempts,
    copy.created_at, copy.started_at, copy.finished_at, '[]', copy.backend, copy.labels, source
FROM jobs, LATERAL (
    SELECT 'queued' AS status, 0 AS attempts, now() - interval '2 days' + n * interval '1 s'
        AS created_at, NULL::timestamptz AS started_at, NULL::timestamptz AS finished_at,
        NULL AS backend, NULL::jsonb AS labels
    FROM generate_series(1, $1 - 1) AS n
    UNION ALL
    SELECT 'dispatched', 1, now() - interval '3 days' + n * interval '1 s', NULL, NULL,
        'gpu' || n % 4, NULL
    FROM generate_series(1, $2) AS n
    UNION ALL
    SELECT 'succeeded', 1, now() - n * interval '10 s', now() - n * interval '10 s',
        now() - n * interval '5 s', 'gpu' || n % 4,
        CASE WHEN n % $4 = 0 THEN jsonb_build_object('batch', (n / $4 % 10)::text) END
    FROM generate_series(1, $3) AS n
) AS copy
"""


async def backlog_behind_history(engine: AsyncEngine) -> asyncpg.Connection:
    """A connection to the test's database holding BACKLOG queued v2 jobs loading ASSET,
    ON_BACKENDS dispatched ones, and HISTORY ended after them, analysed."""
    await JobRepository(engine).insert(Job(
        workflow="graph:loads", source=JobSource.GRAPH, created_at=datetime(2000, 1, 1),
        params={"1.image": {"asset": str(ASSET), "filename": "in.png"}}, prompt={"1": {}}))
    db = await asyncpg.connect(driver_url(engine))
    await db.execute(COPIES, BACKLOG, ON_BACKENDS, HISTORY, LABELLED_ONE_IN)
    await db.execute("ANALYZE")
    return db


@asynccontextmanager
async def sent(engine: AsyncEngine) -> AsyncIterator[list[tuple[str, tuple[Any, ...]]]]:
    """The statements (with their arguments) SQLAlchemy sends on `engine` meanwhile."""
    seen: list[tuple[str, tuple[Any, ...]]] = []

    def told(_: Any, __: Any, statement: str, arguments: Any, *___: Any) -> None:
        seen.append((statement, tuple(arguments)))

    event.listen(engine.sync_engine, "before_cursor_execute", told)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", told)


def literal(value: Any) -> str:
    """An argument as SQL (EXECUTE takes no bound parameters)."""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        value = json.dumps(value)
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return "'" + text.replace("'", "''") + "'"


async def jobs_read(db: asyncpg.Connection, statements: list[tuple[str, tuple[Any, ...]]],
                    plans: str = "force_generic_plan") -> int:
    """The rows of `jobs` the statements of the list that read jobs read (those they give and
    those they filter out), each prepared and executed on its generic plan (`plans`:
    force_custom_plan, on a plan for its arguments)."""
    read = 0
    await db.execute(f"SET plan_cache_mode = {plans}")
    for statement, arguments in statements:
        if "FROM jobs" not in statement:
            continue
        await db.execute("PREPARE planned AS " + statement)
        try:
            values = ", ".join(map(literal, arguments))
            explained = await db.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE planned"
                                          + (f"({values})" if values else ""))
        finally:
            await db.execute("DEALLOCATE planned")
        read += round(sum((node["Actual Rows"] + node.get("Rows Removed by Filter", 0))
                          * node["Actual Loops"] for node in nodes(json.loads(explained)[0]["Plan"])
                          if node.get("Relation Name") == "jobs"))
    return read


async def newest(db: asyncpg.Connection, where: str, *arguments: Any) -> list[uuid.UUID]:
    """The ids of the jobs `where` says, newest first, read as plainly as SQL can."""
    return [row["id"] for row in await db.fetch(
        f"SELECT id FROM jobs WHERE {where} ORDER BY created_at DESC, id DESC", *arguments)]


async def test_pages_of_several_states_read_only_those_states_jobs(engine: AsyncEngine) -> None:
    # v2's `queued` (queued and dispatched) behind a day's newer history: one walk of every job
    # newest first read the history before the first of them; a sort, every queued job.
    db = await backlog_behind_history(engine)
    repository = JobRepository(engine)
    try:
        states = [JobStatus.QUEUED, JobStatus.DISPATCHED]
        paged: list[uuid.UUID] = []
        after = None
        async with sent(engine) as statements:
            while len(paged) < 3 * PAGE:
                page = await repository.page(limit=PAGE, status=states, after=after)
                paged += [job.id for job in page]
                after = page[-1].created_at, page[-1].id
        assert paged == (await newest(db, "status IN ('queued', 'dispatched')"))[:3 * PAGE]
        # Each page: the keys of PAGE jobs of each state at most (those on backends are few),
        # then its PAGE jobs by id.
        assert await jobs_read(db, statements) <= 3 * (2 * PAGE + ON_BACKENDS)
        every = await repository.page(limit=BACKLOG + ON_BACKENDS + 1, status=states)
        assert [job.id for job in every] == await newest(
            db, "status IN ('queued', 'dispatched')")
    finally:
        await db.close()


async def test_a_page_by_labels_reads_only_the_jobs_having_them(engine: AsyncEngine) -> None:
    # The v2 list's metadata filter: of labels no job has, the walk of every job newest first
    # read them all. Planned for the labels asked: how many jobs have them (a few, or most, when
    # a walk is best) only the labels tell; a generic plan of them bound walked (5,008 rows),
    # and a pooled connection settles on one after five pages.
    db = await backlog_behind_history(engine)
    repository = JobRepository(engine)
    try:
        async with sent(engine) as statements:
            assert await repository.page(limit=PAGE, labels={"batch": "none"}) == []
        assert await jobs_read(db, statements) == 0
        assert await repository.page(limit=PAGE, labels={"batch": "3' OR true --\\"}) == []
        page = await repository.page(limit=PAGE, labels={"batch": "3"})
        assert [job.id for job in page] == (await newest(
            db, "labels @> $1::jsonb", json.dumps({"batch": "3"})))[:PAGE]
    finally:
        await db.close()


async def test_an_assets_use_is_looked_for_among_the_unfinished_jobs_only(
    engine: AsyncEngine, tmp_path: Path,
) -> None:
    db = await backlog_behind_history(engine)
    store = AssetStore(engine, LocalStorage(tmp_path), "")
    kept = Asset(hash="0" * 64, size_bytes=1, content_type="image/png")
    unused = Asset(hash=kept.hash, size_bytes=1, content_type="image/png")
    async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
        session.add_all([kept, unused])  # the bytes kept for `kept` once `unused` is deleted
    try:
        async with sent(engine) as statements:
            with pytest.raises(AssetInUse):
                await store.delete(Asset(id=ASSET, hash=kept.hash, size_bytes=1,
                                         content_type="image/png"))
            await store.delete(unused)  # looked for in every unfinished job, in vain
        # Each delete: the unfinished jobs read (those on backends and queued), no others.
        assert await jobs_read(db, statements) <= 2 * (BACKLOG + ON_BACKENDS)
    finally:
        await db.close()


async def test_the_backlogs_snapshot_is_read_from_the_queued_jobs_index_alone(
    engine: AsyncEngine,
) -> None:
    # The queue positions' snapshot (claim.sql `backlog`), every queued job's tenant, priority
    # and created_at: at 100,000 queued jobs, reading their heap pages and sorting them (on
    # disk) took 0.1-0.5 s, in the index's order from it alone 30 ms.
    db = await backlog_behind_history(engine)
    try:
        await db.execute("VACUUM jobs")  # a backlog settled (bench.scale's): pages all-visible
        await db.execute("SET plan_cache_mode = force_generic_plan")
        await db.execute("PREPARE planned AS " + sql.queries("claim")["backlog"])
        explained = await db.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE planned")
        rows = await db.fetch("EXECUTE planned")
        read = [node for node in nodes(json.loads(explained)[0]["Plan"])
                if node.get("Relation Name") == "jobs"]
        assert [(node["Node Type"], node.get("Index Name"), node.get("Heap Fetches"))
                for node in read] == [("Index Only Scan", "jobs_queued_by_tenant", 0)]
        assert not [node for node in nodes(json.loads(explained)[0]["Plan"])  # of jobs
                    if "created_at" in " ".join(node.get("Sort Key", []))]
        created = [row["created"] for row in rows]
        assert created == [[epoch_microseconds(row["created_at"]) for row in await db.fetch(
            "SELECT created_at FROM jobs WHERE status = 'queued' ORDER BY created_at")]]
    finally:
        await db.close()


async def test_a_dispatched_jobs_gets_share_its_backends_run_time(
    settings: Settings, engine: AsyncEngine,
) -> None:
    # Its ETA rests on the workflow's mean run time on its backend, which changes as slowly
    # as a queued job's: read once per POSITION_MAX_AGE, not at every GET.
    repository = JobRepository(engine)
    await ran(repository, "simulated_work", "slow", 30.0)
    read = sql.queries("reads")["mean_run_seconds"]
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [f"{sim.url}#slow"]
        async with statements_run(engine) as statements, serving(settings) as base, \
                aiohttp.ClientSession() as http:
            prefix = base + settings.route_prefix
            async with http.post(f"{prefix}/jobs?wait=0", json={
                    "workflow": "simulated_work", "params": {"seconds": 5, "steps": 5}}
                                 ) as response:
                job_id = (await response.json())["id"]
            etas: list[float | None] = []
            started = time.monotonic()
            while len(etas) < 20:
                async with http.get(f"{prefix}/jobs/{job_id}") as response:
                    job = await response.json()
                if job["status"] == JobStatus.RUNNING:
                    etas.append(job["eta_seconds"])
            asking = time.monotonic() - started
            async with http.post(f"{prefix}/jobs/{job_id}/cancel"):
                pass
    assert all(eta is not None and eta <= 30.0 for eta in etas)
    # The queued asks' (fleet-wide), the first on its backend's, and one a POSITION_MAX_AGE
    # since (main's read it at every GET once the job was dispatched: 25 times).
    assert statements.count(read) <= 2 + math.ceil(asking / POSITION_MAX_AGE)
