"""Where blocking work runs: on the event loop when that is cheaper than a thread, else in one.

A round trip through a thread (asyncio.to_thread) costs about 0.3 ms of CPU on a busy 2-vCPU
VM (thread wake-ups, GIL hand-overs, the loop's wake-up): more than a zero-duration prompt's
whole image work. Small work therefore runs on the loop, as long as it stays well under a
millisecond; anything that may take longer goes to a thread, so the loop never stalls.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_T = TypeVar("_T")

# Pillow work on up to this many pixels takes 0.6 ms at most (PNG-encoding noise, the worst
# case; a flat image takes 0.2 ms, and one encoded before only the 15 us of hashing it).
INLINE_PIXELS = 64 * 64

# File work writing at most this much takes tens of us on a healthy disk: it may run on the
# loop while the recent operations averaged under FAST_CPU_SECONDS of CPU time (the kernel's
# work included). CPU time, because wall time would also count the loop's thread being
# preempted, which on a busy machine happens in the middle of any work.
INLINE_BYTES = 256 * 1024
FAST_CPU_SECONDS = 0.00025
_AVERAGE_WEIGHT = 0.05  # of the newest operation: the average spans the last ~20
# A disk that blocks without using CPU (waiting for its device, or throttling writers) shows
# only in wall time: an operation on the loop taking this long sends the next RECHECK_SECONDS
# of operations to a thread.
STALL_SECONDS = 0.05
RECHECK_SECONDS = 10.0


async def image_work(
    pixels: int, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
) -> _T:
    """fn(*args, **kwargs), Pillow work on `pixels` pixels: on the loop if few, else in a
    thread."""
    if pixels <= INLINE_PIXELS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


class Disk:
    """Runs small file operations on the loop while the disk answers fast, in a thread while
    it does not.

    How long creating a small file takes is not known in advance: ~20 us of CPU on tmpfs or a
    quiet SSD, but ~0.5 ms on average, with peaks of tens of ms, on the loaded disk of the
    shared VM this was measured on. So every small operation is timed, wherever it runs, and
    the recent ones decide where the next one runs.
    """

    def __init__(self) -> None:
        self._cpu = 0.0  # moving average of the CPU time of small operations, in seconds
        self._threaded_until = 0.0  # after a stall (time.monotonic())

    async def run(
        self, size: int, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """fn(*args, **kwargs), file work reading or writing about `size` bytes."""
        if size > INLINE_BYTES:
            return await asyncio.to_thread(fn, *args, **kwargs)
        call = functools.partial(fn, *args, **kwargs)
        started = time.monotonic()
        if self._cpu > FAST_CPU_SECONDS or started < self._threaded_until:
            return await asyncio.to_thread(self._timed, call)
        try:
            return self._timed(call)
        finally:
            ended = time.monotonic()
            if ended - started > STALL_SECONDS:
                self._threaded_until = ended + RECHECK_SECONDS

    def _timed(self, call: Callable[[], _T]) -> _T:
        started = time.thread_time()
        try:
            return call()
        finally:
            cpu = time.thread_time() - started
            self._cpu += (cpu - self._cpu) * _AVERAGE_WEIGHT
