"""The webhook outbox's lease SQL (DESIGN §5): delivery workers in any process claim due rows
under a lease; a row whose lease ran out (its process died mid-attempt) is due again. The rows
themselves are written with the job change they report (`jobs/deliveries.py`).

What runs for every delivery (record the attempts made, lease those due, find when the next
falls due) is one statement of fixed SQL in `sql/outbox.sql` on asyncpg, and so is what the
worker does as it stops (give back the leases of attempts cut short); the operator's reads
and the redelivery stay on SQLAlchemy.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

import orjson
from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from comfyfleet import sql
from comfyfleet.db import driver_connection
from comfyfleet.jobs.deliveries import (
    DELIVERIES,
    NOTIFY_CHANNEL,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    OutgoingDelivery,
)
from comfyfleet.jobs.models import utcnow

_SQL = sql.queries("outbox")
_LEASED_FIELDS = len(OutgoingDelivery._fields)  # a leased row's first fields (sql `pass`)


class Outcome(NamedTuple):
    """What one attempt leads to: the delivery's next status and, if pending, when."""

    status: DeliveryStatus
    next_attempt_at: datetime | None = None


@dataclass(slots=True)
class Attempt:
    """An attempt made on a leased delivery, and the outcome it leads to, as the pass records
    it: written as a JSON object by orjson (sql/outbox.sql `pass`)."""

    delivery_id: uuid.UUID
    lease_token: uuid.UUID | None
    attempted_at: datetime
    status_code: int | None  # None: no HTTP answer
    latency_ms: int
    error: str | None
    response_snippet: str | None
    status: DeliveryStatus
    next_attempt_at: datetime | None


class Settled(NamedTuple):
    """An attempt made on a leased delivery, to be recorded."""

    delivery: OutgoingDelivery
    attempt: Attempt
    refusals: int = 0  # statements of its own the database refused to record it in


class Pass(NamedTuple):
    """What one pass over the outbox did: the deliveries it leased, those of the attempts it
    recorded whose lease held (the others belong to another worker now), and when the next
    delivery falls due (None: none pending, or the lease took all it was allowed)."""

    leased: list[OutgoingDelivery]
    kept: frozenset[uuid.UUID]
    next_due: datetime | None


class Outbox:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)

    async def settle(
        self, attempts: Sequence[Settled], *, limit: int, per_host: int,
        busy: Mapping[str, int], lease: timedelta,
    ) -> Pass:
        """Record `attempts` (each delivery moves on only where its lease held), then lease up
        to `limit` due deliveries, at most `per_host` in flight per receiver host counting the
        `busy` ones the caller already has there, and find when the next one falls due: all
        in one statement (sql/outbox.sql `pass`)."""
        now = utcnow()
        full = [host for host, count in busy.items() if count >= per_host]
        # (`default`: the UUIDs of leased rows are asyncpg's, a subclass orjson refuses.)
        recorded = orjson.dumps([settled.attempt for settled in attempts], default=str)
        async with driver_connection(self._engine) as connection:
            rows = await connection.fetch(
                _SQL["pass"], now, recorded.decode(), limit, full, list(busy),
                list(busy.values()), per_host, now + lease, uuid.uuid4())
        first = rows[0]
        # (asyncpg's UUIDs are uuid.UUIDs, equal to and hashed as ours.)
        kept = frozenset(first["kept"] or ())
        leased = [OutgoingDelivery._make(row[:_LEASED_FIELDS]) for row in rows
                  if row["id"] is not None]
        return Pass(leased, kept, first["next_due"])

    async def claim(
        self, *, limit: int, per_host: int, busy: Mapping[str, int], lease: timedelta
    ) -> list[OutgoingDelivery]:
        """Lease up to `limit` due deliveries, recording nothing (`settle`)."""
        return (await self.settle([], limit=limit, per_host=per_host, busy=busy,
                                  lease=lease)).leased

    async def record(self, attempts: Sequence[Settled]) -> frozenset[uuid.UUID]:
        """Record `attempts`, leasing nothing (`settle`): the deliveries whose lease held."""
        return (await self.settle(attempts, limit=0, per_host=1, busy={},
                                  lease=timedelta())).kept

    async def release(self, deliveries: list[OutgoingDelivery]) -> None:
        """Give up the leases of attempts cut short (a shutdown), so another process sends
        them at once instead of when the leases would have run out."""
        if not deliveries:
            return
        async with driver_connection(self._engine) as connection:
            await connection.execute(_SQL["release"], [delivery.id for delivery in deliveries],
                                     [delivery.lease_token for delivery in deliveries])

    async def for_job(self, job_id: uuid.UUID) -> list[tuple[Delivery, list[DeliveryAttempt]]]:
        async with self._sessions() as session:
            await _one_snapshot(session)
            deliveries = (await session.exec(
                select(Delivery).where(col(Delivery.job_id) == job_id)
                .order_by(col(Delivery.created_at), col(Delivery.id))
            )).all()
            return [(delivery, await _attempts(session, delivery.id)) for delivery in deliveries]

    async def get(self, delivery_id: uuid.UUID) -> tuple[Delivery, list[DeliveryAttempt]] | None:
        async with self._sessions() as session:
            await _one_snapshot(session)
            delivery = await session.get(Delivery, delivery_id)
            if delivery is None:
                return None
            return delivery, await _attempts(session, delivery.id)

    async def redeliver(self, delivery_id: uuid.UUID) -> Delivery | None:
        """Make a delivery due now with a fresh retry schedule, whatever its status; it keeps
        its `webhook-id`. An attempt in flight keeps its lease and finishes first. Returns
        the delivery as this left it (a worker may send it the moment this commits), or
        None when there is no such delivery."""
        now = utcnow()
        async with self._sessions.begin() as session:
            result = await session.exec(
                update(DELIVERIES)
                .where(DELIVERIES.c.id == delivery_id)
                .values(status=DeliveryStatus.PENDING, attempts=0, pending_since=now,
                        next_attempt_at=now)
                .returning(*DELIVERIES.c)
            )
            row = result.first()
            if row is None:
                return None
            await session.exec(select(func.pg_notify(NOTIFY_CHANNEL, "")))
            return Delivery(**row._mapping)


async def _attempts(session: AsyncSession, delivery_id: uuid.UUID) -> list[DeliveryAttempt]:
    result = await session.exec(
        select(DeliveryAttempt).where(col(DeliveryAttempt.delivery_id) == delivery_id)
        .order_by(col(DeliveryAttempt.id))
    )
    return list(result.all())


async def _one_snapshot(session: AsyncSession) -> None:
    """Read a delivery and its attempt log as of one moment: under READ COMMITTED each
    statement has its own, and an attempt recorded between the two would show in the log
    while the delivery still said nothing had happened."""
    await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
