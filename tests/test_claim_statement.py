"""One claim asks several backends on one read of the backlog (sql/claim.sql), made under no
lock: the backend that chooses a job takes it in one statement under its own lock (holding no
other), within its slots and its tenant's limit by the database's count after that lock.
Claims for other backends read the backlog side by side and see every queued job; the take
judges the job and those it passes at their latest versions, so none is passed uncounted or
past the window by claims of other processes."""

from __future__ import annotations

import asyncio
import inspect
import re
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool

from comfyfleet import sql
from comfyfleet.comfy.endpoints import Backend
from comfyfleet.db import driver_connection
from comfyfleet.fleet.registry import BackendRegistry
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.jobs.repository import (
    CLAIM_BATCH,
    CLAIM_TAKES,
    BacklogRead,
    Choice,
    Claim,
    Dispatch,
    JobRepository,
    QueuedJob,
    Refusal,
    Take,
    TenantHead,
)


async def backends_a_and_b(engine: AsyncEngine) -> JobRepository:
    """Backends "a" and "b" registered; a repository of jobs to claim for them."""
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1"),
                                        Backend("b", "http://127.0.0.1:2")])
    return JobRepository(engine)


def for_b(backend: str, read: BacklogRead) -> Choice | None:
    """A pick that leaves the backlog to backend "b"."""
    return Choice(read.queued[0].id) if backend == "b" else None


async def test_a_claim_holds_no_lock_while_its_take_waits_for_the_backends(
    engine: AsyncEngine,
) -> None:
    repository = await backends_a_and_b(engine)
    job, _ = await repository.insert(Job(workflow="w", prompt={}))
    async with driver_connection(engine) as elsewhere, driver_connection(engine) as observer:
        async with elsewhere.transaction():
            # A take for "b" under way in another process: this claim's take waits for it,
            # holding no lock of its own meanwhile (none of "a", whose slots it read).
            await elsewhere.execute("SELECT pg_advisory_xact_lock(hashtext('b'))")
            claim = asyncio.create_task(
                repository.claim_next(["a", "b"], "p1", max_inflight=1, pick=for_b))
            await blocked(observer, claim)
            assert not claim.done()
            assert await observer.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted") == 1
        async with asyncio.timeout(10):
            taken = await claim
    assert taken.job is not None and taken.job.id == job.id
    assert (taken.job.backend, taken.counted, taken.backlog, taken.next) == \
        ("b", ("a", "b"), 0, 2)


async def test_the_next_backend_takes_a_job_only_into_a_free_slot(engine: AsyncEngine) -> None:
    repository = await backends_a_and_b(engine)
    for _ in range(2):
        await repository.insert(Job(workflow="w", prompt={}))
    first = await repository.claim_next(["b"], "p1", max_inflight=1, pick=for_b)
    assert first.job is not None and first.job.status == JobStatus.DISPATCHED
    # "a" has its slot free, "b" none: the job "b" would take stays queued.
    claim = await repository.claim_next(["a", "b"], "p2", max_inflight=1, pick=for_b)
    assert claim[:5] == (None, ("a", "b"), 1, 2, Refusal.NO_SLOT)
    async with driver_connection(engine) as connection:
        assert await connection.fetchval(
            "SELECT count(*) FROM jobs WHERE status = 'queued'") == 1


async def test_the_next_backend_takes_no_job_while_it_is_draining(engine: AsyncEngine) -> None:
    repository = await backends_a_and_b(engine)
    await repository.insert(Job(workflow="w", prompt={}))
    async with driver_connection(engine) as connection:  # drained since the caller looked
        await connection.execute("UPDATE backends SET draining = true WHERE name = 'b'")
    claim = await repository.claim_next(["a", "b"], "p1", max_inflight=1, pick=for_b)
    assert claim[:5] == (None, ("a", "b"), 1, 2, Refusal.NOT_ACCEPTING)


async def test_a_claim_takes_the_prompt_of_a_job_it_read_before_from_memory(
    engine: AsyncEngine,
) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine)
    job, _ = await repository.insert(Job(workflow="w", prompt={"1": {"class_type": "Old"}}))
    seen: list[dict[str, Any]] = []

    def look(_: str, read: BacklogRead) -> None:
        seen.append(read.queued[0].prompt)

    await repository.claim_next(["a"], "p1", max_inflight=1, pick=look)
    # Changed behind the repositories' backs (a job's prompt never changes): only a claim
    # that reads the prompt again sees it.
    async with driver_connection(engine) as connection:
        await connection.execute(
            """UPDATE jobs SET prompt = '{"1": {"class_type": "New"}}' WHERE id = $1""", job.id)
    await repository.claim_next(["a"], "p2", max_inflight=1, pick=look)
    await JobRepository(engine).claim_next(["a"], "p3", max_inflight=1, pick=look)
    assert [prompt["1"]["class_type"] for prompt in seen] == ["Old", "Old", "New"]


