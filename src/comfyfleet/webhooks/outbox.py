"""The webhook outbox's lease SQL (DESIGN §5): delivery workers in any process claim due rows
under a lease; a row whose lease ran out (its process died mid-attempt) is due again. The rows
themselves are written with the job change they report (`jobs/deliveries.py`).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, insert, or_, tuple_, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from comfyfleet.db import single_statements
from comfyfleet.jobs.deliveries import (
    ATTEMPT_LOG,
    DELIVERIES,
    NOTIFY_CHANNEL,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
)
from comfyfleet.jobs.models import utcnow


@dataclass(frozen=True)
class Outcome:
    """What one attempt leads to: the delivery's next status and, if pending, when."""

    status: DeliveryStatus
    next_attempt_at: datetime | None = None


class Outbox:
    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
        self._statements = single_statements(engine)

    async def claim(
        self, *, limit: int, per_host: int, busy: Mapping[str, int], lease: timedelta
    ) -> list[Delivery]:
        """Lease up to `limit` due deliveries, at most `per_host` in flight per receiver host
        counting the `busy` ones this process already has there."""
        now = utcnow()
        full = [host for host, count in busy.items() if count >= per_host]
        async with self._sessions.begin() as session:
            candidates = await session.exec(
                select(col(Delivery.id), col(Delivery.host))
                .where(
                    col(Delivery.status) == DeliveryStatus.PENDING,
                    col(Delivery.next_attempt_at) <= now,
                    # A lease that ran out: its process died (or stalled) mid-attempt.
                    or_(col(Delivery.locked_until).is_(None), col(Delivery.locked_until) <= now),
                    col(Delivery.host).not_in(full),
                )
                .order_by(col(Delivery.next_attempt_at))
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            taken: Counter[str] = Counter(busy)
            chosen = []
            for delivery_id, host in candidates:
                if taken[host] < per_host:
                    taken[host] += 1
                    chosen.append(delivery_id)
            if not chosen:
                return []
            # Core, not an ORM bulk update: no session to synchronise, rows built directly.
            result = await session.exec(
                update(DELIVERIES)
                .where(DELIVERIES.c.id.in_(chosen))
                .values(locked_until=now + lease, lease_token=uuid.uuid4())
                .returning(*DELIVERIES.c)
            )
            return [Delivery(**row._mapping) for row in result]

    async def next_due(self, *, skip_hosts: list[str]) -> datetime | None:
        """When the earliest pending delivery (not for `skip_hosts`) can next be claimed."""
        async with self._statements() as session:
            result = await session.exec(
                select(func.min(func.greatest(col(Delivery.next_attempt_at),
                                              col(Delivery.locked_until))))
                .where(col(Delivery.status) == DeliveryStatus.PENDING,
                       col(Delivery.host).not_in(skip_hosts))
            )
            due: datetime | None = result.one()
            return due

    async def record(self, delivery: Delivery, attempt: DeliveryAttempt, outcome: Outcome) -> bool:
        """Log `attempt` and move the delivery on, unless its lease was lost meanwhile (then
        only the log entry is written: another worker owns the delivery now)."""
        # One statement (so no transaction around it): the log entry is a data-modifying
        # CTE, written whether or not the UPDATE finds the lease.
        logged = insert(ATTEMPT_LOG).values(**attempt.model_dump(exclude={"id"})).cte("logged")
        statement = (
            update(DELIVERIES)
            .add_cte(logged)
            .where(DELIVERIES.c.id == delivery.id,
                   DELIVERIES.c.lease_token == delivery.lease_token)
            .values(
                status=outcome.status,
                next_attempt_at=outcome.next_attempt_at,
                attempts=DELIVERIES.c.attempts + 1,
                locked_until=None,
                lease_token=None,
                last_status_code=attempt.status_code,
                last_error=attempt.error,
            )
            .returning(DELIVERIES.c.id)
        )
        async with self._statements() as session:
            return (await session.exec(statement)).first() is not None

    async def release(self, deliveries: list[Delivery]) -> None:
        """Give up the leases of attempts cut short (a shutdown), so another process sends
        them at once instead of when the leases would have run out."""
        if not deliveries:
            return
        statement = (
            update(DELIVERIES)
            .where(tuple_(DELIVERIES.c.id, DELIVERIES.c.lease_token).in_(
                [(delivery.id, delivery.lease_token) for delivery in deliveries]))
            .values(locked_until=None, lease_token=None)
        )
        async with self._statements() as session:
            await session.exec(statement)

    async def for_job(self, job_id: uuid.UUID) -> list[tuple[Delivery, list[DeliveryAttempt]]]:
        async with self._sessions() as session:
            deliveries = (await session.exec(
                select(Delivery).where(col(Delivery.job_id) == job_id)
                .order_by(col(Delivery.created_at), col(Delivery.id))
            )).all()
            return [(delivery, await _attempts(session, delivery.id)) for delivery in deliveries]

    async def get(self, delivery_id: uuid.UUID) -> tuple[Delivery, list[DeliveryAttempt]] | None:
        async with self._sessions() as session:
            delivery = await session.get(Delivery, delivery_id)
            if delivery is None:
                return None
            return delivery, await _attempts(session, delivery.id)

    async def redeliver(self, delivery_id: uuid.UUID) -> bool:
        """Make a delivery due now with a fresh retry schedule, whatever its status; it keeps
        its `webhook-id`. An attempt in flight keeps its lease and finishes first."""
        now = utcnow()
        async with self._sessions.begin() as session:
            result = await session.exec(
                update(Delivery)
                .where(col(Delivery.id) == delivery_id)
                .values(status=DeliveryStatus.PENDING, attempts=0, pending_since=now,
                        next_attempt_at=now)
                .returning(col(Delivery.id))
            )
            if result.first() is None:
                return False
            await session.exec(select(func.pg_notify(NOTIFY_CHANNEL, "")))
            return True


async def _attempts(session: AsyncSession, delivery_id: uuid.UUID) -> list[DeliveryAttempt]:
    result = await session.exec(
        select(DeliveryAttempt).where(col(DeliveryAttempt.delivery_id) == delivery_id)
        .order_by(col(DeliveryAttempt.id))
    )
    return list(result.all())
