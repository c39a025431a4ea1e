"""A change signal that many readers can await without polling and without queues.

A reader takes `pulse.next()` *before* it looks at the state, then awaits it: a change made
in between wakes it at once, and many changes while it is busy wake it once.
"""

from __future__ import annotations

import asyncio


class Pulse:
    def __init__(self) -> None:
        # Made when a reader first asks for it: most beats (a few a job) find no reader, and
        # an Event made for each cost a microsecond.
        self._next: asyncio.Event | None = None

    def beat(self) -> None:
        """Something changed: wake every reader waiting on the current beat."""
        if self._next is not None:
            self._next.set()
            self._next = None

    def next(self) -> asyncio.Event:
        """The event the next beat sets (the same one until it beats)."""
        if self._next is None:
            self._next = asyncio.Event()
        return self._next


async def first_of(*events: asyncio.Event) -> None:
    """Return when one of `events` is set (at once if one is)."""
    if any(event.is_set() for event in events):
        return
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