async def test_a_claim_takes_what_never_changes_of_a_job_it_read_before_from_memory(
    engine: AsyncEngine,
) -> None:
    # Its workflow, priority, created_at and tenant, like its prompt: the read gives a job it
    # was told the caller holds only as far as it may change (how often it was passed).
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine)
    await repository.insert(Job(workflow="old", prompt={}, priority=1, api_key_hash="k"))
    seen: list[tuple[str, int, datetime, str]] = []

    def look(_: str, read: BacklogRead) -> None:
        job = read.queued[0]
        seen.append((job.workflow, job.priority, job.created_at, job.tenant))

    await repository.claim_next(["a"], "p1", max_inflight=1, pick=look)
    # Changed behind the repositories' backs (no statement changes them once a job is
    # stored): only a claim that reads the job whole sees it.
    async with driver_connection(engine) as connection:
        await connection.execute(
            "UPDATE jobs SET workflow = 'new', priority = 2, api_key_hash = 'l',"
            " created_at = created_at - interval '1 hour'")
    await repository.claim_next(["a"], "p2", max_inflight=1, pick=look)
    await JobRepository(engine).claim_next(["a"], "p3", max_inflight=1, pick=look)
    assert seen[0] == seen[1] and seen[0][::3] == ("old", "k")
    assert seen[2][:2] == ("new", 2) and seen[2][2] < seen[0][2] and seen[2][3] == "l"


def first(_: str, read: BacklogRead) -> Choice | None:
    return Choice(read.queued[0].id) if read.queued else None


async def test_the_job_a_claim_takes_is_the_job_as_stored(engine: AsyncEngine) -> None:
    # Built from the take's row and what the read gave (the take returns no prompt): every
    # column as the database has it once taken.
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine)
    job, _ = await repository.insert(Job(
        workflow="w", prompt={"1": {"class_type": "C", "inputs": {"x": 1}}}, priority=3,
        params={"seed": 5}, labels={"team": "t"}, client_task_id="task", api_key_hash="k",
        callback_url="http://127.0.0.1:9/hook", webhook_events=["job.succeeded"],
        fingerprint="f", warnings=[{"type": "ignored"}], webhook_format="comfyui-server"))
    taken = (await repository.claim_next(["a"], "p1", max_inflight=1, pick=first,
                                         owner=7)).job
    stored = await JobRepository(engine).get(job.id)
    assert taken is not None and stored is not None
    assert taken.model_dump() == stored.model_dump()
    assert (taken.status, taken.backend, taken.prompt_id, taken.dispatched_by) == \
        (JobStatus.DISPATCHED, "a", "p1", 7)


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


CONTROL = re.compile(r"\s*(begin|commit|rollback)\b", re.IGNORECASE)  # a transaction's


async def watched_statements(engine: AsyncEngine) -> list[str]:
    """The statements `engine`'s connections run from now on: their names in sql/*.sql, or
    BEGIN, COMMIT and ROLLBACK (others left out). asyncpg tells them soon after each runs:
    read it after an `asyncio.sleep(0)`."""
    names = {text: name for file in ("claim", "jobs")
             for name, text in sql.queries(file).items()}
    statements: list[str] = []

    def told(query: Any) -> None:
        if query.query in names or CONTROL.match(query.query):
            statements.append(names.get(query.query) or query.query.strip().upper())

    def watch(connection: Any, _: Any) -> None:
        connection.driver_connection.add_query_logger(told)

    await engine.dispose()  # every connection from now on is watched
    event.listen(engine.sync_engine, "connect", watch)
    return statements


async def test_a_claim_is_two_statements_in_no_transaction_one_on_the_read_of_a_take(
    engine: AsyncEngine,
) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    statements = await watched_statements(engine)
    claims = []
    for limit in None, 2:
        repository = JobRepository(engine, max_concurrent_per_key=limit)
        for _ in range(2):
            await repository.insert(Job(workflow="w", prompt={}))
        await asyncio.sleep(0)
        statements.clear()
        claim = await repository.claim_next(["a"], f"p{limit}", max_inflight=2, pick=first)
        after = await repository.claim_next(["a"], f"q{limit}", max_inflight=2, pick=first,
                                            read=claim.read)
        assert claim.job is not None and after.job is not None
        await asyncio.sleep(0)
        claims.append(list(statements))
        async with driver_connection(engine) as connection:
            await connection.execute("UPDATE jobs SET status = 'succeeded'")
    # No BEGIN, no COMMIT: a read, and a take that locks the backend and (with a limit to
    # hold) the tenant itself; then, on the read that take made, the next claim's take.
    assert claims == [["claim"] * 3] * 2


