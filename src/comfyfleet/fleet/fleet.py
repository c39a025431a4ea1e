"""The fleet: one session per backend, the tracker, the collector and the dispatcher, wired,
plus what the API asks of them (cancel, add/drain/remove a backend)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.comfy.endpoints import Backend
from comfyfleet.comfy.messages import Binary, Message
from comfyfleet.dispatch.dispatcher import Dispatcher
from comfyfleet.execution.collector import Collector
from comfyfleet.execution.costs import NodeCosts
from comfyfleet.execution.endings import Endings, JobEnded
from comfyfleet.execution.run_times import RunTimes
from comfyfleet.execution.session import BackendSession
from comfyfleet.execution.signals import DispatchSignals
from comfyfleet.execution.tracker import ExecutionTracker
from comfyfleet.fleet.registry import BackendExists, BackendRegistry
from comfyfleet.fleet.waiting import WaitingReasons
from comfyfleet.jobs.extra_data import HeldExtraData
from comfyfleet.jobs.lease import ProcessLease
from comfyfleet.jobs.models import ON_BACKEND_STATES, Job, JobStatus, job_error
from comfyfleet.jobs.notices import JobNotices
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.jobs.waiters import JobWaiters
from comfyfleet.peers import SlotTalk
from comfyfleet.pulse import Pulse, first_of
from comfyfleet.settings import Settings
from comfyfleet.storage import Storage
from comfyfleet.workflows.catalog import Catalog

log = logging.getLogger(__name__)

# How often a drain waiting for a backend to go idle reads what other processes have there.
DRAIN_RECHECK_SECONDS = 2.0
# How soon a failed read of the fleet's table is tried again.
REGISTRY_RETRY_SECONDS = 2.0
# A job can move between our read and our fenced write (claimed, started); try again then.
CANCEL_TRIES = 5


@dataclass(frozen=True)
class FleetTuning:
    """The settings the fleet works by (DESIGN §7, §9), gathered once."""

    key_prefix: str
    max_inflight: int
    affinity_window: int
    fair_share: bool
    max_attempts: int
    grace_seconds: float
    quiet_seconds: float
    dispatch_interval: float
    node_token: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> FleetTuning:
        return cls(
            key_prefix=settings.s3_prefix,
            max_inflight=settings.max_inflight_per_backend,
            affinity_window=settings.affinity_window,
            fair_share=settings.fair_share,
            max_attempts=settings.max_attempts,
            grace_seconds=settings.backend_grace_seconds,
            quiet_seconds=settings.quiet_prompt_seconds,
            dispatch_interval=settings.dispatch_interval,
            node_token=settings.comfyfleet_node_token,
        )


class Fleet:
    def __init__(
        self,
        backends: Sequence[Backend],
        repository: JobRepository,
        storage: Storage,
        tuning: FleetTuning,
        *,
        waiters: JobWaiters,
        events: JobNotices,
        lease: ProcessLease,
        registry: BackendRegistry,
        registry_changed: Pulse,
        queued: Pulse,
        queued_here: Pulse,
        slots: SlotTalk,
        catalog: Catalog,
    ) -> None:
        """`backends` are the configured ones; the registry may hold more, and `registry_changed`
        beats when any process changed it; `queued` beats when another process queued a job (or
        any put one back in the backlog), this one beats `queued_here` when a job was submitted
        here (`job_submitted`); `slots`: what they say of slots one waits for. The `catalog`
        hears what each backend reports of its nodes; `waiters`, of every job ending here."""
        self._registry = registry
        self._registry_changed = registry_changed
        self._queued, self._queued_here = queued, queued_here
        self._catalog = catalog
        self._repository = repository
        self._node_token = tuning.node_token
        # What the tracker tells the dispatcher (and a drain waiting for a backend to idle).
        self._signals = DispatchSignals(slots)
        # Beats whenever what `describe` shows of any backend changes (the dashboard).
        self.changes = Pulse()
        # One list shared with the dispatcher, the tracker's watch and the endings: backends
        # come and go.
        self.sessions: list[BackendSession] = []
        # Asked of every queued job an answer shows; worked out once per change.
        self._waiting = WaitingReasons(self.sessions, self.changes)
        self.extra_data = HeldExtraData(lease.id)  # of the v2 jobs accepted here: we send them
        # Told by every stage that ends a job.
        self._endings = Endings(self.sessions, waiters, self.extra_data)
        collector = Collector(repository, storage, tuning.key_prefix, self._endings)
        # Learned by the tracker, used for placement.
        self._run_times, node_costs = RunTimes(), NodeCosts()
        self.tracker = ExecutionTracker(
            repository, collector, max_attempts=tuning.max_attempts, endings=self._endings,
            signals=self._signals, grace_seconds=tuning.grace_seconds,
            quiet_seconds=tuning.quiet_seconds, events=events, run_times=self._run_times,
            node_costs=node_costs, lease=lease, extra_data=self.extra_data, queued=queued)
        self.dispatcher = Dispatcher(
            repository, self.sessions, self.tracker, storage, signals=self._signals,
            max_inflight=tuning.max_inflight, endings=self._endings,
            run_times=self._run_times, node_costs=node_costs,
            affinity_window=tuning.affinity_window, owner=lease.id, extra_data=self.extra_data,
            safety_pass_seconds=tuning.dispatch_interval, fair_share=tuning.fair_share)
        self._session_tasks: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._dispatching: asyncio.Task[None] | None = None
        self._started = False
        for backend in backends:
            self._add_session(backend)

    def _add_session(self, backend: Backend) -> BackendSession:
        session = BackendSession(backend, self, node_token=self._node_token,
                                 changes=self.changes)
        self.sessions.append(session)
        self.changes.beat()
        return session

    # What the sessions tell the fleet (execution.session.SessionListener).

    async def backend_connected(self, session: BackendSession) -> None:
        # Before anything awaits: once a backend shows as connected, the catalog is typed
        # from what it reported.
        assert session.node_inputs is not None
        self._catalog.backend_reported(session.name, session.node_inputs)
        await self.tracker.on_connect(session)
        self.job_available()

    @property
    def backend_message(self) -> Callable[[BackendSession, Message | Binary],
                                          Coroutine[Any, Any, None]]:
        """The tracker's, as it is: not a coroutine of the fleet's around it (one more a
        frame)."""
        return self.tracker.on_message

    async def backend_disconnected(self, session: BackendSession) -> None:
        await self.tracker.on_disconnect(session)
        self.job_available()  # jobs held back for what it has loaded go elsewhere now

    def job_submitted(self) -> None:
        """A job was submitted here: let this process's dispatcher and the others' look now."""
        self.job_available()
        self._queued_here.beat()

    def job_available(self) -> None:
        """A job was queued, or a backend began or stopped taking work: let the dispatcher
        look now."""
        self._signals.job_queued()

    async def start(self) -> None:
        """Connect to the registered backends (the configured ones first) and dispatch."""
        # Before anything awaits: what another process says of the slots is heard from the
        # start.
        slot_talk = self._signals.slots.wanted.next(), self._signals.slots.freed.next(), \
            self._signals.slots.told.next()
        await self._registry.seed([session.backend for session in self.sessions])
        self._started = True
        registry_changed = self._registry_changed.next()  # taken before the read
        queued = self._queued.next()  # the dispatcher's first pass claims what is queued now
        await self.follow_registry()
        for session in self.sessions:
            self._connect(session)
        self._dispatching = asyncio.create_task(self.dispatcher.run())
        self._tasks = [self._dispatching, asyncio.create_task(self.tracker.watch(self.sessions)),
                       asyncio.create_task(self._follow_registry_forever(registry_changed)),
                       asyncio.create_task(self._follow_backlog_forever(queued)),
                       asyncio.create_task(self._hear_slots_forever(*slot_talk))]

    async def follow_registry(self) -> bool:
        """Take up what other processes (or an earlier run) changed in the shared fleet.
        True while a backend removed elsewhere still has work of this process to finish."""
        registered = {entry.backend.name: entry for entry in await self._registry.all()}
        known = {session.name: session for session in self.sessions}
        for entry in registered.values():
            session = known.get(entry.backend.name) or self._add_session(entry.backend)
            if self._started:
                self._connect(session)
            if session.draining != entry.draining:
                session.draining = entry.draining
                self.changes.beat()
                self.job_available()  # taking work now, or held-back jobs go elsewhere
        finishing = False
        for session in list(self.sessions):
            if session.name not in registered:
                if not session.draining:  # removed elsewhere: finish what it has here
                    session.draining = True
                    self.changes.beat()
                if session.inflight:
                    finishing = True
                else:
                    await self._stop_session(session)
        return finishing

    async def _follow_registry_forever(self, changed: asyncio.Event) -> None:
        """Follow the table at each change, and (a backend removed elsewhere finishing its
        work here) each time a slot frees."""
        freed: asyncio.Event | None = None
        while True:
            await first_of(changed, *([freed] if freed else []))
            changed = self._registry_changed.next()  # taken before the read: nothing slips
            freed = self._signals.released.next()
            while True:
                try:
                    finishing = await self.follow_registry()
                    break
                except Exception:  # the database may be away: try again
                    log.exception("reading the fleet from the database failed")
                    await asyncio.sleep(REGISTRY_RETRY_SECONDS)
            if not finishing:
                freed = None

    async def _follow_backlog_forever(self, queued: asyncio.Event) -> None:
        """Wake the dispatcher whenever another process queued a job (a submit, a requeue
        there): it would see it only at its safety pass otherwise."""
        while True:
            await queued.wait()
            queued = self._queued.next()
            self.job_available()

    async def _hear_slots_forever(self, wanted: asyncio.Event, freed: asyncio.Event,
                                  told: asyncio.Event) -> None:
        """Tell the dispatch what other processes say of the slots: one waits for a slot (the
        ends of prompts here are written at once, the slots freed told of), one freed a slot
        (claim), this process's own wait heard (claim once more)."""
        talk = self._signals.slots
        while True:
            await first_of(wanted, freed, told)
            # A freed before a wanted: heard together, the wait is the newer news.
            if freed.is_set():
                freed = talk.freed.next()
                self._signals.freed_elsewhere()
            if wanted.is_set():
                wanted = talk.wanted.next()
                self._signals.wanted_elsewhere()
            if told.is_set():
                told = talk.told.next()
                self._signals.short_heard()

    async def stop_dispatching(self) -> None:
        """Claim no more jobs: the first step of a shutdown, so that nothing new is started
        that this process would then leave behind. What is in flight goes on."""
        if self._dispatching is not None:
            self._dispatching.cancel()
            await asyncio.gather(self._dispatching, return_exceptions=True)

    def session(self, name: str) -> BackendSession | None:
        return next((s for s in self.sessions if s.name == name), None)

    async def add_backend(self, backend: Backend, discovered_by: str | None = None
                          ) -> BackendSession:
        """BackendExists when its name or its URL is taken."""
        if self.session(backend.name) is not None:
            raise BackendExists("name", f"a backend named {backend.name!r} exists already")
        await self._registry.add(backend, discovered_by)
        session = self.session(backend.name) or self._add_session(backend)
        self._connect(session)
        return session

    def _connect(self, session: BackendSession) -> None:
        if session.name not in self._session_tasks:
            self._session_tasks[session.name] = asyncio.create_task(session.run())

    async def set_draining(self, name: str, draining: bool, *, vanished: bool = False
                           ) -> BackendSession:
        session = self.session(name)
        if session is None:
            raise KeyError(name)
        await self._registry.set_draining(name, draining, vanished=vanished)
        session.draining = draining
        self.changes.beat()
        # Enabled: it takes work. Drained: the jobs held back for the model it has loaded
        # (cache-aware placement) go elsewhere now, not at the next safety pass.
        self.job_available()
        return session

    async def drain_and_wait(self, name: str, seconds: float) -> int:
        """Drain `name` and wait up to `seconds` until no job is on it, in any process; the
        number of jobs still there. A slot freed here wakes it at once; what other processes
        finish is seen on a re-read every DRAIN_RECHECK_SECONDS."""
        await self.set_draining(name, True)
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            freed = self._signals.released.next()  # taken before the read: nothing slips between
            left = len(await self._repository.on_backend(name))
            if not left:
                return 0
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return left
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed.wait(), min(remaining, DRAIN_RECHECK_SECONDS))

    async def remove_backend(self, name: str) -> None:
        """BackendBusy unless it is drained and no process has a job on it."""
        session = self.session(name)
        if session is None:
            raise KeyError(name)
        await self._registry.remove(name)
        await self._stop_session(session)

    async def _stop_session(self, session: BackendSession) -> None:
        if session not in self.sessions:  # the registry's re-read stopped it meanwhile
            return
        self.sessions.remove(session)
        self._catalog.backend_removed(session.name)
        self.changes.beat()
        task = self._session_tasks.pop(session.name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await session.close()

    async def cancel(self, job_id: uuid.UUID) -> Job | None:
        """Cancel a job wherever it is; None if there is no such job. A finished job is
        returned unchanged."""
        for _ in range(CANCEL_TRIES):
            job = await self._repository.get(job_id)
            if job is None or JobStatus(job.status).terminal:
                return job
            states = {JobStatus.QUEUED} if job.status == JobStatus.QUEUED else ON_BACKEND_STATES
            cancelled = await self._repository.finish(
                job, JobStatus.CANCELLED, states,
                error=job_error("cancelled", "cancelled at the client's request"),
            )
            if cancelled is None:
                continue
            if job.prompt_id is not None and job.status != JobStatus.QUEUED:
                self.tracker.forget(job.prompt_id)
                session = self.session(job.backend) if job.backend else None
                if session is not None:
                    await session.withdraw(job.prompt_id)
            self._endings.tell(JobEnded(cancelled))
            return cancelled
        raise RuntimeError(f"job {job_id} kept changing while it was being cancelled")

    def reported_capabilities(self) -> list[Capabilities]:
        """What each backend can run, once every one has reported it. Empty while any has not:
        it may have what a job needs, so only the job's own structure can be checked, and the
        job waits for a backend able to run it."""
        known = [session.capabilities for session in self.sessions]
        return [caps for caps in known if caps is not None] if None not in known else []

    def missing_everywhere(self, prompt: dict[str, Any]) -> dict[str, list[str]] | None:
        """What each backend lacks for `prompt` when none can run it; None when one can, or
        when some backend's capabilities are not known yet (it may be able to)."""
        lacking: dict[str, list[str]] = {}
        for session in self.sessions:
            if session.capabilities is None:
                return None
            missing = session.capabilities.missing(prompt)
            if not missing:
                return None
            lacking[session.name] = missing
        return lacking or None

    def why_waiting(self, prompt: dict[str, Any]) -> str | None:
        """Why a queued job with this prompt cannot start soon: every backend that could run
        it is out of service. None while one of them takes work."""
        return self._waiting.why(prompt)

    def describe(self, session: BackendSession) -> dict[str, Any]:
        return {
            "name": session.name,
            "url": session.backend.url,
            "healthy": session.connected,
            "draining": session.draining,
            "queue_remaining": session.queue_remaining,
            "inflight": len(session.inflight),
            # Run times against the fleet's mean (2.0: twice as fast); null until known.
            "speed": _rounded(self._run_times.speed(session.name)),
            "unreachable_seconds": round(session.unreachable_for(), 1),
            "last_error": session.last_error,
            "capabilities": session.capabilities.summary() if session.capabilities else None,
            # The comfyui_nodes package's version there; null: its files are not deleted.
            "cleanup": session.cleanup.version,
            "cache": session.warm.describe(),
        }

    async def close(self, grace: float = 0.0) -> None:
        """Stop; uploads in progress get up to `grace` seconds to finish. Prompts still on
        the backends are left there: the next process to connect reconciles them."""
        tasks = [*self._tasks, *self._session_tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.dispatcher.close()
        await self.tracker.close(grace)
        await self._endings.close()
        for session in self.sessions:
            await session.close()


def _rounded(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None

