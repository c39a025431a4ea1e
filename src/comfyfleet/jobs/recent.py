"""A value read from the database at most once per `max_age` seconds and shared meanwhile by
every ask: a queued job's ETA rests on estimates that change slowly (its workflow's learned run
time, the work left on the backends), and every GET of such a job asks for them. A stale value
is read again by one ask; the asks meanwhile take the one before, so none waits but the first
ask and the one that reads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Recent(Generic[T]):
    """The latest value `read` gave, read again by the first ask once it is `max_age` seconds
    old (counted from when its read began); with `max_age` 0, by every ask that finds no read
    under way."""

    def __init__(self, read: Callable[[], Awaitable[T]], max_age: float) -> None:
        self._read = read
        self._max_age = max_age
        self._last: tuple[T, float] | None = None  # the value, and when its read began
        self._reading = asyncio.Lock()

    def _fresh(self, last: tuple[T, float]) -> bool:
        return time.monotonic() - last[1] < self._max_age

    async def get(self) -> T:
        last = self._last
        if last is not None and (self._fresh(last) or self._reading.locked()):
            return last[0]
        async with self._reading:
            last = self._last
            if last is None or not self._fresh(last):
                started = time.monotonic()
                last = self._last = (await self._read(), started)
        return last[0]