async def test_the_read_a_take_makes_is_the_backlog_it_leaves(engine: AsyncEngine) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine, max_concurrent_per_key=2)
    for key in None, "k", None, "k", None:
        await repository.insert(Job(workflow="w", prompt={}, api_key_hash=key))
    reads: list[list[QueuedJob]] = []

    def second_of_no_key(_: str, read: BacklogRead) -> Choice | None:
        reads.append(read.queued)
        own = [job for job in read.queued if job.tenant == ""]
        return Choice(own[1].id, (own[0].id,), charge=5.0) if len(reads) == 1 else None

    claim = await repository.claim_next(["a"], "p1", max_inflight=4, pick=second_of_no_key,
                                        window=3)
    assert claim.job is not None and claim.read is not None
    # The claim after it reads the backlog afresh: the same jobs, its job gone, the one it
    # passed passed once more, its tenant charged (second in virtual time now).
    await repository.claim_next(["a"], "p2", max_inflight=4, pick=second_of_no_key)
    assert claim.read.queued == reads[1] and claim.read.backlog == 2
    assert [(job.tenant, job.overtaken) for job in reads[1]] == [
        ("k", 0), ("k", 0), ("", 1), ("", 0)]


async def test_a_read_keeps_the_jobs_the_caller_holds_but_for_their_overtaken_counts(
    engine: AsyncEngine,
) -> None:
    """The read gives a job the caller holds by its place in the read it holds: its QueuedJob
    stays the same object while its overtaken count does (a tenant's values, which move with
    every charge, are the read's, once a tenant)."""
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine)
    for _ in range(4):
        await repository.insert(Job(workflow="w", prompt={}))
    reads: list[BacklogRead] = []

    def second(_: str, read: BacklogRead) -> Choice | None:
        reads.append(read)
        return Choice(read.queued[1].id, (read.queued[0].id,), charge=5.0) \
            if len(reads) == 1 else None

    claim = await repository.claim_next(["a"], "p1", max_inflight=4, pick=second)
    assert claim.job is not None and claim.read is not None
    before, after = reads[0].queued, claim.read.queued
    assert after[0] == before[0]._replace(overtaken=1) and after[0] is not before[0]
    assert after[1] is before[2] and after[2] is before[3]
    assert (reads[0].tenants[""].start, claim.read.tenants[""].start) == (0.0, 5.0)
    # A pass's first read (no read of the claim before it): the latest read's jobs again.
    await repository.claim_next(["a"], "p2", max_inflight=4, pick=second)
    assert all(again is held for again, held in zip(reads[1].queued, after, strict=True))


async def test_a_read_gives_each_tenant_once_and_says_once_whether_a_backlog_goes_on(
    engine: AsyncEngine,
) -> None:
    """A read's tenants come once each, with their first job read (in the one pass over the
    jobs read), and `beyond` says whether any tenant's backlog goes on past its jobs read (its
    last read is its ceil(CLAIM_BATCH / tenants)th): deep enough for every backend."""
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine)
    async with driver_connection(engine) as connection:
        await connection.execute("INSERT INTO api_keys (name, key_hash, max_concurrent, weight)"
                                 " VALUES ('limited', 'k', 3, 2)")
    for key in None, "k", None:
        await repository.insert(Job(workflow="w", prompt={}, api_key_hash=key))
    reads: list[BacklogRead] = []

    def look(_: str, read: BacklogRead) -> None:
        reads.append(read)

    await repository.claim_next(["a"], "p1", max_inflight=1, pick=look)
    assert not reads[0].beyond
    assert reads[0].tenants == {"": TenantHead(0.0, 1, False), "k": TenantHead(0.0, 2, True)}
    # Two tenants read: ceil(CLAIM_BATCH / 2) jobs of each at most, so the read stops at
    # that many of the jobs of no key.
    for _ in range(CLAIM_BATCH // 2):
        await repository.insert(Job(workflow="w", prompt={}))
    await repository.claim_next(["a"], "p2", max_inflight=1, pick=look)
    assert reads[1].beyond and set(reads[1].tenants) == {"", "k"}
    assert len(reads[1].queued) == CLAIM_BATCH // 2 + 1


def test_every_query_is_short_enough_for_asyncpg_to_keep_it_prepared() -> None:
    """asyncpg prepares a statement longer than its max_cacheable_statement_size again at
    every call: each named query fits, its comment lines not sent."""
    limit = inspect.signature(asyncpg.connect).parameters["max_cacheable_statement_size"]
    for path in Path(sql.__file__).parent.glob("*.sql"):
        for name, query in sql.queries(path.stem).items():
            assert len(query) <= limit.default, (path.name, name)


async def test_a_move_counts_its_targets_slots_under_its_lock_in_one_statement(
    engine: AsyncEngine,
) -> None:
    repository = await backends_a_and_b(engine)
    moving, filling = [(await repository.insert(Job(workflow="w", prompt={})))[0]
                       for _ in range(2)]
    claimed = (await repository.claim_next(["a"], "pa", max_inflight=1, pick=first)).job
    assert claimed is not None and claimed.id == moving.id
    statements = await watched_statements(engine)
    async with driver_connection(engine) as elsewhere, driver_connection(engine) as observer:
        async with elsewhere.transaction():
            # Another process's take fills "b"'s one slot, committed while the move waits
            # for "b"'s lock.
            await elsewhere.execute("SELECT pg_advisory_xact_lock(hashtext('b'))")
            await elsewhere.execute(
                "UPDATE jobs SET status = 'dispatched', backend = 'b', prompt_id = 'pb',"
                " attempts = attempts + 1 WHERE id = $1", filling.id)
            move = asyncio.create_task(repository.move(claimed, "b", "moved", max_inflight=1))
            await blocked(observer, move)
            assert not move.done()
        async with asyncio.timeout(10):
            assert await move is None  # no slot on "b" by then: the job stays where it was
        assert await observer.fetch("SELECT prompt_id, backend FROM jobs ORDER BY prompt_id") \
            == [("pa", "a"), ("pb", "b")]
        await observer.execute("UPDATE jobs SET status = 'succeeded' WHERE id = $1", filling.id)
    await asyncio.sleep(0)
    statements.clear()
    moved = await repository.move(claimed, "b", "moved", max_inflight=1)  # "b" free again
    assert moved is not None and (moved.backend, moved.prompt_id) == ("b", "moved")
    await asyncio.sleep(0)
    assert statements == ["move"]  # no BEGIN, no COMMIT


async def test_a_claim_takes_no_job_of_a_tenant_limited_since_its_read_unlocked(
    engine: AsyncEngine,
) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine)
    await repository.insert(Job(workflow="w", prompt={}))

    def limited_meanwhile(_: str, read: BacklogRead) -> Choice | None:
        # As an admin's new limit committed between the claim's read and its take: the
        # claim read no limit and took no lock for the tenant, so its count could miss
        # another claim's.
        repository._max_concurrent = 1
        return first("a", read)

    claim = await repository.claim_next(["a"], "p1", max_inflight=1, pick=limited_meanwhile)
    assert (claim.job, claim.refusal) == (None, Refusal.TENANT_LIMIT)
    # The next claim reads the limit and takes the tenant's lock.
    claim = await repository.claim_next(["a"], "p2", max_inflight=1, pick=first)
    assert claim.job is not None


