"""Prometheus metrics: the metric objects and one-line helpers the fleet calls where it learns
a fact (a job dispatched, started, executed, uploaded, finished; a webhook attempt).

Events are counted in a registry of this module (one per process, like the process itself).
What describes one running app (its backends; the unfinished jobs in the database) is read
when /metrics is scraped, by the `Scrape` of that app, so several apps in one process (tests)
each report their own state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from comfyfleet.jobs.deliveries import Delivery
from comfyfleet.jobs.models import Job, JobStatus, utcnow

if TYPE_CHECKING:
    from comfyfleet.execution.session import BackendSession
    from comfyfleet.jobs.repository import JobRepository

log = logging.getLogger(__name__)

# Seconds, from a cached prompt's instant run to a long video job.
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
# A scrape never waits longer than this for the database.
DATABASE_TIMEOUT = 2.0

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

PHASE_SECONDS = Histogram(
    "comfyfleet_job_phase_seconds",
    "Time jobs spend in each phase: queue_wait (submit to dispatch), dispatch (dispatch to "
    "execution start on the backend), run (execution), upload (outputs to storage), "
    "webhook (job end to delivered webhook)",
    ["phase", "workflow"], buckets=_BUCKETS, registry=REGISTRY,
)
JOB_SECONDS = Histogram(
    "comfyfleet_job_seconds", "Time from submit to the end, by outcome",
    ["workflow", "status"], buckets=_BUCKETS, registry=REGISTRY,
)
JOBS_FINISHED = Counter(
    "comfyfleet_jobs_finished", "Jobs that ended in this process, by outcome",
    ["workflow", "status"], registry=REGISTRY,
)
WEBHOOK_ATTEMPTS = Counter(
    "comfyfleet_webhook_attempts",
    "Webhook delivery attempts by outcome: delivered, http_error (a non-2xx answer) or "
    "error (no answer: connection refused, timeout, address not allowed)",
    ["outcome"], registry=REGISTRY,
)
OUTPUT_BYTES = Counter(
    "comfyfleet_output_bytes", "Bytes of job outputs stored", registry=REGISTRY)
STORAGE_ERRORS = Counter(
    "comfyfleet_storage_errors", "Failed writes to output storage (each is retried)",
    registry=REGISTRY)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max((end - start).total_seconds(), 0.0)


def _observe(phase: str, workflow: str, seconds: float | None) -> None:
    if seconds is not None:
        PHASE_SECONDS.labels(phase, workflow).observe(seconds)


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
    JOBS_FINISHED.labels(job.workflow, status).inc()
    seconds = _seconds(job.created_at, job.finished_at)
    if seconds is not None:
        JOB_SECONDS.labels(job.workflow, status).observe(seconds)
    if job.status == JobStatus.SUCCEEDED:
        stored = sum(o["size"] for o in job.outputs if isinstance(o.get("size"), int))
        OUTPUT_BYTES.inc(stored)


def storage_error() -> None:
    STORAGE_ERRORS.inc()


def webhook_attempt(delivery: Delivery, delivered: bool, status_code: int | None) -> None:
    """One attempt; a delivered one also ends the event's webhook phase, measured from when
    the event was queued."""
    if delivered:
        WEBHOOK_ATTEMPTS.labels("delivered").inc()
        data = delivery.payload.get("data")
        workflow = data.get("workflow") if isinstance(data, dict) else None
        _observe("webhook", str(workflow), _seconds(delivery.pending_since, utcnow()))
    else:
        WEBHOOK_ATTEMPTS.labels("http_error" if status_code is not None else "error").inc()


class _Shared(Collector):
    """The process-wide event metrics, inside an app's registry."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


class _Fleet(Collector):
    """One app's backends and unfinished jobs, as of the last refresh."""

    def __init__(self, sessions: list[BackendSession]) -> None:
        self._sessions = sessions
        self.unfinished: list[tuple[str, str, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("comfyfleet_backend_up",
                               "1 when the backend's websocket is connected", labels=["backend"])
        draining = GaugeMetricFamily("comfyfleet_backend_draining",
                                     "1 when the backend takes no new work", labels=["backend"])
        queue = GaugeMetricFamily(
            "comfyfleet_backend_queue_remaining",
            "Prompts in the backend's queue, other clients' included", labels=["backend"])
        inflight = GaugeMetricFamily(
            "comfyfleet_backend_inflight", "Prompts this process has on the backend",
            labels=["backend"])
        for session in list(self._sessions):
            up.add_metric([session.name], int(session.connected))
            draining.add_metric([session.name], int(session.draining))
            queue.add_metric([session.name], session.queue_remaining)
            inflight.add_metric([session.name], len(session.inflight))
        yield from (up, draining, queue, inflight)
        if self.unfinished is not None:
            jobs = GaugeMetricFamily(
                "comfyfleet_jobs",
                "Unfinished jobs in the database (all processes) by status and workflow",
                labels=["status", "workflow"])
            for status, workflow, count in self.unfinished:
                jobs.add_metric([status, workflow], count)
            yield jobs


class Scrape:
    """What GET /metrics answers for one app."""

    def __init__(self, repository: JobRepository, sessions: list[BackendSession]) -> None:
        self._repository = repository
        self._fleet = _Fleet(sessions)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Shared())
        self.registry.register(self._fleet)

    async def render(self) -> bytes:
        """The exposition text, with job counts read from the database now (left out when
        the database does not answer in time, rather than shown stale)."""
        try:
            async with asyncio.timeout(DATABASE_TIMEOUT):
                self._fleet.unfinished = await self._repository.unfinished_counts()
        except Exception as exc:  # the database is away: the rest of the metrics still count
            log.warning("metrics: job counts unavailable: %s", exc)
            self._fleet.unfinished = None
        return generate_latest(self.registry)
