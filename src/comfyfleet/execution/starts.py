"""A prompt's start (ComfyUI's `execution_start`), or its end of executing, until a write of the
job records it.

The job's start is not a statement of its own at once: a prompt that ends executing soon
after it starts has its start recorded by the statement recording its end, and so does the
first progress report or early output that comes sooner. Only a start nothing else records
within a moment (`tracker.START_WRITE_DELAY`) is written on its own, by the `timer` task.

Likewise its end of executing (`uploading`) unless another process waits for a slot: its
outputs are usually stored within a moment (`tracker.END_WRITE_DELAY`), and the statement
recording the job's end records it. The prompt holds its backend's slot in the database's count
until then (this process's claims count it out): the tracker waits for the end to be `settled`
to release it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


@dataclass
class Unrecorded(Generic[T]):
    at: T | None = None  # what happened, while no write has taken it
    timer: asyncio.Task[None] | None = None  # the write of its own, waiting its moment
    _writing: asyncio.Event | None = None  # set once the write that took it has ended
    # Set once a write has recorded it, or nothing will (`drop`).
    _settled: asyncio.Event = field(default_factory=asyncio.Event)

    @asynccontextmanager
    async def recording(self) -> AsyncIterator[T | None]:
        """What happened, for the write made inside the block to record; None when a write
        took it already, and that write has ended (so the job is as it left it, its webhook
        stored, before any later change). If the block fails, the next write records it."""
        if self.at is None:
            if self._writing is not None:
                await self._writing.wait()
            yield None
            return
        at, self.at = self.at, None
        if self.timer is not None and self.timer is not asyncio.current_task():
            self.timer.cancel()  # this write records it instead
        writing = self._writing = asyncio.Event()
        try:
            yield at
        except BaseException:
            self.at = self.at or at
            raise
        else:
            self._settled.set()
        finally:
            writing.set()

    async def settled(self) -> None:
        """Return once a write has recorded it (committed), or nothing will (`drop`): not
        after a write that failed, for the next one records it."""
        await self._settled.wait()

    @property
    def settled_event(self) -> asyncio.Event:
        """Set once it is `settled`: to wait for that along with other events."""
        return self._settled

    def drop(self) -> None:
        """The run is over otherwise (cancelled, lost, moved, shutting down): nothing
        records it."""
        self.at = None
        self._settled.set()
        if self.timer is not None:
            self.timer.cancel()


class ExecutionEnd(NamedTuple):
    """A prompt that ended executing: when (the job's `uploading_at`), and when it started,
    if no write has recorded that yet."""

    uploading_at: datetime
    started_at: datetime | None


UnrecordedStart = Unrecorded[datetime]
UnrecordedEnd = Unrecorded[ExecutionEnd]