def last(_: str, read: BacklogRead) -> Choice | None:
    queued = read.queued
    return Choice(queued[-1].id, tuple(job.id for job in queued[:-1])) if queued else None


async def test_a_claim_reads_without_waiting_for_the_backends_lock_and_takes_under_it(
    engine: AsyncEngine,
) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine)
    job, _ = await repository.insert(Job(workflow="w", prompt={}))
    picked: list[QueuedJob] = []

    def watched(backend: str, read: BacklogRead) -> Choice | None:
        picked.extend(read.queued)
        return first(backend, read)

    async with driver_connection(engine) as elsewhere, driver_connection(engine) as observer:
        async with elsewhere.transaction():
            # A take or move for "a" under way in another process: this claim reads and picks
            # meanwhile, and its take waits for it.
            await elsewhere.execute("SELECT pg_advisory_xact_lock(hashtext('a'))")
            claim = asyncio.create_task(
                repository.claim_next(["a"], "p1", max_inflight=1, pick=watched))
            await blocked(observer, claim)
            assert not claim.done()
            assert [queued.id for queued in picked] == [job.id]
        async with asyncio.timeout(10):
            taken = await claim
    assert taken.job is not None and taken.job.id == job.id


async def test_a_slot_another_process_filled_after_the_read_is_refused_at_the_take(
    engine: AsyncEngine,
) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine)
    filled, chosen = [(await repository.insert(Job(workflow="w", prompt={})))[0]
                      for _ in range(2)]
    # Another process's take fills "a"'s one slot; it has not committed when this claim reads
    # the slot free, and commits while this take waits for the lock.
    refused, statuses = await claimed_while_taken_elsewhere(
        engine, repository, filled, "a", locks=["a"], prompt_id="p1")
    # Counted under the lock, after that take: the slot is full, the job stays queued.
    assert refused[:5] == (None, ("a",), 1, 1, Refusal.NO_SLOT)  # one job queued left
    assert statuses == [(filled.id, "dispatched"), (chosen.id, "queued")]


async def test_a_tenant_at_its_limit_by_a_take_committed_after_the_read_is_refused(
    engine: AsyncEngine,
) -> None:
    await backends_a_and_b(engine)
    repository = JobRepository(engine, max_concurrent_per_key=1)
    elsewhere_taken, chosen = [(await repository.insert(Job(workflow="w", prompt={})))[0]
                               for _ in range(2)]
    # Another process's take gives the tenant (no key) its one job on a backend ("b"); it
    # commits while this claim's take for "a" waits for the tenant's lock.
    refused, statuses = await claimed_while_taken_elsewhere(
        engine, repository, elsewhere_taken, "b", locks=["b", "concurrent:"], prompt_id="pa")
    assert (refused.job, refused.refusal) == (None, Refusal.TENANT_LIMIT)
    assert statuses == [(elsewhere_taken.id, "dispatched"), (chosen.id, "queued")]


