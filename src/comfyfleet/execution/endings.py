"""Where a job's end is told, as one typed event instead of callbacks climbing the stages.

Whichever stage ends a job (the collector with its outputs, the tracker failing a run, the
dispatcher when a backend rejects the prompt, the fleet cancelling) tells `Endings` of it once,
with a `JobEnded`. The fleet makes the one `Endings` of the process and hands it down to those
stages; what an ending sets off lies below them all: the job's input files deleted from its
backend, the metrics, the requests waiting for the job (jobs/waiters.py), and the extra_data
held for it here forgotten (jobs/extra_data.py). Webhooks need no telling: their row is
written in the transaction that ends the job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from comfyfleet import metrics
from comfyfleet.comfy.cleanup import BackendFile
from comfyfleet.execution.session import BackendSession
from comfyfleet.jobs.extra_data import HeldExtraData
from comfyfleet.jobs.models import Job
from comfyfleet.jobs.waiters import JobWaiters


@dataclass(frozen=True)
class JobEnded:
    """A job reached its terminal state (succeeded, failed or cancelled): `job` as it ended."""

    job: Job


class Endings:
    def __init__(self, sessions: Sequence[BackendSession], waiters: JobWaiters,
                 extra_data: HeldExtraData) -> None:
        """`sessions` is the fleet's list of backends (they come and go)."""
        self._sessions = sessions
        self._waiters = waiters
        self._extra_data = extra_data
        self._cleanups: set[asyncio.Task[None]] = set()

    def tell(self, event: JobEnded) -> None:
        """Every terminal state passes here: the input files uploaded for the job are deleted
        from its backend whatever the outcome, then the metrics and the waiters hear of it."""
        job = event.job
        inputs = [BackendFile(value["name"], value["subfolder"], "input")
                  for value in job.params.values() if isinstance(value, dict) and "input" in value]
        # Its backend looked for only then: most jobs have no input file, and the fleet's
        # list is walked to find it (200 backends in bench.scale).
        session = next((s for s in self._sessions if s.name == job.backend), None) \
            if inputs and job.backend else None
        if session is not None:
            task = asyncio.create_task(session.cleanup.delete(inputs))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
        self._extra_data.forget(job.id)
        metrics.job_finished(job)
        self._waiters.finished(job)

    async def close(self) -> None:
        """Wait for the deletions under way."""
        await asyncio.gather(*self._cleanups, return_exceptions=True)
