"""One claim transaction asks several backends on one read of the backlog (sql/claim.sql):
the backend after the first that takes the job takes it under its own lock, never waiting for
that lock while holding the first's, and within its slots by the database's count."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.comfy.endpoints import Backend
from comfyfleet.db import driver_connection
from comfyfleet.fleet.registry import BackendRegistry
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.jobs.repository import Choice, JobRepository, QueuedJob


def for_b(backend: str, queued: list[QueuedJob]) -> Choice | None:
    """A pick that leaves the backlog to backend "b"."""
    return Choice(queued[0].id) if backend == "b" else None


async def test_a_claim_asks_the_next_backend_on_its_read_without_waiting_for_its_lock(
    engine: AsyncEngine,
) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1"),
                                        Backend("b", "http://127.0.0.1:2")])
    repository = JobRepository(engine)
    job, _ = await repository.insert(Job(workflow="w", prompt={}))
    async with driver_connection(engine) as elsewhere, elsewhere.transaction():
        # A claim for "b" under way in another process: this one does not wait for it.
        await elsewhere.execute("SELECT pg_advisory_xact_lock(hashtext('b'))")
        async with asyncio.timeout(10):
            claim = await repository.claim_next(["a", "b"], "p1", max_inflight=1, pick=for_b)
        # "b" not asked: the caller claims for it next, in a transaction of its own.
        assert claim == (None, ("a",), 1, 1)
    claim = await repository.claim_next(["a", "b"], "p2", max_inflight=1, pick=for_b)
    assert claim.job is not None and claim.job.id == job.id
    assert (claim.job.backend, claim.locked, claim.backlog, claim.next) == ("b", ("a", "b"), 0, 2)


async def test_the_next_backend_takes_a_job_only_into_a_free_slot(engine: AsyncEngine) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1"),
                                        Backend("b", "http://127.0.0.1:2")])
    repository = JobRepository(engine)
    for _ in range(2):
        await repository.insert(Job(workflow="w", prompt={}))
    first = await repository.claim_next(["b"], "p1", max_inflight=1, pick=for_b)
    assert first.job is not None and first.job.status == JobStatus.DISPATCHED
    # "a" has its slot free, "b" none: the job "b" would take stays queued.
    claim = await repository.claim_next(["a", "b"], "p2", max_inflight=1, pick=for_b)
    assert claim == (None, ("a", "b"), 1, 2)
    async with driver_connection(engine) as connection:
        assert await connection.fetchval(
            "SELECT count(*) FROM jobs WHERE status = 'queued'") == 1


async def test_a_claim_takes_the_prompt_of_a_job_it_read_before_from_memory(
    engine: AsyncEngine,
) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine)
    job, _ = await repository.insert(Job(workflow="w", prompt={"1": {"class_type": "Old"}}))
    seen: list[dict[str, Any]] = []

    def look(_: str, queued: list[QueuedJob]) -> None:
        seen.append(queued[0].prompt)

    await repository.claim_next(["a"], "p1", max_inflight=1, pick=look)
    # Changed behind the repositories' backs (a job's prompt never changes): only a claim
    # that reads the prompt again sees it.
    async with driver_connection(engine) as connection:
        await connection.execute(
            """UPDATE jobs SET prompt = '{"1": {"class_type": "New"}}' WHERE id = $1""", job.id)
    await repository.claim_next(["a"], "p2", max_inflight=1, pick=look)
    await JobRepository(engine).claim_next(["a"], "p3", max_inflight=1, pick=look)
    assert [prompt["1"]["class_type"] for prompt in seen] == ["Old", "Old", "New"]


def first(_: str, queued: list[QueuedJob]) -> Choice | None:
    return Choice(queued[0].id) if queued else None


async def test_a_prompt_whose_end_its_claimer_read_holds_no_slot_for_that_claimer_only(
    engine: AsyncEngine,
) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine)
    for _ in range(2):
        await repository.insert(Job(workflow="w", prompt={}))
    running = await repository.claim_next(["a"], "p1", max_inflight=1, pick=first)
    assert running.job is not None
    # p1 still dispatched by the database's count: the end of another prompt frees nothing,
    # and a process that has not read p1's end (another one) counts it in the slot.
    assert (await repository.claim_next(["a"], "p2", max_inflight=1, pick=first,
                                        ended=["elsewhere"])).job is None
    assert (await JobRepository(engine).claim_next(["a"], "p2", max_inflight=1,
                                                   pick=first)).job is None
    # The process that read p1's end takes the slot before p1's job is recorded off it.
    claim = await repository.claim_next(["a"], "p2", max_inflight=1, pick=first, ended=["p1"])
    assert claim.job is not None and claim.job.backend == "a"
    async with driver_connection(engine) as connection:
        assert await connection.fetch(
            "SELECT prompt_id, status FROM jobs ORDER BY prompt_id") == [
            ("p1", "dispatched"), ("p2", "dispatched")]


async def test_a_claim_locks_its_tenant_only_when_the_tenant_has_a_max_concurrent(
    engine: AsyncEngine,
) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    statements: list[str] = []

    def watch(connection: Any, _: Any) -> None:
        connection.driver_connection.add_query_logger(
            lambda query: statements.append(query.query))

    await engine.dispose()  # every connection from now on is watched
    event.listen(engine.sync_engine, "connect", watch)
    locks = []
    for limit in None, 2:
        repository = JobRepository(engine, max_concurrent_per_key=limit)
        await repository.insert(Job(workflow="w", prompt={}))
        statements.clear()
        claim = await repository.claim_next(["a"], f"p{limit}", max_inflight=2, pick=first)
        assert claim.job is not None
        locks.append(sum("'concurrent:'" in statement for statement in statements))
    # No round trip for the tenant's lock without a limit to hold.
    assert locks == [0, 1]


async def test_a_claim_takes_no_job_of_a_tenant_limited_since_its_read_unlocked(
    engine: AsyncEngine,
) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine)
    await repository.insert(Job(workflow="w", prompt={}))

    def limited_meanwhile(_: str, queued: list[QueuedJob]) -> Choice | None:
        # As an admin's new limit committed between the claim's read and its take: the
        # claim read no limit and took no lock for the tenant, so its count could miss
        # another claim's.
        repository._max_concurrent = 1
        return first("a", queued)

    claim = await repository.claim_next(["a"], "p1", max_inflight=1, pick=limited_meanwhile)
    assert claim.job is None
    # The next claim reads the limit and takes the tenant's lock.
    claim = await repository.claim_next(["a"], "p2", max_inflight=1, pick=first)
    assert claim.job is not None