async def claimed_while_taken_elsewhere(
    engine: AsyncEngine, repository: JobRepository, taken: Job, backend: str, *,
    locks: list[str], prompt_id: str,
) -> tuple[Claim, list[Any]]:
    """A claim for backend "a" (as prompt `prompt_id`, picking the last job it reads), made
    while another transaction holds the advisory `locks` and takes `taken` onto `backend`,
    committing once the claim's take waits; the claim, and every job's id and status after."""
    async with driver_connection(engine) as elsewhere, driver_connection(engine) as observer:
        async with elsewhere.transaction():
            for lock in locks:
                await elsewhere.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock)
            await elsewhere.execute(
                "UPDATE jobs SET status = 'dispatched', backend = $2, prompt_id = $3,"
                " attempts = attempts + 1 WHERE id = $1", taken.id, backend, f"p{backend}")
            claim = asyncio.create_task(
                repository.claim_next(["a"], prompt_id, max_inflight=1, pick=last))
            await blocked(observer, claim)
        async with asyncio.timeout(10):
            refused = await claim
        return refused, list(await observer.fetch(
            "SELECT id, status FROM jobs ORDER BY created_at"))


def widest(window: int) -> Callable[[str, BacklogRead], Choice | None]:
    """A pick that passes as many jobs as `window` allows (as placement may): it takes the
    last job before the first passed `window` times already, or that one."""
    def pick(_: str, read: BacklogRead) -> Choice | None:
        due = next((index for index, job in enumerate(read.queued)
                    if job.overtaken >= window), len(read.queued) - 1)
        band = read.queued[:due + 1]
        return Choice(band[-1].id, tuple(job.id for job in band[:-1])) if band else None
    return pick


async def blocked(observer: Any, claim: asyncio.Task[Any]) -> None:
    """Until `claim` waits for a lock (or is done: it did not wait)."""
    async with asyncio.timeout(10):
        while not claim.done() and not await observer.fetchval(  # noqa: ASYNC110
                "SELECT count(*) FROM pg_locks WHERE NOT granted"):
            await asyncio.sleep(0.01)


async def test_no_job_is_passed_uncounted_or_past_the_window_by_claims_side_by_side(
    engine: AsyncEngine,
) -> None:
    repository = await backends_a_and_b(engine)
    oldest, middle, newest = [(await repository.insert(Job(workflow="w", prompt={})))[0]
                              for _ in range(3)]
    async with driver_connection(engine) as elsewhere, driver_connection(engine) as observer:
        async with elsewhere.transaction():
            # Another process's claim for "a" takes the middle job, passing the oldest (its
            # take's writes, not committed yet): the oldest is passed once, the window.
            await elsewhere.execute(
                "UPDATE jobs SET overtaken = overtaken + 1 WHERE id = $1", oldest.id)
            await elsewhere.execute(
                "UPDATE jobs SET status = 'dispatched', backend = 'a', prompt_id = 'pa',"
                " attempts = attempts + 1 WHERE id = $1", middle.id)
            claim = asyncio.create_task(repository.claim_next(
                ["b"], "pb", max_inflight=1, pick=widest(1), window=1))
            # It waits to know what it passes. (Had it skipped the jobs locked, it would take
            # the newest and pass the oldest a second time, uncounted.)
            await blocked(observer, claim)
        async with asyncio.timeout(10):
            taken = await claim
        # Its read had the oldest passed no time, but it is passed once by now: the newest
        # would pass it past the window; the claim reads again and takes the oldest.
        assert taken.job is not None and taken.job.id == oldest.id
        assert await observer.fetch(
            "SELECT id, status, overtaken FROM jobs ORDER BY created_at") == [
            (oldest.id, "dispatched", 1), (middle.id, "dispatched", 0),
            (newest.id, "queued", 0)]


async def test_a_claim_reads_the_backlog_while_another_backends_claim_holds_its_read(
    engine: AsyncEngine,
) -> None:
    repository = await backends_a_and_b(engine)
    job, _ = await repository.insert(Job(workflow="w", prompt={}))
    async with driver_connection(engine) as elsewhere, elsewhere.transaction():
        # Another process's claim for "a" has read the backlog and not taken anything yet.
        read = await claim_statement(elsewhere, "a")
        assert [queued[0] for queued in read["fresh"]] == [job.id]
        async with asyncio.timeout(10):
            claim = await repository.claim_next(["b"], "pb", max_inflight=1, pick=first)
        # The claim for "b" neither waits for it nor finds the backlog hidden.
        assert claim.job is not None and claim.job.id == job.id


