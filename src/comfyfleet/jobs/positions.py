"""Queue positions as fair share serves the tenants, counted from the backlog's order.

A position is counted either from one job's `place` (sql/claim.sql: every queued job counted
for the job asked about, exact, at a cost that grows with the backlog) or from a `Backlog`:
the order of every queued job (tenant, priority, created_at), read once and shared by every
ask, read again in the background after jobs change (the repository keeps it in a `Recent`),
each ask then a bisect. The
repository counts afresh while the backlog is small and from a snapshot once it is deep, so
that a GET's cost does not grow with the backlog and the database reads it at most once per
POSITION_MAX_AGE, whatever the rate of asks.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_microseconds(moment: datetime) -> int:
    """`moment` as `backlog` (sql/claim.sql) gives a created_at: whole microseconds since the
    epoch (exact: PostgreSQL keeps microseconds)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


@dataclass(frozen=True)
class Share:
    """A tenant's part of the backlog as seen from one queued job: its jobs `queued`, those of
    them `ahead` of the job (by priority, then age), its `start` in virtual time and its
    `weight`."""

    queued: int
    ahead: int
    start: float
    weight: float


def fair_position(own: Share, others: Iterable[Share], seconds: float) -> int:
    """1 for the queued job the next free slot takes (ignoring capability routing and
    limits): its own tenant's jobs ahead of it, and of every other tenant as many as start
    before it in virtual time, each taken to run `seconds` (as long as this job's workflow
    usually does). A tie goes to the older job: most often theirs."""
    starts = own.start + own.ahead * seconds / own.weight
    sooner = sum(
        min(other.queued, math.floor((starts - other.start) * other.weight / seconds) + 1)
        for other in others if other.start <= starts)
    return own.ahead + 1 + sooner


@dataclass(frozen=True)
class TenantBacklog:
    """One tenant's queued jobs: the created_at of each (`epoch_microseconds`, oldest first)
    by priority, its start in virtual time and its weight."""

    start: float
    weight: float
    created: Mapping[int, list[int]]

    @property
    def queued(self) -> int:
        return sum(len(jobs) for jobs in self.created.values())

    def ahead(self, priority: int, created_at: datetime) -> int:
        """Its jobs of higher priority than `priority`, or as high and created before."""
        moment = epoch_microseconds(created_at)
        return sum(len(jobs) if level > priority else bisect.bisect_left(jobs, moment)
                   for level, jobs in self.created.items() if level >= priority)


@dataclass(frozen=True)
class Backlog:
    """Every queued job's place in the order fair share serves, as `backlog` read it, with
    the fleet's virtual clock then (where a tenant with no job in it starts)."""

    tenants: Mapping[str, TenantBacklog]
    clock: float

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> Backlog:
        """From `backlog`'s rows: one per tenant and priority."""
        created: dict[str, dict[int, list[int]]] = {}
        shares: dict[str, tuple[float, float]] = {}
        clock = 0.0
        for row in rows:
            created.setdefault(row["tenant"], {})[int(row["priority"])] = list(row["created"])
            shares[row["tenant"]] = float(row["start"]), float(row["weight"])
            clock = float(row["clock"])
        tenants = {tenant: TenantBacklog(*shares[tenant], created=jobs)
                   for tenant, jobs in created.items()}
        return cls(tenants, clock)

    @property
    def size(self) -> int:
        return sum(tenant.queued for tenant in self.tenants.values())

    def shares(self, tenant: str, priority: int, created_at: datetime) -> tuple[Share, list[Share]]:
        """The shares seen from a job of `tenant` queued at `priority` since `created_at`: its
        own tenant's (none queued, at the clock and of weight 1 if the snapshot has none of
        its jobs), then the others'."""
        shares = {name: Share(backlog.queued, backlog.ahead(priority, created_at),
                              backlog.start, backlog.weight)
                  for name, backlog in self.tenants.items()}
        own = shares.pop(tenant, Share(0, 0, self.clock, 1.0))
        return own, list(shares.values())
