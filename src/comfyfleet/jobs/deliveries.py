"""Webhook deliveries as the jobs' data (DESIGN §5): the outbox's two tables and the row that
reports a job's change.

A delivery row is written by the same statement as the job change it reports
(`sql/jobs.sql`, through `JobRepository`), so an event a client was promised is never lost.
Sending them is the webhooks stage's work (`webhooks/outbox.py` leases them,
`webhooks/worker.py` sends).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from sqlalchemy import Column, DateTime, ForeignKey, String, Uuid
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from comfyfleet import json_codec
from comfyfleet.jobs.models import TERMINAL_STATES, Job, utcnow
from comfyfleet.jobs.render import job_json

# Woken with pg_notify when a delivery becomes due now, in whichever process commits it
# (sql/jobs.sql names it too).
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


def _new_ids() -> tuple[uuid.UUID, str]:
    """A new delivery's row id (a uuid4) and its `webhook-id`: 128 random bits in hex (a
    uuid4's text without the UUID, whose making took a tenth of `delivery_row`), from one
    read of the system's random bytes, not two (each a system call)."""
    random = os.urandom(32)
    return uuid.UUID(bytes=random[:16], version=4), "msg_" + random[16:].hex()


class Delivery(SQLModel, table=True):
    __tablename__ = "webhook_deliveries"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    job_id: uuid.UUID = Field(sa_column=Column(Uuid, ForeignKey("jobs.id"), nullable=False))
    event_type: str
    # `webhook-id`: the same on every attempt, so receivers can deduplicate.
    message_id: str
    url: str
    # host:port, the unit of the per-receiver concurrency limit.
    host: str
    # The event body as of the event; output URLs are presigned at each attempt (one with
    # at least half of S3_URL_TTL left).
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


DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]


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


class OutgoingDelivery(NamedTuple):
    """A delivery as the hot path keeps it, from its row's writing or leasing to its attempt's
    record: what the attempt needs of it, and its lease. A plain tuple where the ORM's
    `Delivery` (the operator's reads) costs a descriptor call for every field read and a
    pydantic model to build."""

    id: uuid.UUID
    job_id: uuid.UUID
    event_type: str
    # `webhook-id`: the same on every attempt, so receivers can deduplicate.
    message_id: str
    url: str
    host: str
    payload: dict[str, Any]
    attempts: int  # attempts since it became pending: the position in the retry schedule
    pending_since: datetime
    locked_until: datetime | None
    lease_token: uuid.UUID | None


def row_json(delivery: OutgoingDelivery) -> str:
    """The webhook_deliveries row of `delivery`, just written, as the named queries take it
    (JSON text, a column by name): written by the package's encoder; by the standard library,
    its UUIDs and timestamps as text, when that refuses (a payload's integer beyond 64 bits)."""
    row = dict(zip(OutgoingDelivery._fields, delivery, strict=True), status=DeliveryStatus.PENDING,
               next_attempt_at=delivery.pending_since, created_at=delivery.pending_since)
    try:
        return json_codec.dumps_text(row)
    except TypeError:
        return json.dumps(row, separators=(",", ":"), default=str)


