"""A prompt's start (ComfyUI's `execution_start`), or its end of executing, until a write of the
job records it.

The job's start is not a statement of its own at once: a prompt that ends executing soon
after it starts has its start recorded by the statement recording its end, and so does the
first progress report or early output that comes sooner. Only a start nothing else records
within a moment (`tracker.START_WRITE_DELAY`) is written on its own: its `timer` fires then and
starts that write (a task only then: most jobs' starts are recorded by another write first).

Likewise its end of executing (`uploading`) unless another process waits for a slot: its
outputs are usually stored within a moment (`tracker.END_WRITE_DELAY`), and the statement
recording the job's end records it. The prompt holds its backend's slot in the database's count
until then (this process's claims count it out): the tracker releases it once the end is settled
(`when_settled`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


@dataclass
class Unrecorded(Generic[T]):
    at: T | None = None  # what happened, while no write has taken it
    # The write of its own: waiting its moment (a timer of the loop), then under way (a task).
    timer: asyncio.TimerHandle | asyncio.Task[None] | None = None
    _writing: asyncio.Event | None = None  # set once the write that took it has ended
    # Whether a write has recorded it, or nothing will (`drop`); and who is told then.
    _settled: bool = False
    _on_settled: Callable[[], None] | None = None

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
            self._settle()
        finally:
            writing.set()

    def when_settled(self, callback: Callable[[], None]) -> None:
        """Call `callback` once a write has recorded it (committed), or nothing will (`drop`):
        not after a write that failed, for the next one records it. Called at once if it is
        settled already."""
        self._on_settled = callback
        if self._settled:
            callback()

    def drop(self) -> None:
        """The run is over otherwise (cancelled, lost, moved, shutting down): nothing
        records it."""
        self.at = None
        if self.timer is not None:
            self.timer.cancel()
        self._settle()

    def _settle(self) -> None:
        if not self._settled:
            self._settled = True
            if self._on_settled is not None:
                self._on_settled()


class ExecutionEnd(NamedTuple):
    """A prompt that ended executing: when (the job's `uploading_at`), and when it started,
    if no write has recorded that yet."""

    uploading_at: datetime
    started_at: datetime | None


UnrecordedStart = Unrecorded[datetime]
UnrecordedEnd = Unrecorded[ExecutionEnd]
