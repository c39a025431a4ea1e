"""Late-binding dispatch: the backlog stays in Postgres until a backend has a free slot.

Each backend holds at most `max_inflight` of our prompts; among healthy backends with a free
slot the one with the shortest queue wins (ComfyUI's `queue_remaining`, which also counts
other clients' prompts), ties broken by fewer prompts in flight. Dispatch wakes on events (a
job arriving, a slot freeing); the periodic pass is only a safety net.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence

from comfyfleet import metrics
from comfyfleet.comfy.client import ComfyError, PromptRejected
from comfyfleet.comfy.prompts import isolate_outputs
from comfyfleet.fleet.session import BackendSession
from comfyfleet.fleet.tracker import ExecutionTracker
from comfyfleet.jobs.models import ON_BACKEND_STATES, Job, JobStatus, job_error
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.logs import job_fields
from comfyfleet.storage import Storage, StorageError

log = logging.getLogger(__name__)

SAFETY_PASS_SECONDS = 2.0
SUBMIT_FAILURE_PAUSE = 1.0


def by_preference(sessions: Sequence[BackendSession], max_inflight: int) -> list[BackendSession]:
    """Backends with a free slot, the one that can start soonest first."""
    free = [s for s in sessions if s.accepts_work and len(s.inflight) < max_inflight]
    # queue_remaining lags behind prompts we just sent; our own count is a lower bound for it.
    return sorted(free, key=lambda s: (max(s.queue_remaining, len(s.inflight)), len(s.inflight)))


class Dispatcher:
    def __init__(
        self,
        repository: JobRepository,
        sessions: Sequence[BackendSession],
        tracker: ExecutionTracker,
        storage: Storage,
        *,
        max_inflight: int,
        on_terminal: Callable[[Job], None],
    ) -> None:
        self._repository = repository
        self._sessions = sessions
        self._tracker = tracker
        self._storage = storage
        self._max_inflight = max_inflight
        self._on_terminal = on_terminal
        self._wake = asyncio.Event()
        self._submissions: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._dispatch_while_possible()
            except Exception:  # the database may be away for a while; keep the loop alive
                log.exception("dispatch pass failed")
            try:
                async with asyncio.timeout(SAFETY_PASS_SECONDS):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _dispatch_while_possible(self) -> None:
        while await self._dispatch_one():
            pass

    async def _dispatch_one(self) -> bool:
        """Send one job to the best backend that has a free slot and can run it."""
        for session in by_preference(self._sessions, self._max_inflight):
            capabilities = session.capabilities
            if capabilities is None:
                continue
            prompt_id = str(uuid.uuid4())
            # Job, backend and prompt id are on record before the POST, so a crash at any
            # point can be reconciled.
            job = await self._repository.claim_next(
                session.name, prompt_id, max_inflight=self._max_inflight,
                can_run=capabilities.can_run,
            )
            if job is None:
                continue
            metrics.job_dispatched(job)
            self._tracker.track(session, job, submitting=True)
            task = asyncio.create_task(self._submit(session, job))
            self._submissions.add(task)
            task.add_done_callback(self._submissions.discard)
            return True
        return False

    async def _submit(self, session: BackendSession, job: Job) -> None:
        assert job.prompt_id is not None
        prompt = isolate_outputs(job.prompt, job.prompt_id)
        try:
            await self._upload_inputs(session, job)
            await session.client.queue_prompt(
                prompt, prompt_id=job.prompt_id, client_id=session.client_id
            )
        except PromptRejected as exc:
            self._tracker.forget(job.prompt_id)
            failed = await self._repository.finish(
                job, JobStatus.FAILED, ON_BACKEND_STATES,
                error=job_error("prompt_rejected", str(exc), details=exc.body.get("node_errors")),
            )
            if failed is not None:
                self._on_terminal(failed)
            return
        except (ComfyError, StorageError) as exc:
            log.warning("backend %s did not take job %s: %s", session.name, job.id, exc,
                        extra=job_fields(job))
            # Hold the slot a moment so a backend that fails every POST is not hammered.
            await asyncio.sleep(SUBMIT_FAILURE_PAUSE)
            self._tracker.forget(job.prompt_id)
            await self._repository.release(job)
            return
        finally:
            self._tracker.submitted(job.prompt_id)
        if not self._tracker.is_tracked(job.prompt_id):
            # Cancelled while the POST was on its way: take it back off the backend.
            await session.withdraw(job.prompt_id)
            return
        log.info("job %s queued on %s as %s", job.id, session.name, job.prompt_id,
                 extra=job_fields(job))

    async def _upload_inputs(self, session: BackendSession, job: Job) -> None:
        """Right before queueing: the job's input images into this backend's input folder."""
        for value in job.params.values():
            if isinstance(value, dict) and "input" in value:
                data = await self._storage.read(value["input"])
                await session.client.upload_image(data, value["name"], value["subfolder"],
                                                  value["content_type"])

    async def close(self) -> None:
        for task in self._submissions:
            task.cancel()
        await asyncio.gather(*self._submissions, return_exceptions=True)