async def test_a_claim_that_loses_its_job_to_another_picks_again_on_what_its_take_found(
    engine: AsyncEngine,
) -> None:
    repository = await backends_a_and_b(engine)
    lost, next_one = [(await repository.insert(Job(workflow="w", prompt={})))[0]
                      for _ in range(2)]
    picked: list[list[uuid.UUID]] = []

    def watched(backend: str, read: BacklogRead) -> Choice | None:
        picked.append([job.id for job in read.queued])
        return first(backend, read)

    async with driver_connection(engine) as elsewhere, driver_connection(engine) as observer:
        async with elsewhere.transaction():
            # Another process's claim for "a" is taking the oldest job.
            await elsewhere.execute(
                "UPDATE jobs SET status = 'dispatched', backend = 'a', prompt_id = 'pa',"
                " attempts = attempts + 1 WHERE id = $1", lost.id)
            claim = asyncio.create_task(
                repository.claim_next(["b"], "pb", max_inflight=1, pick=watched))
            await blocked(observer, claim)
            assert not claim.done()  # it waits to know whether the oldest is still queued
        async with asyncio.timeout(10):
            taken = await claim
    assert taken.job is not None and taken.job.id == next_one.id
    assert (taken.job.backend, taken.counted, taken.next) == ("b", ("b",), 1)
    # Its take's read began before the other take committed, but has the job it found taken
    # off the backlog: the second pick is on the backlog as it is.
    assert picked == [[lost.id, next_one.id], [next_one.id]]


async def test_a_claim_that_keeps_losing_its_job_gives_up_after_its_takes(
    engine: AsyncEngine,
) -> None:
    await BackendRegistry(engine).seed([Backend("a", "http://127.0.0.1:1")])
    repository = JobRepository(engine)
    gone, _ = await repository.insert(Job(workflow="w", prompt={}))
    await repository.insert(Job(workflow="w", prompt={}))
    taken = await repository.claim_next(["a"], "p1", max_inflight=2, pick=first)
    assert taken.job is not None and taken.job.id == gone.id
    picks = 0

    def stale(_: str, read: BacklogRead) -> Choice:
        nonlocal picks
        picks += 1
        return Choice(gone.id)  # as if each read had predated another claim's take of it

    claim = await repository.claim_next(["a"], "p2", max_inflight=2, pick=stale)
    assert (claim.job, claim.refusal, claim.next, picks) == (None, Refusal.RACED, 1, CLAIM_TAKES)


async def claim_statement(
    connection: Any, backend: str, *, job: uuid.UUID | None = None,
    passed: list[uuid.UUID] | None = None, seen: str = "{}", window: int | None = None,
) -> Any:
    """sql/claim.sql `claim` run for `backend` (one slot, prompt "p" + its name): taking `job`
    (None: only reading), passing `passed`, the caller having read `seen` (a read's `ids`)."""
    return await connection.fetchrow(
        sql.queries("claim")["claim"], job, passed or [], backend, f"p{backend}", None, 1.0,
        None, 1, [], None, window, seen, CLAIM_BATCH, "{}")


async def take_after_requeue(engine: AsyncEngine, repository: JobRepository, *,
                             overtaken: int, window: int) -> tuple[Any, list[Any]]:
    """Four jobs, oldest first: one on backend "b" (passed `overtaken` times before it was
    claimed), one backend "a" cannot run, one "a" passes and the one it takes. A claim for "a"
    reads the backlog (the first job not in it); that job is requeued (its backend lost) before
    the claim's take: the take's row, and each job's id, status and overtaken after."""
    lost, skipped, passed, chosen = [(await repository.insert(Job(workflow="w", prompt={})))[0]
                                     for _ in range(4)]
    on_b = (await repository.claim_next(["b"], "pb", max_inflight=1, pick=first)).job
    assert on_b is not None and on_b.id == lost.id
    async with driver_connection(engine) as connection:
        await connection.execute("UPDATE jobs SET overtaken = $2 WHERE id = $1", lost.id,
                                 overtaken)
        read = await claim_statement(connection, "a")
        assert [job[0] for job in read["fresh"]] == [skipped.id, passed.id, chosen.id]
        assert await repository.requeue(on_b) is not None  # back with its old created_at
        taken = await claim_statement(connection, "a", job=chosen.id, passed=[passed.id],
                                      seen=read["ids"], window=window)
        return taken, list(await connection.fetch(
            "SELECT id, status, overtaken FROM jobs ORDER BY created_at"))


async def test_a_job_requeued_after_the_read_is_counted_as_passed_by_the_take(
    engine: AsyncEngine,
) -> None:
    taken, jobs = await take_after_requeue(engine, await backends_a_and_b(engine),
                                           overtaken=0, window=2)
    assert taken["refusal"] is None and taken["prompt_id"] == "pa"
    # The requeued job, which the read never saw, counted as the job the pick passed is; the
    # one it saw and did not pass (not runnable there) not.
    assert [(status, overtaken) for _, status, overtaken in jobs] == [
        ("queued", 1), ("queued", 0), ("queued", 1), ("dispatched", 0)]


