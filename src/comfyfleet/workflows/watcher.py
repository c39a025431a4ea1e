"""Hot reload: the catalog is read again whenever a file in the workflows directory changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchfiles import awatch

log = logging.getLogger(__name__)

# Editors write a file in several steps; wait for a quiet moment before reading it.
DEBOUNCE_MS = 300


async def watch_directory(directory: Path, on_change: Callable[[], Awaitable[None]]) -> None:
    """Until cancelled: await `on_change()` after each burst of changes under `directory`."""
    if not await asyncio.to_thread(directory.is_dir):
        log.warning("not watching %s: no such directory", directory)
        return
    # The watch begins a moment after the service has read the directory and answers; a file
    # written in between is only seen by reading again. awatch wakes every few seconds anyway
    # to notice cancellation, so its first empty wake is when the watch is surely on.
    caught_up = False
    async for changes in awatch(directory, debounce=DEBOUNCE_MS, recursive=False,
                                yield_on_timeout=True):
        if changes:
            log.info("workflows changed: %s", ", ".join(sorted(Path(p).name for _, p in changes)))
            await on_change()
            caught_up = True
        elif not caught_up:
            await on_change()
            caught_up = True
