"""A value read from the database at most once per `max_age` seconds and shared meanwhile by
every ask: a queued job's ETA rests on estimates that change slowly (its workflow's learned run
time, the work left on the backends), and its queue position, behind a deep backlog, on a
snapshot of the backlog (positions.py); every GET of such a job asks for them. Only the first
ask waits for a read: after that, a read replacing the value runs in the background, one at a
time, while every ask takes the value before (stale-while-revalidate), so that no GET waits
for a read of 100,000 queued jobs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class Recent(Generic[T]):
    """The latest value `read` gave. An ask finding it `max_age` seconds old (counted from
    when its read began) begins a read in the background, unless one is under way, and takes
    it as it is. Told of its source's changes (`changed`), it is read again after each, at
    most once per `max_age` and without waiting for an ask, if asked for since its last read
    began (a value nobody asks for is not read again: 50 ms of the database's time at
    100,000 queued jobs): a value so kept reflects every change told `max_age` seconds (and
    the time a read takes) before the ask before it; after a spell with no asks, the first
    takes the value read before it (and begins a read)."""

    def __init__(self, read: Callable[[], Awaitable[T]], max_age: float) -> None:
        self._read = read
        self._max_age = max_age
        self._last: tuple[T] | None = None  # the value (None: no read gave one yet)
        self._began = -float("inf")  # when the latest read began, whether it gave one or not
        # The read under way; it gives the error that stopped it, if one did.
        self._reading: asyncio.Task[Exception | None] | None = None
        # When it was last told of a change (monotonic), and the read due for it.
        self._changed_at = -float("inf")
        self._due: asyncio.TimerHandle | None = None
        self._asked = False  # since the latest read began

    def latest(self) -> T | None:
        """The latest value without waiting: None until a read gave one (one begun then)."""
        self._asked = True
        if time.monotonic() - self._began >= self._max_age:
            self.refresh()
        else:
            self._read_when_due()  # a change told while nobody asked
        return None if self._last is None else self._last[0]

    async def get(self) -> T:
        """The latest value; the first ask (and those meanwhile) waits for the first read,
        and, while none gave a value (a read failed), an ask for a read of its own."""
        self.latest()
        if self._last is not None:
            return self._last[0]
        self.refresh()
        return await self._read_under_way()

    async def fresh(self) -> T:
        """A value read from now on (as a service starts): waits for a read begun now, after
        the one under way if there is one."""
        if self._reading is not None:
            await asyncio.shield(self._reading)
        self.refresh()
        return await self._read_under_way()

    async def _read_under_way(self) -> T:
        assert self._reading is not None
        failed = await asyncio.shield(self._reading)
        if failed is not None:
            raise failed
        assert self._last is not None
        return self._last[0]

    def refresh(self) -> None:
        """Begin a read in the background now, unless one is under way (ahead of an ask)."""
        if self._due is not None:
            self._due.cancel()
            self._due = None
        if self._reading is None:
            self._began = time.monotonic()
            self._asked = False
            self._reading = asyncio.create_task(self._read_once())

    def forget(self) -> None:
        """Drop the value (no longer told of its source's changes, it would be outdated): the
        next ask begins a read and, with `latest`, finds none until it ends."""
        if self._due is not None:
            self._due.cancel()
            self._due = None
        self._last = None
        self._began = -float("inf")

    def changed(self) -> None:
        """Its source changed: read it again, once `max_age` has passed since the last read
        began (at once if it has), unless a read begun since will see the change, or nobody
        asked for the value since the last read began (the next ask sees to it)."""
        self._changed_at = time.monotonic()
        self._read_when_due()

    def _read_when_due(self) -> None:
        if self._reading is not None or self._due is not None \
                or self._changed_at < self._began or not self._asked:
            return  # a read sees it (one under way is judged when it ends), or one is due,
            # or nobody asked since the last read began
        wait = self._began + self._max_age - time.monotonic()
        if wait <= 0:
            self.refresh()
        else:
            self._due = asyncio.get_running_loop().call_later(wait, self.refresh)

    async def _read_once(self) -> Exception | None:
        try:
            self._last = (await self._read(),)
        except Exception as exc:
            if self._last is not None:  # else the asks waiting for a first value are told
                log.warning("reading again failed; the value before is kept", exc_info=True)
            return exc
        finally:
            self._reading = None
        self._read_when_due()  # a change told while it read may have come too late for it
        return None

    async def close(self) -> None:
        """Stop what runs in the background: a read, a read due."""
        if self._due is not None:
            self._due.cancel()
            self._due = None
        reading = self._reading
        if reading is not None:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
