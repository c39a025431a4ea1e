"""Speed-aware placement: which backend should start a prompt, given what each has ahead.

Backends differ in speed, and a prompt's run time is unknown until it ends. We learn how long a
workflow runs on each backend, and near the end of a backlog we keep a slow backend from
taking a job that a faster one would finish sooner (expected completion time): a slow GPU
starting the last long job is what stretches a batch the most. With a deep backlog every
backend takes work.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# A prompt that has run past its expected time is probably a long one (run times are
# heavy-tailed): assume it needs this fraction of its elapsed time again.
OVERRUN_FACTOR = 0.25


def remaining(expected: float, elapsed: float) -> float:
    """Expected seconds left of a prompt that has run `elapsed` seconds."""
    return max(expected - elapsed, OVERRUN_FACTOR * elapsed)


@dataclass(frozen=True)
class BackendLoad:
    """One backend as placement sees it, for the workflow being placed."""

    name: str
    seconds_per_job: float  # expected run time of the workflow there
    busy_for: float  # expected seconds until it could start one more prompt

    @property
    def would_finish(self) -> float:
        """When a prompt given to it now would be done, in seconds from now."""
        return self.busy_for + self.seconds_per_job

    def finished_before(self, deadline: float) -> int:
        """How many more prompts it would complete strictly before `deadline`."""
        room = (deadline - self.busy_for) / self.seconds_per_job
        return max(0, math.ceil(room) - 1)


def should_take(candidate: BackendLoad, others: Iterable[BackendLoad], backlog: int) -> bool:
    """Whether `candidate` should start the next of `backlog` queued jobs now.

    It should unless the other backends, busy as they are, would complete every one of those
    jobs before it could complete this one. Strictly before: of equal backends one always
    takes the job, so nothing waits for ever.
    """
    deadline = candidate.would_finish
    sooner = 0
    for other in others:
        sooner += other.finished_before(deadline)
        if sooner >= backlog:
            return False
    return True
