"""Prometheus metrics: the metric objects and one-line helpers the fleet calls where it learns
a fact (a job dispatched, started, executed, uploaded, finished; a webhook attempt).

Events are counted in a registry of this module (one per process, like the process itself).
What describes one running app (its backends; the unfinished jobs in the database) is read
when /metrics is scraped (`api/prometheus.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from datetime import datetime
from functools import cache

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.process_collector import ProcessCollector

from comfyfleet.jobs.deliveries import OutgoingDelivery
from comfyfleet.jobs.models import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

# Seconds, from a cached prompt's instant run to a long video job.
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)

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
QUEUE_FULL = Counter(
    "comfyfleet_queue_full",
    "Submits refused with 429 queue_full, by the backlog that was full: key (the key's "
    "max_queued) or service (MAX_QUEUED)", ["scope"], registry=REGISTRY)
DISPATCH_CLAIMS = Counter(
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
    ["outcome"], registry=REGISTRY)
CLAIM_TRANSACTIONS = Counter(
    "comfyfleet_dispatch_claim_transactions",
    "The dispatcher's claims: each a read of the backlog for its first backend (none after "
    "a take of the same pass: the take read it), and the take (a statement of its own, "
    "reading the backlog for the next claim) of the job that backend or one after it, asked "
    "on the same read, chose",
    registry=REGISTRY)
STORAGE_ERRORS = Counter(
    "comfyfleet_storage_errors", "Failed writes to output storage (each is retried)",
    registry=REGISTRY)
COLLECTION_FAILURES = Counter(
    "comfyfleet_collection_failures", "Tries to collect a job's outputs that failed other "
    "than by an outage (a few are made, then the job fails)", registry=REGISTRY)

# Each labelled metric's child by its labels, kept: `labels()` checks and converts the values
# and takes a lock at every call, several times a job.
_phase_seconds = cache(PHASE_SECONDS.labels)
_job_seconds = cache(JOB_SECONDS.labels)
_jobs_finished = cache(JOBS_FINISHED.labels)
_webhook_attempts = cache(WEBHOOK_ATTEMPTS.labels)
_dispatch_claims = cache(DISPATCH_CLAIMS.labels)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max((end - start).total_seconds(), 0.0)


def _observe(phase: str, workflow: str, seconds: float | None) -> None:
    if seconds is not None:
        _phase_seconds(phase, workflow).observe(seconds)


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
    _jobs_finished(job.workflow, status).inc()
    seconds = _seconds(job.created_at, job.finished_at)
    if seconds is not None:
        _job_seconds(job.workflow, status).observe(seconds)
    if job.status == JobStatus.SUCCEEDED:
        stored = sum(o["size"] for o in job.outputs if isinstance(o.get("size"), int))
        OUTPUT_BYTES.inc(stored)


def queue_full(scope: str) -> None:
    QUEUE_FULL.labels(scope).inc()


def dispatch_claim(outcomes: Iterable[str]) -> None:
    """One claim transaction, with what came of each backend it locked."""
    CLAIM_TRANSACTIONS.inc()
    for outcome in outcomes:
        _dispatch_claims(outcome).inc()


def storage_error() -> None:
    STORAGE_ERRORS.inc()


def collection_failed() -> None:
    COLLECTION_FAILURES.inc()


def webhook_attempt(delivery: OutgoingDelivery, delivered: bool, status_code: int | None) -> None:
    """One attempt; a delivered one also ends the event's webhook phase, measured from when
    the event was queued."""
    if delivered:
        _webhook_attempts("delivered").inc()
        data = delivery.payload.get("data")
        workflow = data.get("workflow") if isinstance(data, dict) else None
        _observe("webhook", str(workflow), _seconds(delivery.pending_since, utcnow()))
    else:
        _webhook_attempts("http_error" if status_code is not None else "error").inc()
