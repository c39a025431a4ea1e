"""A value shared by every ask while it is recent: one read per max_age, whatever the asks."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.jobs.recent import Recent
from comfyfleet.jobs.repository import RUN_TIMES_KEPT, JobRepository


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
    reading = asyncio.create_task(always.get())
    await counter.reading.wait()  # the second read under way
    assert await always.get() == 1  # not waiting for it
    counter.release.set()
    assert await reading == 2 and counter.reads == 2


async def test_a_repository_keeps_the_run_times_of_the_workflows_asked_about_last(
    engine: AsyncEngine,
) -> None:
    """v2 jobs' workflows are the shapes of any graph a client sends: the run times kept for
    their ETAs are those of the RUN_TIMES_KEPT asked about last, not one per shape ever seen."""
    repository = JobRepository(engine, position_max_age=3600.0)
    reads: list[str] = []

    def executed(_: Any, __: Any, statement: str, *___: Any) -> None:
        reads.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", executed)
    try:
        for shape in range(RUN_TIMES_KEPT + 1):
            assert await repository.recent_run_seconds(f"graph:{shape}") is None
        asked = len(reads)
        await repository.recent_run_seconds(f"graph:{RUN_TIMES_KEPT}")  # kept
        await repository.recent_run_seconds("graph:1")  # kept
        await repository.recent_run_seconds("graph:0")  # the least recent: let go
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", executed)
    assert asked == RUN_TIMES_KEPT + 1
    assert len(reads) == asked + 1