@lru_cache(maxsize=1024)  # a delivery's at each job's end: most jobs call back the same few
def receiver_host(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{(parts.hostname or '').lower()}:{port}"


def subscribed(job: Job, event_type: str) -> bool:
    # The job's fields read from its `__dict__` (as jobs/render.py reads them), past the
    # ORM's descriptors.
    fields = job.__dict__
    if not fields["callback_url"]:
        return False
    return event_type in TERMINAL_EVENTS or event_type in (fields["webhook_events"] or ())


async def _no_url(_: str) -> None:
    return None


async def delivery_row(job: Job, event_type: str, slots: DeliverySlots | None = None,
                       changes: Mapping[str, Any] | None = None) -> OutgoingDelivery | None:
    """The outbox row reporting `event_type` for `job` as the change leaves it (`changes`,
    the values of the fields it writes, if not written yet), for the statement writing the
    change (as JSON: `row_json`); None when its client did not subscribe. Leased to the
    worker of `slots` when it has room (`DeliverySlots.lease`)."""
    if not subscribed(job, event_type):
        return None
    fields = job.__dict__  # (see `subscribed`)
    callback_url = fields["callback_url"]
    host = receiver_host(callback_url)
    locked_until, lease_token = slots.lease(host) if slots is not None else (None, None)
    now = utcnow()
    event = {"type": event_type, "timestamp": json_codec.datetime_text(now),
             "data": await job_json(job, _no_url, changes)}
    delivery_id, message_id = _new_ids()
    return OutgoingDelivery(delivery_id, fields["id"], event_type, message_id, callback_url,
                            host, event, 0, now, locked_until, lease_token)


class DeliverySlots:
    """This process's webhook sending slots (WEBHOOK_CONCURRENCY in all, at most `per_host`
    per receiver host), and the deliveries handed to its worker as they are written.

    A delivery the worker has room for is written already leased to it, by the statement
    that writes the job change it reports (`lease`), and handed over in memory once that
    statement has committed (`written`): no pass over the outbox claims it, and no NOTIFY
    wakes any worker for it (migration 0030). If this process dies first, the lease runs
    out and any process's pass takes the delivery up, as one whose attempt died. One there
    is no room for is written due and unleased, for the next pass of any worker (woken by
    NOTIFY), as before. The worker counts its own claims and attempts here too, so the
    limits hold for both."""

    def __init__(self, *, concurrency: int, per_host: int, lease: timedelta) -> None:
        self.concurrency = concurrency
        self.per_host = per_host
        self.lease_for = lease
        self.busy: Counter[str] = Counter()  # slots taken per receiver host
        self.taken = 0  # slots taken in all
        self._handed: asyncio.Queue[OutgoingDelivery] = asyncio.Queue()
        self._open = False  # whether a worker takes deliveries handed over
        # One token for every lease taken here as deliveries are written (a uuid4 each was
        # a sixth of `delivery_row`), as a pass has one for all it leases: a lease is told by
        # its delivery and token, and a delivery gets this token only as it is written, so
        # an attempt made under that lease never passes for one made under a later lease.
        self._lease_token = uuid.uuid4()

    def open(self) -> None:
        """A worker takes the deliveries handed over from now on."""
        self._open = True

    def take(self, host: str) -> None:
        self.taken += 1
        self.busy[host] += 1

    def free(self, host: str) -> None:
        self.taken -= 1
        self.busy[host] -= 1
        if self.busy[host] <= 0:
            del self.busy[host]

    def full(self, host: str) -> bool:
        # (`get`: Counter's own default is a Python call, __missing__.)
        return self.taken >= self.concurrency or self.busy.get(host, 0) >= self.per_host

    def lease(self, host: str) -> tuple[datetime | None, uuid.UUID | None]:
        """A lease (until when, its token) to this process's worker, a slot taken, for a
        delivery to `host` about to be written, when the worker takes deliveries and has
        room for it; else (None, None). A delivery leased is then `written` or
        `not_written`."""
        if not self._open or self.full(host):
            return None, None
        self.take(host)
        return utcnow() + self.lease_for, self._lease_token

    def written(self, delivery: OutgoingDelivery) -> None:
        """The leased `delivery` is committed (by the statement writing it, or by a pass of the
        worker leasing it): a sender of the worker sends it."""
        self._handed.put_nowait(delivery)

    def not_written(self, delivery: OutgoingDelivery) -> None:
        """The leased `delivery` was not written (the change's fence held nothing, or the
        statement failed): its slot is free again."""
        self.free(delivery.host)

    async def handed(self) -> OutgoingDelivery:
        """The next delivery handed over."""
        return await self._handed.get()

    def close(self) -> list[OutgoingDelivery]:
        """No more deliveries are leased here; those handed over and not taken yet, for the
        worker to give back (their slots freed). One whose statement is under way as this
        closes stays leased: it goes out when its lease runs out (the fleet, which writes
        them, closes first)."""
        self._open = False
        left = []
        while not self._handed.empty():
            delivery = self._handed.get_nowait()
            self.free(delivery.host)
            left.append(delivery)
        return left
