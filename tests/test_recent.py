"""A value shared by every ask: one read per max_age at most, whatever the asks, and after the
first none waited for."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet import sql
from comfyfleet.db import driver_connection
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.jobs.recent import Recent
from comfyfleet.jobs.repository import RUN_TIMES_KEPT, JobRepository
from tests.support import statements_run


class Counter:
    """Each read a new number; a read waits until `release` is set (`reading` is set as it
    begins)."""

    def __init__(self) -> None:
        self.reads = 0
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def read(self) -> int:
        self.reads += 1
        self.reading.set()
        await self.release.wait()
        return self.reads


async def test_asks_share_one_read_and_take_the_last_value_while_it_is_read_again() -> None:
    counter = Counter()
    fresh = Recent(counter.read, max_age=3600.0)
    first = [asyncio.create_task(fresh.get()) for _ in range(5)]
    await counter.reading.wait()  # the first ask reading, the others waiting for it
    counter.release.set()
    assert await asyncio.gather(*first) == [1] * 5
    assert await fresh.get() == 1 and counter.reads == 1

    counter = Counter()
    always = Recent(counter.read, max_age=0.0)
    counter.release.set()
    assert await always.get() == 1
    counter.release.clear()
    counter.reading.clear()
    assert await always.get() == 1  # the second read begun in the background
    await counter.reading.wait()
    assert [await always.get(), always.latest()] == [1, 1]  # one read at a time, not waited for
    counter.release.set()
    assert await always.fresh() == 3 and counter.reads == 3  # after the one under way
    await always.close()


async def test_an_ask_after_a_failed_first_read_reads_again() -> None:
    reads = 0

    async def read() -> int:
        nonlocal reads
        reads += 1
        if reads == 1:
            raise ConnectionError("the database is away")
        return reads

    recent = Recent(read, max_age=3600.0)
    with pytest.raises(ConnectionError):
        await recent.get()
    assert recent.latest() is None
    assert await recent.get() == 2
    await recent.close()


async def test_a_value_told_of_changes_is_read_again_after_them_at_most_once_per_max_age(
) -> None:
    """... and only if asked for since its last read began: nobody asking, nothing is read
    (0.1 s of the database's time for a snapshot of 100,000 queued jobs)."""
    counter = Counter()
    counter.release.set()
    told = Recent(counter.read, max_age=0.2)
    assert await told.fresh() == 1
    assert told.latest() == 1
    told.changed()
    told.changed()
    await asyncio.sleep(0.1)
    assert counter.reads == 1  # not before max_age since the last read began
    await asyncio.sleep(0.2)
    assert counter.reads == 2 and told.latest() == 2  # once for both changes, unasked
    await asyncio.sleep(0.3)
    assert counter.reads == 2  # no change since: nothing read, nothing due
    told.changed()
    await asyncio.sleep(0.1)
    assert counter.reads == 3  # asked since the last read began (above): read at once
    told.changed()
    await asyncio.sleep(0.3)
    assert counter.reads == 3  # nobody asked since that read began: not read again
    assert told.latest() == 3  # the first ask after takes the value before, and begins one
    await asyncio.sleep(0.05)
    assert counter.reads == 4 and told.latest() == 4
    await told.close()


async def test_a_repository_keeps_the_run_times_of_the_workflows_asked_about_last(
    engine: AsyncEngine,
) -> None:
    """v2 jobs' workflows are the shapes of any graph a client sends: the run times kept for
    their ETAs are those of the RUN_TIMES_KEPT asked about last, not one per shape ever seen."""
    repository = JobRepository(engine, position_max_age=3600.0)
    read = sql.queries("reads")["mean_run_seconds"]
    async with statements_run(engine) as ran:
        for shape in range(RUN_TIMES_KEPT + 1):
            assert await repository.recent_run_seconds(f"graph:{shape}") is None
        asked = ran.count(read)
        await repository.recent_run_seconds(f"graph:{RUN_TIMES_KEPT}")  # kept
        await repository.recent_run_seconds("graph:1")  # kept
        await repository.recent_run_seconds("graph:0")  # the least recent: let go
        assert asked == RUN_TIMES_KEPT + 1
        assert ran.count(read) == asked + 1


async def test_positions_behind_a_deep_backlog_never_wait_for_its_snapshot_read_again(
    engine: AsyncEngine,
) -> None:
    """A queued job's position (what its GET answers) behind a backlog as deep as the
    threshold: while the snapshot is read again after a change (held up here by a lock
    another connection holds on a table the read joins), asks count in the one before at
    once; once it is read, in the new one, as exactly as ever."""
    repository = JobRepository(engine, exact_positions_below=5, position_max_age=0.1)
    jobs = [(await repository.insert(Job(workflow="w")))[0] for _ in range(8)]
    await repository.read_backlog()
    assert [await repository.queue_position(job) for job in jobs] == list(range(1, 9))
    async with engine.connect() as holder, holder.begin():
        await holder.execute(text("LOCK TABLE tenant_shares IN ACCESS EXCLUSIVE MODE"))
        await repository.finish(jobs[0], JobStatus.CANCELLED, {JobStatus.QUEUED})
        await asyncio.sleep(0.1)  # max_age since the last read: the read after the change
        async with asyncio.timeout(1):  # (or this ask) begins it
            assert await repository.queue_position(jobs[-1]) == 8
        async with asyncio.timeout(10):
            while not await waiting_for_a_lock(engine):  # noqa: ASYNC110 (pg_locks tells no one)
                await asyncio.sleep(0.05)
        async with asyncio.timeout(1):
            assert [await repository.queue_position(job) for job in jobs[1:]] \
                == list(range(2, 9))  # the snapshot before the change, not waiting
    await repository.read_backlog()
    assert [await repository.queue_position(job) for job in jobs[1:]] == list(range(1, 8))
    await repository.close()


async def waiting_for_a_lock(engine: AsyncEngine) -> bool:
    """Whether any connection to the database waits for a lock."""
    async with engine.connect() as connection:
        return bool((await connection.execute(text(
            "SELECT count(*) FROM pg_locks WHERE NOT granted"))).scalar_one())


async def test_a_job_stored_with_no_other_queued_is_first_without_a_read(
    engine: AsyncEngine,
) -> None:
    """Its submit's answer (the Comfy API v2's) says position 1 without counting the backlog
    (the count, which reads tenant_shares, would wait for the lock another connection holds on
    it); a job stored behind it is counted."""
    repository = JobRepository(engine)
    async with engine.connect() as holder, holder.begin():
        await holder.execute(text("LOCK TABLE tenant_shares IN ACCESS EXCLUSIVE MODE"))
        first, _ = await repository.insert(Job(workflow="w"))
        async with asyncio.timeout(1):
            assert await repository.queue_position(first) == 1
        second, _ = await repository.insert(Job(workflow="w"))
    assert await repository.queue_position(second) == 2
    assert await repository.queue_position(first) == 1  # counted, this time


async def test_asks_behind_a_backlog_written_behind_its_back_share_the_first_snapshot(
    engine: AsyncEngine,
) -> None:
    """A backlog grown deep behind the repository's back (another process, a restore): the
    first ask finds it deep without counting it (`place` says so) and reads the snapshot; the
    asks after it count in that one read, not each in a count of every queued job of its
    own (side by side they piled up behind 100,000 jobs)."""
    repository = JobRepository(engine, exact_positions_below=5, position_max_age=60)
    await repository.read_backlog()  # as the service starts: nothing queued yet
    writer = JobRepository(engine)
    jobs = [(await writer.insert(Job(workflow="w")))[0] for _ in range(8)]
    async with statements_run(engine) as ran:
        positions = [await repository.queue_position(job) for job in jobs]
    assert positions == list(range(1, 9))
    claim = sql.queries("claim")
    assert (ran.count(claim["place"]), ran.count(claim["backlog"])) == (1, 1), ran
    await repository.close()
    await writer.close()


async def test_place_counts_nothing_behind_a_deep_backlog(engine: AsyncEngine) -> None:
    """`place` counts every queued job only while fewer than its bound are queued; behind a
    deeper backlog it says so, at the cost of reading the bound's worth."""
    repository = JobRepository(engine)
    jobs = [(await repository.insert(Job(workflow="w")))[0] for _ in range(3)]
    place = sql.queries("claim")["place"]
    async with driver_connection(engine) as connection:
        shallow = await connection.fetch(place, jobs[2].id, 4)
        deep = await connection.fetch(place, jobs[2].id, 3)
    assert [(row["deep"], row["own"], row["queued"], row["ahead"]) for row in shallow] \
        == [(False, True, 3, 2)]
    assert [dict(row) for row in deep] == [{"deep": True, "own": None, "queued": None,
                                            "ahead": None, "start": None, "weight": None}]
    await repository.close()


async def test_a_backlog_grown_deep_behind_its_back_is_read_before_anyone_asks(
    engine: AsyncEngine,
) -> None:
    """The tracker's watch looks every second: a backlog written behind the repository's back
    found deep (once PostgreSQL's statistics show it), its snapshot is read then, and the
    first asks count in it at once."""
    repository = JobRepository(engine, exact_positions_below=5, position_max_age=60)
    await repository.read_backlog()  # as the service starts: nothing queued yet
    writer = JobRepository(engine)
    await repository.look_for_deep_backlog()  # shallow: nothing more
    jobs = [(await writer.insert(Job(workflow="w")))[0] for _ in range(8)]
    async with engine.begin() as connection:  # as autovacuum would, in its time
        await connection.execute(text("ANALYZE jobs"))
    await repository.look_for_deep_backlog()
    async with asyncio.timeout(10):
        while repository._backlog.latest() is None:  # noqa: ASYNC110 (the read in the background)
            await asyncio.sleep(0.01)
    async with statements_run(engine) as ran:
        positions = [await repository.queue_position(job) for job in jobs]
    assert positions == list(range(1, 9))
    assert ran == []  # no count, no read: all in the snapshot read before
    await repository.close()
    await writer.close()
