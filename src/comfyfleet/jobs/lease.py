"""Which gateway process owns a job on a backend, and whether that process is alive.

Each process holds a session-level advisory lock named by its random id for as long as it
lives; Postgres releases it when the process's connection drops, SIGKILL included. So any
process can tell, in one query, whose jobs have nobody left to follow them, and take them
over; and can leave alone a job another live process is sending right now. It also tells
whether any other process is alive to be told of anything (`alone`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet import sql
from comfyfleet.db import driver_connection

log = logging.getLogger(__name__)

# First key of the two-key advisory locks that mark live processes ("comf").
LOCK_SPACE = 0x636F6D66
HEARTBEAT_SECONDS = 5.0  # how often the held connection is checked (and, if lost, renewed)
_SQL = sql.queries("lease")


class ProcessLease:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.id = secrets.randbelow(2**31 - 1) + 1  # the second key: a positive int4
        self._held = asyncio.Event()
        # The other live processes: as the lock table showed them when last read (`live`,
        # which the tracker's watch calls every second), and any heard from since (peers.py).
        self.others: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Hold the lock from now on (renewed if the database comes back after an outage),
        and see which other processes are alive."""
        self._task = asyncio.create_task(self._hold())
        await self._held.wait()
        await self.live()

    async def _hold(self) -> None:
        while True:
            try:
                async with driver_connection(self._engine) as connection:
                    await connection.execute(_SQL["hold"], LOCK_SPACE, self.id)
                    self._held.set()
                    while True:
                        await asyncio.sleep(HEARTBEAT_SECONDS)
                        await connection.execute(_SQL["beat"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away: others will think us dead
                log.warning("lost the process lease %d: %r; renewing", self.id, exc)
                self._held.clear()
                await asyncio.sleep(1.0)

    @property
    def alone(self) -> bool:
        """Whether no other process was alive when last read nor heard from since."""
        return not self.others

    def heard_from(self, process: int) -> None:
        """Process `process` said something (peers.py): it is alive."""
        if process != self.id:
            self.others.add(process)

    async def live(self) -> set[int]:
        """The ids of the processes alive now, this one included."""
        async with driver_connection(self._engine) as connection:
            rows = await connection.fetch(_SQL["live"], LOCK_SPACE)
        ids = {row["id"] for row in rows}
        self.others = ids - {self.id}
        return ids

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
