"""Honest backpressure (DESIGN §4): a submit past a full backlog (its key's `max_queued`, or
MAX_QUEUED for the whole service) is refused, with when to try again.

The backlog gains room when its head starts, which is when a job on a backend ends (for a key,
one of its own when it has any there: with `max_concurrent` that is the only way its head
starts). That moment is estimated from the learned run times of the jobs on backends (on a
cold start, with none learned yet, from how long they have run so far: see
`JobRepository.next_finish_seconds`).
"""

from __future__ import annotations

import math

from comfyfleet import metrics
from comfyfleet.intake.errors import BacklogFull
from comfyfleet.jobs.models import Job
from comfyfleet.jobs.repository import (
    BacklogLimits,
    Dispatch,
    JobRepository,
    KeyClaim,
    QueueFull,
    Tenant,
)

# When no job is on a backend (none may be for a while: no backend can run the backlog's
# head, or none is up): nothing to go by.
UNKNOWN_RETRY_AFTER = 10
MAX_RETRY_AFTER = 3600


def backlog_limits(max_queued_of_key: int | None, max_queued: int | None) -> BacklogLimits | None:
    """What a submit's insert checks: the key's max_queued and the service's MAX_QUEUED; None
    when neither is set (nothing to count)."""
    if max_queued_of_key is None and max_queued is None:
        return None
    return BacklogLimits(max_queued_of_key, max_queued)


async def insert(
    repository: JobRepository, job: Job, backlog: BacklogLimits | None,
    claim: KeyClaim | None = None, dispatch: Dispatch | None = None,
) -> tuple[Job, bool]:
    """Store the job, or find the earlier one under its idempotency key: the repository's
    insert (which lets go of `claim` with a job stored, and offers it to `dispatch` in its
    transaction), with a full `backlog` refused as BacklogFull saying when to try again."""
    try:
        return await repository.insert(job, backlog=backlog, claim=claim, dispatch=dispatch)
    except QueueFull as full:
        seconds = await retry_after(repository, full, Tenant(job.api_key_hash))
        raise BacklogFull(refusal(full, seconds), full, seconds) from full


def refusal(full: QueueFull, seconds: int) -> str:
    """What a queue_full answer says."""
    whose = ("this API key's backlog is full (its max_queued)" if full.scope == "key"
             else "the service's backlog is full (MAX_QUEUED)")
    return f"{whose}: {full.queued} jobs queued; retry in {seconds} s"


async def retry_after(repository: JobRepository, full: QueueFull, tenant: Tenant) -> int:
    """Whole seconds after which the refused submit may well be taken (counted as a refusal
    in the metrics)."""
    metrics.queue_full(full.scope)
    seconds = None
    if full.scope == "key":
        seconds = await repository.next_finish_seconds(tenant)
    if seconds is None:  # the service's backlog, or a key with nothing running
        seconds = await repository.next_finish_seconds()
    if seconds is None:
        return UNKNOWN_RETRY_AFTER
    return min(max(1, math.ceil(seconds)), MAX_RETRY_AFTER)
