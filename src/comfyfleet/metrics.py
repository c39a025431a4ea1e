"""Prometheus metrics: the metric objects and one-line helpers the fleet calls where it learns
a fact (a job dispatched, started, executed, uploaded, finished; a webhook attempt).

Events are counted in a registry of this module (one per process, like the process itself).
What describes one running app (its backends; the unfinished jobs in the database) is read
when /metrics is scraped (`api/prometheus.py`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from bisect import bisect_left
from collections.abc import Awaitable, Iterable, Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from comfyfleet.jobs.deliveries import OutgoingDelivery
from comfyfleet.jobs.models import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

# Seconds, from a cached prompt's instant run to a long video job.
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class _Count:
    """One series of a counter: a float added to with no lock. prometheus_client's values take
    a threading.Lock at every update, for threads that do not update these: the process's one
    event loop does, in its thread."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class _Observations:
    """One series of a histogram, kept as `_Count` is: the observations in each bucket (not
    yet added up) and their sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """In the first bucket whose upper bound is not below `amount` (a number)."""
        self.sum += amount
        self.counts[bisect_left(self.bounds, amount)] += 1


class _Counter(dict[tuple[str, ...], _Count]):
    """A counter of events, a series by the values of its labels (`counter[values]`, made
    when first asked for: a dict's lookup, no Python call), exposed as prometheus_client's
    Counter exposes one (`<name>_total` and `<name>_created` a series); without labels, its
    one series from the start."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        if not labelnames:
            self[()] = _Count()

    def __missing__(self, values: tuple[str, ...]) -> _Count:
        series = self[values] = _Count()
        return series

    def inc(self, amount: float = 1) -> None:
        """Of a counter without labels."""
        self[()].value += amount

    def family(self) -> Metric:
        family = Metric(self.name, self.documentation, "counter")
        for values, series in list(self.items()):
            labels = dict(zip(self.labelnames, values, strict=True))
            family.add_sample(f"{self.name}_total", labels, series.value)
            if prometheus_metrics._use_created:
                family.add_sample(f"{self.name}_created", labels, series.created)
        return family


class _Histogram(dict[tuple[str, ...], _Observations]):
    """A histogram, a series by the values of its labels as `_Counter` has them, exposed as
    prometheus_client's Histogram exposes one: each bucket's count with those below it
    (`le`), `_count`, `_sum`, `_created` a series."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 buckets: Iterable[float]) -> None:
        super().__init__()
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._bounds = (*map(float, buckets), math.inf)
        self._bound_texts = tuple(map(floatToGoString, self._bounds))

    def __missing__(self, values: tuple[str, ...]) -> _Observations:
        series = self[values] = _Observations(self._bounds)
        return series

    def family(self) -> Metric:
        family = Metric(self.name, self.documentation, "histogram")
        for values, series in list(self.items()):
            labels = dict(zip(self.labelnames, values, strict=True))
            total = 0.0  # a float, as prometheus_client writes it
            for bound, count in zip(self._bound_texts, series.counts, strict=True):
                total += count
                family.add_sample(f"{self.name}_bucket", {**labels, "le": bound}, total)
            family.add_sample(f"{self.name}_count", labels, total)
            family.add_sample(f"{self.name}_sum", labels, series.sum)
            if prometheus_metrics._use_created:
                family.add_sample(f"{self.name}_created", labels, series.created)
        return family


PHASE_SECONDS = _Histogram(
    "comfyfleet_job_phase_seconds",
    "Time jobs spend in each phase: queue_wait (submit to dispatch), dispatch (dispatch to "
    "execution start on the backend), run (execution), upload (outputs to storage), "
    "webhook (job end to delivered webhook)",
    ("phase", "workflow"), _BUCKETS,
)
JOB_SECONDS = _Histogram(
    "comfyfleet_job_seconds", "Time from submit to the end, by outcome",
    ("workflow", "status"), _BUCKETS,
)
JOBS_FINISHED = _Counter(
    "comfyfleet_jobs_finished", "Jobs that ended in this process, by outcome",
    ("workflow", "status"),
)
WEBHOOK_ATTEMPTS = _Counter(
    "comfyfleet_webhook_attempts",
    "Webhook delivery attempts by outcome: delivered, http_error (a non-2xx answer) or "
    "error (no answer: connection refused, timeout, address not allowed)",
    ("outcome",),
)
WEBHOOK_ATTEMPTS_UNRECORDED = _Counter(
    "comfyfleet_webhook_attempts_unrecorded",
    "Webhook attempts the database refused to record (not an outage) a few times, dropped: "
    "their delivery is sent again when its lease runs out")
OUTPUT_BYTES = _Counter("comfyfleet_output_bytes", "Bytes of job outputs stored")
QUEUE_FULL = _Counter(
    "comfyfleet_queue_full",
    "Submits refused with 429 queue_full, by the backlog that was full: key (the key's "
    "max_queued) or service (MAX_QUEUED)", ("scope",))
DISPATCH_CLAIMS = _Counter(
    "comfyfleet_dispatch_claims",
    "The backends the dispatcher's claims asked (a claim's first, whose slots its read "
    "counted, and the one after it that chose a job) by outcome: took (a job), no_slot (the "
    "backend's slots full by the database's count), empty (nothing queued), not_accepting "
    "(drained or gone), cannot_run (no queued job it can run), waits_for_warm (every job "
    "sooner on a backend holding its model), slower (faster backends finish the backlog "
    "first), tenant_limit (the chosen job's key at its max_concurrent, or given one since "
    "the claim read the backlog), raced (other processes' claims took the chosen job, or "
    "passed a job it passes to AFFINITY_WINDOW, since each read the claim picked on), "
    "not_submitted (a claim in a submit's transaction chose a job other than the one "
    "submitted: left to the dispatcher's next pass), queued (a job chosen before it was "
    "stored, with jobs queued by then: left to the claim in its insert's transaction)",
    ("outcome",))
CLAIM_TRANSACTIONS = _Counter(
    "comfyfleet_dispatch_claim_transactions",
    "The dispatcher's claims: each a read of the backlog for its first backend (none after "
    "a take of the same pass: the take read it), and the take (a statement of its own, "
    "reading the backlog for the next claim) of the job that backend or one after it, asked "
    "on the same read, chose")
STORAGE_ERRORS = _Counter(
    "comfyfleet_storage_errors", "Failed writes to output storage (each is retried)")
COLLECTION_FAILURES = _Counter(
    "comfyfleet_collection_failures", "Tries to collect a job's outputs that failed other "
    "than by an outage (a few are made, then the job fails)")


class _Events(Collector):
    """The metrics above, in the order they are defined."""

    def collect(self) -> Iterator[Metric]:
        for metric in (PHASE_SECONDS, JOB_SECONDS, JOBS_FINISHED, WEBHOOK_ATTEMPTS,
                       WEBHOOK_ATTEMPTS_UNRECORDED, OUTPUT_BYTES, QUEUE_FULL, DISPATCH_CLAIMS,
                       CLAIM_TRANSACTIONS, STORAGE_ERRORS, COLLECTION_FAILURES):
            yield metric.family()


REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
REGISTRY.register(_Events())


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max((end - start).total_seconds(), 0.0)


def _observe(phase: str, workflow: str, seconds: float | None) -> None:
    if seconds is not None:
        PHASE_SECONDS[phase, workflow].observe(seconds)


def job_dispatched(job: Job) -> None:
    """Claimed for a backend: the wait in the queue is over."""
    _observe("queue_wait", job.workflow, _seconds(job.created_at, job.dispatched_at))


def job_started(job: Job) -> None:
    """The backend began executing it."""
    _observe("dispatch", job.workflow, _seconds(job.dispatched_at, job.started_at))


def job_executed(job: Job) -> None:
    """The backend finished executing it; its outputs are to be collected now."""
    _observe("run", job.workflow, _seconds(job.started_at, utcnow()))


async def timed_upload(job: Job, collecting: Awaitable[None]) -> None:
    """Await the collection of a job's outputs, timing it (not when it is cut short)."""
    started = asyncio.get_running_loop().time()
    await collecting
    _observe("upload", job.workflow, asyncio.get_running_loop().time() - started)


def job_finished(job: Job) -> None:
    status = str(job.status)
    JOBS_FINISHED[job.workflow, status].inc()
    seconds = _seconds(job.created_at, job.finished_at)
    if seconds is not None:
        JOB_SECONDS[job.workflow, status].observe(seconds)
    if job.status == JobStatus.SUCCEEDED:
        stored = sum(o["size"] for o in job.outputs if isinstance(o.get("size"), int))
        OUTPUT_BYTES.inc(stored)


def queue_full(scope: str) -> None:
    QUEUE_FULL[scope,].inc()


def dispatch_claim(outcomes: Iterable[str]) -> None:
    """One claim transaction, with what came of each backend it locked."""
    CLAIM_TRANSACTIONS.inc()
    for outcome in outcomes:
        DISPATCH_CLAIMS[outcome,].inc()


def storage_error() -> None:
    STORAGE_ERRORS.inc()


def collection_failed() -> None:
    COLLECTION_FAILURES.inc()


def webhook_attempt(delivery: OutgoingDelivery, delivered: bool, status_code: int | None) -> None:
    """One attempt; a delivered one also ends the event's webhook phase, measured from when
    the event was queued."""
    if delivered:
        WEBHOOK_ATTEMPTS["delivered",].inc()
        data = delivery.payload.get("data")
        workflow = data.get("workflow") if isinstance(data, dict) else None
        _observe("webhook", str(workflow), _seconds(delivery.pending_since, utcnow()))
    else:
        WEBHOOK_ATTEMPTS["http_error" if status_code is not None else "error",].inc()


def webhook_attempt_unrecorded() -> None:
    WEBHOOK_ATTEMPTS_UNRECORDED.inc()
