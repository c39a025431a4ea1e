"""A change signal that many readers can await without polling and without queues.

A reader takes `pulse.next()` *before* it looks at the state, then awaits it: a change made
in between wakes it at once, and many changes while it is busy wake it once.
"""

from __future__ import annotations

import asyncio


class Pulse:
    def __init__(self) -> None:
        self._next = asyncio.Event()

    def beat(self) -> None:
        """Something changed: wake every reader waiting on the current beat."""
        self._next.set()
        self._next = asyncio.Event()

    def next(self) -> asyncio.Event:
        """The event the next beat sets."""
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
