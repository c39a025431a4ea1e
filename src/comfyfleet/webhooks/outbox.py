"""The webhook outbox (DESIGN §5): all its SQL, and its two tables.

A delivery row is written in the same transaction as the job change it reports (see
`JobRepository.transition`), so an event a client was promised is never lost. Delivery
workers in any process claim due rows under a lease; a row whose lease ran out (its process
died mid-attempt) is due again.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    String,
    Uuid,
    func,
    insert,
    or_,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from comfyfleet.db import single_statements
from comfyfleet.jobs.models import TERMINAL_STATES, Job, utcnow
from comfyfleet.jobs.render import job_json

# Woken with pg_notify when a delivery becomes due now, in whichever process commits it.
NOTIFY_CHANNEL = "comfyfleet_webhooks"
OPTIONAL_EVENTS = ("job.started", "job.progress")
TERMINAL_EVENTS = frozenset(f"job.{state}" for state in TERMINAL_STATES)


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # an attempt is due at next_attempt_at
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # the receiver answered 410 Gone: never retried
    DEAD = "dead"  # still failing when WEBHOOK_MAX_AGE ran out


def _timestamp(nullable: bool) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=nullable))


class Delivery(SQLModel, table=True):
    __tablename__ = "webhook_deliveries"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    job_id: uuid.UUID = Field(sa_column=Column(Uuid, ForeignKey("jobs.id"), nullable=False))
    event_type: str
    # `webhook-id`: the same on every attempt, so receivers can deduplicate.
    message_id: str = Field(default_factory=lambda: "msg_" + uuid.uuid4().hex)
    url: str
    # host:port, the unit of the per-receiver concurrency limit.
    host: str
    # The event body as of the event; output URLs are presigned afresh at each attempt.
    payload: dict[str, Any] = Field(sa_column=Column(JSONB, nullable=False))
    status: str = Field(
        default=DeliveryStatus.PENDING, sa_column=Column(String(16), nullable=False)
    )
    # Attempts since the delivery became pending (created, or redelivered): the position in
    # the retry schedule. The attempts table keeps every attempt ever made.
    attempts: int = 0
    pending_since: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    next_attempt_at: datetime | None = _timestamp(nullable=True)
    locked_until: datetime | None = _timestamp(nullable=True)
    lease_token: uuid.UUID | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )


_deliveries = Delivery.__table__  # type: ignore[attr-defined]


class DeliveryAttempt(SQLModel, table=True):
    __tablename__ = "webhook_attempts"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: uuid.UUID = Field(
        sa_column=Column(Uuid, ForeignKey("webhook_deliveries.id"), nullable=False)
    )
    attempted_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    status_code: int | None = None
    latency_ms: int
    error: str | None = None
    response_snippet: str | None = None


_attempt_log = DeliveryAttempt.__table__  # type: ignore[attr-defined]
# Built once, the values given at execution. The notification rides on the insert (one round
# trip, not two); PostgreSQL sends it when the transaction commits.
_ENQUEUE = insert(_deliveries).returning(func.pg_notify(NOTIFY_CHANNEL, ""))


@dataclass(frozen=True)
class Outcome:
    """What one attempt leads to: the delivery's next status and, if pending, when."""

    status: DeliveryStatus
    next_attempt_at: datetime | None = None


def receiver_host(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{(parts.hostname or '').lower()}:{port}"


def subscribed(job: Job, event_type: str) -> bool:
    if not job.callback_url:
        return False
    return event_type in TERMINAL_EVENTS or event_type in (job.webhook_events or ())


async def _no_url(_: str) -> None:
    return None


async def enqueue(session: AsyncSession, job: Job, event_type: str) -> None:
    """Add `event_type` for `job` to the outbox inside the caller's transaction, if the job's
    client subscribed to it; workers hear of it when that transaction commits."""
    if not subscribed(job, event_type):
        return
    assert job.callback_url is not None
    now = utcnow()
    event = {"type": event_type, "timestamp": now.isoformat(),
             "data": await job_json(job, _no_url)}
    delivery = Delivery(
        job_id=job.id, event_type=event_type, url=job.callback_url,
        host=receiver_host(job.callback_url), payload=event, pending_since=now,
        next_attempt_at=now, created_at=now,
    )
    await session.exec(_ENQUEUE, params=delivery.model_dump())


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
                update(_deliveries)
                .where(_deliveries.c.id.in_(chosen))
                .values(locked_until=now + lease, lease_token=uuid.uuid4())
                .returning(*_deliveries.c)
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
        logged = insert(_attempt_log).values(**attempt.model_dump(exclude={"id"})).cte("logged")
        statement = (
            update(_deliveries)
            .add_cte(logged)
            .where(_deliveries.c.id == delivery.id,
                   _deliveries.c.lease_token == delivery.lease_token)
            .values(
                status=outcome.status,
                next_attempt_at=outcome.next_attempt_at,
                attempts=_deliveries.c.attempts + 1,
                locked_until=None,
                lease_token=None,
                last_status_code=attempt.status_code,
                last_error=attempt.error,
            )
            .returning(_deliveries.c.id)
        )
        async with self._statements() as session:
            return (await session.exec(statement)).first() is not None

    async def release(self, deliveries: list[Delivery]) -> None:
        """Give up the leases of attempts cut short (a shutdown), so another process sends
        them at once instead of when the leases would have run out."""
        if not deliveries:
            return
        statement = (
            update(_deliveries)
            .where(tuple_(_deliveries.c.id, _deliveries.c.lease_token).in_(
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