async def test_a_job_requeued_after_the_read_is_not_passed_past_the_window(
    engine: AsyncEngine,
) -> None:
    taken, jobs = await take_after_requeue(engine, await backends_a_and_b(engine),
                                           overtaken=2, window=2)
    # Passed as often as the window allows before it was claimed: the take is refused, and
    # the claim reads the backlog again (where the requeued job is due).
    assert (taken["id"], taken["refusal"]) == (None, "raced")
    assert [(status, overtaken) for _, status, overtaken in jobs] == [
        ("queued", 2), ("queued", 0), ("queued", 0), ("queued", 0)]


def a_take(prompt_id: str = "p1", *, charge: float = 2.0) -> Take:
    """A take for backend "a" of one slot, chosen before its job is stored."""
    return Take("a", prompt_id, charge, owner=None, max_inflight=1, ended=[])


async def never_claimed(why: Refusal | Exception, _: Any) -> Job | None:
    raise AssertionError(f"the take was refused: {why!r}")


async def test_a_job_is_stored_already_taken_in_one_statement(engine: AsyncEngine) -> None:
    repository = await backends_a_and_b(engine)
    statements: list[str] = []

    def watch(connection: Any, _: Any) -> None:
        connection.driver_connection.add_query_logger(
            lambda query: statements.append(query.query))

    await engine.dispose()  # every connection from here on is watched
    event.listen(Pool, "connect", watch)
    job = Job(workflow="w", prompt={"1": {}})
    try:
        taken, created = await repository.insert(job, dispatch=Dispatch(a_take(),
                                                                         never_claimed))
    finally:
        event.remove(Pool, "connect", watch)
    await asyncio.sleep(0)  # query loggers are called soon after, not at once
    # No BEGIN, no COMMIT, no read: one round trip.
    assert statements == [sql.queries("claim")["insert_taken"]]
    assert created
    assert (taken.id, taken.status, taken.backend, taken.prompt_id, taken.attempts) == \
        (job.id, JobStatus.DISPATCHED, "a", "p1", 1)
    assert taken.dispatched_at is not None and taken.prompt == job.prompt
    async with driver_connection(engine) as connection:
        row = await connection.fetchrow(
            "SELECT status, dispatched_at, charged_seconds FROM jobs WHERE id = $1", job.id)
        # Its tenant (no key) charged as a claim's take charges it.
        charged = await connection.fetchval(
            "SELECT unsettled_seconds FROM tenant_shares WHERE tenant = ''")
    assert (row["status"], row["dispatched_at"], row["charged_seconds"], charged) == \
        ("dispatched", taken.dispatched_at, 2.0, 2.0)


async def refused_take(repository: JobRepository, engine: AsyncEngine, job: Job
                       ) -> tuple[list[Any], list[Any]]:
    """`job` offered to `a_take()`, refused: why, as its claim is told, with the job's status
    in the claim's transaction; and then each job's status and charge."""
    told: list[Any] = []

    async def claim(why: Refusal | Exception, connection: Any) -> Job | None:
        told.extend([why, await connection.fetchval(
            "SELECT status FROM jobs WHERE id = $1", job.id)])
        return None

    stored, created = await repository.insert(job, dispatch=Dispatch(a_take(), claim))
    assert created and stored.status == JobStatus.QUEUED
    async with driver_connection(engine) as connection:
        return told, [tuple(row) for row in await connection.fetch(
            "SELECT status, charged_seconds FROM jobs ORDER BY created_at")]


async def test_a_take_before_the_insert_yields_to_a_queued_job(engine: AsyncEngine) -> None:
    repository = await backends_a_and_b(engine)
    await repository.insert(Job(workflow="w", prompt={}))
    # Nothing written by the take: the insert in the claim's transaction stores the job.
    assert await refused_take(repository, engine, Job(workflow="w", prompt={})) == (
        [Refusal.QUEUED, "queued"], [("queued", None), ("queued", None)])


async def test_a_take_before_the_insert_counts_the_slots_of_every_process(
    engine: AsyncEngine,
) -> None:
    repository = await backends_a_and_b(engine)
    # Another process's prompt fills "a"'s one slot.
    await repository.insert(Job(workflow="w", prompt={}, status=JobStatus.RUNNING,
                                backend="a", prompt_id="elsewhere", attempts=1))
    assert await refused_take(repository, engine, Job(workflow="w", prompt={})) == (
        [Refusal.NO_SLOT, "queued"], [("running", None), ("queued", None)])


async def test_a_take_before_the_insert_is_refused_by_a_draining_backend(
    engine: AsyncEngine,
) -> None:
    repository = await backends_a_and_b(engine)
    async with driver_connection(engine) as connection:
        await connection.execute("UPDATE backends SET draining = true WHERE name = 'a'")
    assert await refused_take(repository, engine, Job(workflow="w", prompt={})) == (
        [Refusal.NOT_ACCEPTING, "queued"], [("queued", None)])


