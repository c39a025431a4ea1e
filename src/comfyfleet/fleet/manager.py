"""The fleet: one session per backend, the tracker, the collector and the dispatcher, wired."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from comfyfleet.fleet.backends import Backend
from comfyfleet.fleet.collector import Collector
from comfyfleet.fleet.dispatcher import Dispatcher
from comfyfleet.fleet.session import BackendSession
from comfyfleet.fleet.tracker import ExecutionTracker
from comfyfleet.jobs.models import Job
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.storage import Storage


class Fleet:
    def __init__(
        self,
        backends: Sequence[Backend],
        repository: JobRepository,
        storage: Storage,
        *,
        key_prefix: str,
        max_inflight: int,
        max_attempts: int,
        on_terminal: Callable[[Job], None],
    ) -> None:
        collector = Collector(repository, storage, key_prefix, on_terminal)
        self.tracker = ExecutionTracker(
            repository,
            collector,
            max_attempts=max_attempts,
            on_terminal=on_terminal,
            on_slot_freed=self.job_available,
        )
        self.sessions = [
            BackendSession(
                backend,
                on_message=self.tracker.on_message,
                on_connect=self._connected,
                on_disconnect=self.tracker.on_disconnect,
            )
            for backend in backends
        ]
        self.dispatcher = Dispatcher(
            repository,
            self.sessions,
            self.tracker,
            max_inflight=max_inflight,
            on_terminal=on_terminal,
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def _connected(self, session: BackendSession) -> None:
        await self.tracker.on_connect(session)
        self.job_available()

    def job_available(self) -> None:
        """A job was queued or a slot freed: let the dispatcher look now."""
        self.dispatcher.wake()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(session.run()) for session in self.sessions]
        self._tasks.append(asyncio.create_task(self.dispatcher.run()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dispatcher.close()
        await self.tracker.close()
        for session in self.sessions:
            await session.close()
