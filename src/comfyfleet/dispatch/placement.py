"""Speed-aware placement: which backend should start a prompt, given what each has ahead.

Backends differ in speed, and a prompt's run time is unknown until it ends. We learn how long a
workflow runs on each backend, and near the end of a backlog we keep a slow backend from
taking a job that a faster one would finish sooner (expected completion time): a slow GPU
starting the last long job is what stretches a batch the most. With a deep backlog every
backend takes work.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass

# Samples kept per (backend, workflow): recent enough to follow a backend that slows down.
RUN_TIME_WINDOW = 20
# Fewer samples of a workflow on one backend than this: its fleet-wide mean stands in.
MIN_SAMPLES = 3
# The fraction of its steps after which a running prompt's own progress tells its length
# better than the workflow's usual run time.
MIN_PROGRESS_TO_JUDGE = 0.1
# A prompt that has run past its expected time is probably a long one (run times are
# heavy-tailed): assume it needs this fraction of its elapsed time again.
OVERRUN_FACTOR = 0.25


class RunTimes:
    """Observed execution seconds per backend and workflow."""

    def __init__(self) -> None:
        self._samples: dict[tuple[str, str], deque[float]] = defaultdict(
            lambda: deque(maxlen=RUN_TIME_WINDOW))
        self._fleet: dict[str, deque[float]] = defaultdict(
            lambda: deque(maxlen=RUN_TIME_WINDOW))
        self._workflows_of: dict[str, set[str]] = defaultdict(set)

    def record(self, backend: str, workflow: str, seconds: float) -> None:
        self._samples[(backend, workflow)].append(seconds)
        self._workflows_of[backend].add(workflow)
        self._fleet[workflow].append(seconds)

    def expected(self, backend: str, workflow: str) -> float | None:
        """Expected run seconds there; None while the workflow has never been seen to run."""
        samples = self._samples.get((backend, workflow))
        if samples is None or len(samples) < MIN_SAMPLES:
            samples = self._fleet.get(workflow)
        if not samples:
            return None
        return max(sum(samples) / len(samples), 1e-3)

    def speed(self, backend: str) -> float | None:
        """How fast the backend runs the workflows it has run, against the fleet's mean for
        each (2.0: twice as fast); None until it has run one often enough to tell."""
        ratios = [
            _mean(self._fleet[workflow]) / max(_mean(samples), 1e-3)
            for workflow in self._workflows_of.get(backend, ())
            if len(samples := self._samples[(backend, workflow)]) >= MIN_SAMPLES
        ]
        return sum(ratios) / len(ratios) if ratios else None


def _mean(samples: deque[float]) -> float:
    return sum(samples) / len(samples)


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
