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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
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

    def recording(self) -> Recording[T]:
        """What happened, for the write made inside the block to record; None when a write
        took it already, and that write has ended (so the job is as it left it, its webhook
        stored, before any later change). If the block fails, the next write records it."""
        return Recording(self)

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


class Recording(Generic[T]):
    """`Unrecorded.recording`'s block. A class, not an `asynccontextmanager`: a job enters
    three or four (its start and its end of executing, in the tracker and the collector),
    and an async generator's each cost the loop's hook for them (a WeakSet add) and the
    generator's frames: 2.1 against 0.7 us a block, in a loop."""

    __slots__ = ("_at", "_unrecorded", "_writing")

    def __init__(self, unrecorded: Unrecorded[T]) -> None:
        self._unrecorded = unrecorded
        self._at: T | None = None  # what this block's write records
        self._writing: asyncio.Event | None = None

    async def __aenter__(self) -> T | None:
        unrecorded = self._unrecorded
        at = unrecorded.at
        if at is None:
            if unrecorded._writing is not None:
                await unrecorded._writing.wait()
            return None
        self._at, unrecorded.at = at, None
        timer = unrecorded.timer
        # This write records it instead; not when it is the write of its own (its task)
        # (asked only of a task: current_task asks the loop, a timer is none).
        if timer is not None and not (isinstance(timer, asyncio.Task)
                                      and timer is asyncio.current_task()):
            timer.cancel()
        self._writing = unrecorded._writing = asyncio.Event()
        return at

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        if self._writing is None:
            return
        unrecorded = self._unrecorded
        try:
            if kind is None:
                unrecorded._settle()
            else:
                unrecorded.at = unrecorded.at or self._at
        finally:
            self._writing.set()


class ExecutionEnd(NamedTuple):
    """A prompt that ended executing: when (the job's `uploading_at`), and when it started,
    if no write has recorded that yet."""

    uploading_at: datetime
    started_at: datetime | None


# Classes, not aliases of Unrecorded[...]: a typing alias's call makes the instance, then
# sets its __orig_class__ (twice the time); a job makes one of each.
class UnrecordedStart(Unrecorded[datetime]):
    """A prompt's start, until a write records it."""


class UnrecordedEnd(Unrecorded[ExecutionEnd]):
    """A prompt's end of executing, until a write records it."""
