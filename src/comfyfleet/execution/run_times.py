"""What execution learns of run times: how long each workflow runs on each backend.

The tracker records a prompt's execution seconds when it ends; placement (dispatch/) reads
them to judge which backend would finish a job first, and the dashboard to show each
backend's speed.
"""

from __future__ import annotations

from collections import defaultdict, deque

# Samples kept per (backend, workflow): recent enough to follow a backend that slows down.
RUN_TIME_WINDOW = 20
# Fewer samples of a workflow on one backend than this: its fleet-wide mean stands in.
MIN_SAMPLES = 3
# The fraction of its steps after which a running prompt's own progress tells its length
# better than the workflow's usual run time.
MIN_PROGRESS_TO_JUDGE = 0.1

class RunTimes:
    """Observed execution seconds per backend and workflow."""

    def __init__(self) -> None:
        self._samples: dict[tuple[str, str], deque[float]] = defaultdict(
            lambda: deque(maxlen=RUN_TIME_WINDOW))
        self._fleet: dict[str, deque[float]] = defaultdict(
            lambda: deque(maxlen=RUN_TIME_WINDOW))
        self._workflows_of: dict[str, set[str]] = defaultdict(set)
        # `expected`, by (backend, workflow), until the next sample: placement asks it for
        # every job near the backlog's head at every claim.
        self._expected: dict[tuple[str, str], float | None] = {}

    def record(self, backend: str, workflow: str, seconds: float) -> None:
        self._samples[(backend, workflow)].append(seconds)
        self._workflows_of[backend].add(workflow)
        self._fleet[workflow].append(seconds)
        self._expected.clear()  # the fleet's mean moved, which stands in for some backends'

    def expected(self, backend: str, workflow: str) -> float | None:
        """Expected run seconds there; None while the workflow has never been seen to run."""
        try:
            return self._expected[(backend, workflow)]
        except KeyError:
            pass
        samples = self._samples.get((backend, workflow))
        if samples is None or len(samples) < MIN_SAMPLES:
            samples = self._fleet.get(workflow)
        expected = self._expected[(backend, workflow)] = \
            max(sum(samples) / len(samples), 1e-3) if samples else None
        return expected

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
