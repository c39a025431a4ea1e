"""The hot path's pooled connections (db.driver_connection): each goes back to its pool, an
overflow connection is closed, and a task cancelled as it gives one back still gives it back
whole before the cancellation ends it. Our engines keep every connection they open
(db.make_engine)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest
from sqlalchemy import event
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool

from comfyfleet.db import driver_connection, make_engine, unavailable


async def test_connections_go_back_to_the_pool_even_from_a_cancelled_task(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # One connection kept, and one overflow connection (which our engines no longer open).
    engine = create_async_engine(database_url, pool_size=1, max_overflow=1)
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    first_held, second_held, first_back = asyncio.Event(), asyncio.Event(), asyncio.Event()
    release_first = asyncio.Event()
    overflow: list[asyncpg.Connection] = []

    async def first() -> None:
        async with driver_connection(engine) as connection:
            assert await connection.fetchval("SELECT 1") == 1
            first_held.set()
            await release_first.wait()

    async def second() -> None:  # the overflow connection, given back to a full pool
        async with driver_connection(engine) as connection:
            assert await connection.fetchval("SELECT 2") == 2
            overflow.append(connection)
            second_held.set()
            await first_back.wait()
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # delivered at the first wait from here: giving the connection back

    try:
        holding = asyncio.create_task(first())
        await first_held.wait()
        cancelled = asyncio.create_task(second())
        await second_held.wait()
        assert (pool.checkedout(), pool.overflow()) == (2, 1)
        release_first.set()
        await holding
        first_back.set()
        await asyncio.wait([cancelled])
        assert cancelled.cancelled()
        (closed,) = overflow
        assert closed.is_closed()  # the pool had no room for it
        assert (pool.checkedout(), pool.checkedin(), pool.overflow()) == (0, 1, 0)
        async with driver_connection(engine) as connection:  # the pool still serves
            assert await connection.fetchval("SELECT 3") == 3
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await engine.dispose()


async def test_a_burst_leaves_its_connections_open_for_the_next(database_url: str) -> None:
    """Each connection opened costs a connect and asyncpg's type introspection (three
    transactions): those a burst opened are kept, up to twice `pool_size`."""
    engine = make_engine(database_url, pool_size=1)
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    both_held, held = asyncio.Barrier(3), asyncio.Event()

    async def hold() -> None:
        async with driver_connection(engine) as connection:
            assert await connection.fetchval("SELECT 1") == 1
            await both_held.wait()
            await held.wait()

    try:
        burst = [asyncio.create_task(hold()) for _ in range(2)]
        await both_held.wait()
        assert pool.checkedout() == 2
        held.set()
        await asyncio.gather(*burst)
        assert (pool.checkedout(), pool.checkedin()) == (0, 2)
    finally:
        await engine.dispose()


async def test_an_idle_connection_is_handed_out_past_the_pools_checkout_and_counted(
    database_url: str,
) -> None:
    """SQLAlchemy's checkout and checkin cost twice a statement's round trip: an idle
    connection that needs none of their work comes from the pool's queue and goes back to
    it, the pool counting it checked out meanwhile. One the server closed while it was idle
    goes through the pool's checkout, which opens a new one."""
    engine = make_engine(database_url, pool_size=1)
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    checkouts: list[object] = []
    event.listen(engine.sync_engine, "checkout", lambda *_: checkouts.append(None))
    try:
        closed = asyncio.Event()
        async with driver_connection(engine) as first:  # none idle yet: the pool's checkout
            pid = await first.fetchval("SELECT pg_backend_pid()")
            first.add_termination_listener(lambda _: closed.set())
        assert len(checkouts) == 1
        for _ in range(3):
            async with driver_connection(engine) as connection:
                assert connection is first
                assert (pool.checkedout(), pool.checkedin()) == (1, 0)
        assert (pool.checkedout(), pool.checkedin(), len(checkouts)) == (0, 1, 1)

        killer = await asyncpg.connect(database_url.replace("+asyncpg", ""))
        try:
            assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await killer.close()
        await closed.wait()
        async with driver_connection(engine) as connection:
            assert connection is not first
            assert await connection.fetchval("SELECT 1") == 1
        assert (pool.checkedout(), pool.checkedin()) == (0, 1)
    finally:
        await engine.dispose()


async def test_with_every_connection_out_the_next_given_back_is_waited_for_past_the_checkout(
    database_url: str,
) -> None:
    """A burst of more statements than the pool has connections (submits): each beyond them
    waits for one given back on the pool's queue, not through the pool's checkout (a greenlet
    and a timer of its own each); one waiting past the pool's timeout gets its error."""
    engine = make_engine(database_url, pool_size=1)  # two connections, as a burst keeps them
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    checkouts: list[object] = []
    event.listen(engine.sync_engine, "checkout", lambda *_: checkouts.append(None))
    opened, go = asyncio.Barrier(3), asyncio.Event()

    async def statement(hold: bool) -> int:
        async with driver_connection(engine) as connection:
            if hold:
                await opened.wait()
                await go.wait()
            value: int = await connection.fetchval("SELECT 1")
            return value

    try:
        holding = [asyncio.create_task(statement(True)) for _ in range(2)]
        await opened.wait()
        waiting = [asyncio.create_task(statement(False)) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in waiting)
        go.set()
        assert await asyncio.gather(*holding, *waiting) == [1] * 7
        assert len(checkouts) == 2  # the two it opened
        assert (pool.checkedout(), pool.checkedin()) == (0, 2)
    finally:
        await engine.dispose()

    timing_out = create_async_engine(database_url, pool_size=1, max_overflow=0,
                                     pool_timeout=0.1)
    try:
        async with driver_connection(timing_out):
            with pytest.raises(PoolTimeout) as waited:
                async with driver_connection(timing_out):
                    pass
        assert unavailable(waited.value)
        assert timing_out.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await timing_out.dispose()