async def test_a_take_before_the_insert_keeps_to_its_tenants_limit(engine: AsyncEngine) -> None:
    await backends_a_and_b(engine)
    repository = JobRepository(engine, max_concurrent_per_key=1)
    await repository.insert(Job(workflow="w", prompt={}, status=JobStatus.RUNNING,
                                backend="b", prompt_id="on-b", attempts=1))
    assert await refused_take(repository, engine, Job(workflow="w", prompt={})) == (
        [Refusal.TENANT_LIMIT, "queued"], [("running", None), ("queued", None)])


async def test_a_take_before_the_insert_of_a_repeat_takes_nothing(engine: AsyncEngine) -> None:
    repository = await backends_a_and_b(engine)
    earlier, _ = await repository.insert(Job(workflow="w", prompt={}, client_task_id="t"))
    found, created = await repository.insert(Job(workflow="w", prompt={}, client_task_id="t"),
                                             dispatch=Dispatch(a_take(), never_claimed))
    assert (found.id, found.status, created) == (earlier.id, JobStatus.QUEUED, False)
    async with driver_connection(engine) as connection:
        assert await connection.fetchval("SELECT count(*) FROM tenant_shares") == 0


async def test_claim_locks_counts_each_tenants_jobs_on_one_plan_for_every_tenant(
    engine: AsyncEngine,
) -> None:
    # claim_locks() plans its statements once per connection, not per call (migration 0038):
    # the plan made for the first tenant it counted counts every other tenant's jobs too.
    repository = await backends_a_and_b(engine)
    for key, status in ((None, JobStatus.RUNNING), (None, JobStatus.UPLOADING),
                        ("k1", JobStatus.DISPATCHED), ("k1", JobStatus.QUEUED),
                        ("k2", JobStatus.SUCCEEDED)):
        await repository.insert(Job(workflow="w", prompt={}, api_key_hash=key, status=status,
                                    backend=None if status == JobStatus.QUEUED else "a"))
    expected = {"": 2, "k1": 1, "k2": 0, None: None}
    async with driver_connection(engine) as connection:
        assert await connection.fetch(
            "SELECT proname, proconfig FROM pg_proc"
            " WHERE proname IN ('claim_locks', 'settle_tenant_charge') ORDER BY proname") == [
            ("claim_locks", ["plan_cache_mode=force_generic_plan"]),
            ("settle_tenant_charge", ["plan_cache_mode=force_generic_plan"])]
        for tenant in [*expected, *expected, *expected]:  # past the custom plans PostgreSQL tries
            counted = await connection.fetchrow(
                "SELECT * FROM claim_locks('a', $1, '{}')", tenant)
            assert counted is not None
            assert (counted["on_gpu"], counted["tenant_on_backends"]) == (2, expected[tenant])


async def test_the_read_counts_only_the_limited_tenants_on_one_plan_for_every_limit(
    engine: AsyncEngine,
) -> None:
    # The read counts a tenant's jobs on backends only when it has a limit, its own or the
    # keys' default, by two cases (no key, a key) of one plan kept for the connection: each
    # read below is run three times, past the custom plans PostgreSQL tries first.
    repository = await backends_a_and_b(engine)
    async with driver_connection(engine) as connection:
        await connection.execute("INSERT INTO api_keys (name, key_hash, max_concurrent)"
                                 " VALUES ('limited', 'k', 2), ('free', 'f', NULL)")
    for key, running in ((None, 1), ("f", 2), ("k", 1)):
        for _ in range(running):
            await repository.insert(Job(workflow="w", prompt={}, api_key_hash=key,
                                        status=JobStatus.RUNNING, backend="b", attempts=1))
        for _ in range(2):
            await repository.insert(Job(workflow="w", prompt={}, api_key_hash=key))

    async def tenants_read(connection: Any, default_limit: int | None,
                           take: Any = None) -> tuple[str | None, set[str]]:
        """The refusal of the take of `take` (a head read: None, only reading) and the
        tenants whose jobs the read gives, keys without their own limit at `default_limit`."""
        row = await connection.fetchrow(
            sql.queries("claim")["claim"], take and take[0], [], "a", "pa", None, 1.0,
            default_limit, 4, [], take and take[5], None, "{}", CLAIM_BATCH, "{}")
        return row["refusal"], {tenant[0] for tenant in row["tenants"]}

    async with driver_connection(engine) as connection:
        for default_limit, tenants in ((None, {"", "f", "k"}), (1, {"k"}), (2, {"", "k"})):
            for _ in range(3):
                assert await tenants_read(connection, default_limit) == (None, tenants)
        row = await connection.fetchrow(
            sql.queries("claim")["claim"], None, [], "a", "pa", None, 1.0, None, 4, [], None,
            None, "{}", CLAIM_BATCH, "{}")
        limited = next(job for job in row["fresh"] if job[5] == "k")
        # The read after a take counts the job taken, which its snapshot does not see: "k"
        # is at its limit of 2 by then.
        assert await tenants_read(connection, None, limited) == (None, {"", "f"})
