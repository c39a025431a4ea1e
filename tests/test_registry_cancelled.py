"""The fleet's table read and changed by tasks cancelled at any moment, as a shutdown cancels
DNS discovery's pass (app._cancel): each cancelled call ends at once, and leaves nothing
behind: no connection out of the pool, none in a transaction, no lock held."""

from __future__ import annotations

import asyncio
import random

from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.comfy.endpoints import Backend
from comfyfleet.db import driver_connection, make_engine
from comfyfleet.fleet.registry import BackendRegistry

# Calls begun and cancelled, per worker; the workers share a pool of two connections, so that
# a connection a cancelled call gave back (its cancellation perhaps still on its way to the
# server) is taken again at once.
CALLS = 300
WORKERS = 4
# A call's cancellation is awaited this long at most: it ends in a few milliseconds.
CANCEL_BOUND_SECONDS = 5.0


async def test_cancelled_reads_and_changes_end_and_leave_the_pool_as_it_was(
    engine: AsyncEngine,
) -> None:
    small = make_engine(engine.url, pool_size=1)
    try:
        registry = BackendRegistry(small)
        await registry.seed([Backend(f"gpu{i}", f"http://127.0.0.1:{i + 1}") for i in range(20)])

        async def change(worker: int, call: int) -> None:
            """A backend added, drained and removed, as a discovery pass does."""
            name = f"w{worker}-{call}"
            await registry.add(Backend(name, f"http://{name}:8188"))
            await registry.set_draining(name, True, vanished=True)
            await registry.remove(name)

        async def cancel_calls(worker: int) -> None:
            rng = random.Random(worker)
            for call in range(CALLS):
                task = asyncio.ensure_future(registry.all() if call % 2 else change(worker, call))
                # From before the statement is sent to after its answer came: a round trip
                # is a few passes of the loop, and a fraction of a millisecond.
                for _ in range(rng.randrange(12)):
                    await asyncio.sleep(0)
                await asyncio.sleep(rng.choice([0, 0, rng.uniform(0, 0.002)]))
                task.cancel()
                async with asyncio.timeout(CANCEL_BOUND_SECONDS):
                    (ended,) = await asyncio.gather(task, return_exceptions=True)
                # Cancelled, or done before: a statement that failed instead is a bug here
                # (a connection handed on while busy with a cancelled statement, say).
                assert ended is None or isinstance(ended, list | asyncio.CancelledError), ended

        await asyncio.gather(*(cancel_calls(worker) for worker in range(WORKERS)))

        pool = small.sync_engine.pool
        assert pool.checkedout() == 0  # type: ignore[attr-defined]
        async with asyncio.timeout(CANCEL_BOUND_SECONDS):
            # Both connections, each at once: neither is left in a transaction.
            async with driver_connection(small) as one, driver_connection(small) as other:
                assert not one.is_in_transaction() and not other.is_in_transaction()
                assert await one.fetchval("SELECT 1") == await other.fetchval("SELECT 1") == 1
            # No lock left held: the fleet's changes go on, from this process and another.
            await change(WORKERS, 0)
            await BackendRegistry(engine).add(Backend("after", "http://after:8188"))
            names = {entry.backend.name for entry in await registry.all()}
        assert {f"gpu{i}" for i in range(20)} | {"after"} <= names
    finally:
        await small.dispose()
