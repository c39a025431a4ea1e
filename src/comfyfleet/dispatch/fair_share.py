"""Fair share between tenants (API keys): free slots go to the tenants with queued work in
proportion to their weights, measured in estimated GPU-seconds rather than in jobs.

Start-time fair queueing in virtual time. A tenant's virtual time is the GPU-seconds its jobs
were charged over its weight (sql/claim.sql keeps it, in every process's view alike): each
claim charges the estimated run time of the job it takes, and the job's real run replaces the
estimate when it leaves the backend. A tenant's next job starts at its virtual time, each
later one where the one before it would end; a backend takes, among the jobs it can run, the
one that starts first. Within a tenant its own order holds (priority, then age); a tenant
that arrives, or comes back after idling, starts at the fleet's virtual clock, so it is served
at once but banks no credit for having been away.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from comfyfleet.jobs.repository import QueuedJob, TenantHead


def fair_order(queued: Sequence[QueuedJob], tenants: Mapping[str, TenantHead],
               seconds: Callable[[str], float]) -> list[QueuedJob]:
    """`queued` (each tenant's jobs in the tenant's own order) in the order fair share serves
    them: by each job's start in virtual time, its tenant's start (of `tenants`, which has
    every job's tenant, by name) plus the estimated seconds (`seconds` of its workflow) of the
    tenant's jobs before it over the tenant's weight; at the same start, the older job first."""
    if len(tenants) <= 1:
        # One tenant's jobs start one after another in its own order: at every claim each
        # backend asked ordered the read, a job at a time, to the order it was read in (and
        # looked at every job's tenant to know there was one).
        return list(queued)
    reached = {tenant: head.start for tenant, head in tenants.items()}
    # `seconds` asked once a workflow: a read is a few workflows, and every backend a claim
    # asks orders it.
    by_workflow: dict[str, float] = {}
    starts: list[tuple[float, datetime, int]] = []
    for place, job in enumerate(queued):
        start = reached[job.tenant]
        starts.append((start, job.created_at, place))  # the place: at a tie, as read
        workflow_seconds = by_workflow.get(job.workflow)
        if workflow_seconds is None:
            workflow_seconds = by_workflow[job.workflow] = seconds(job.workflow)
        reached[job.tenant] = start + workflow_seconds / tenants[job.tenant].weight
    return [queued[place] for _, _, place in sorted(starts)]


def fifo_order(queued: Sequence[QueuedJob]) -> list[QueuedJob]:
    """`queued` as one backlog regardless of tenants: highest priority, then oldest, first
    (FAIR_SHARE=false)."""
    return sorted(queued, key=lambda job: (-job.priority, job.created_at))


def expected_end(ahead: int, seconds: float, on_backends: float, gpus: int) -> float:
    """Expected seconds until a queued job ends: first the work before it, what the jobs on
    backends have left (`on_backends` seconds, all told) and the `ahead` jobs queued before
    it in the order slots are filled (fair share's, with it on), each taken as long as the
    job's own workflow runs (`seconds`, measured), shared by the `gpus` backends that run a
    prompt each at a time; then its own run. A fluid estimate: the job starts when its
    backend frees, up to one job's length either side of the work's share coming due."""
    return (on_backends + ahead * seconds) / max(gpus, 1) + seconds
