"""A webhook leased by the statement that writes it (jobs/deliveries.py `DeliverySlots`): the
process that ends a job and has room to send its webhook takes no claim over the outbox for
it, and wakes no worker; one without room writes it due, for any worker's pass, as before."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.db import driver_connection
from comfyfleet.jobs.deliveries import NOTIFY_CHANNEL, DeliverySlots
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.settings import Settings
from comfyfleet.webhooks.signing import new_secret
from comfyfleet.webhooks.worker import WebhookWorker
from tests.conftest import StartReceiver
from tests.webhook_support import Answer, gateway

RECEIVER = "http://127.0.0.1:9/hooks"  # never called: deliveries are only written
HOST = "127.0.0.1:9"

# Every change of a delivery row, with the transaction making it.
UPDATE_LOG = """
CREATE TABLE delivery_updates (id bigserial PRIMARY KEY, delivery_id uuid, xid xid8,
                               leased boolean, status text);
CREATE FUNCTION log_delivery_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO delivery_updates (delivery_id, xid, leased, status)
    VALUES (NEW.id, pg_current_xact_id(), NEW.lease_token IS NOT NULL, NEW.status);
    RETURN NEW;
END $$;
CREATE TRIGGER log_delivery_update AFTER UPDATE ON webhook_deliveries FOR EACH ROW
    EXECUTE FUNCTION log_delivery_update();
"""


async def lease_token(engine: AsyncEngine, job_id: uuid.UUID) -> uuid.UUID | None:
    async with driver_connection(engine) as connection:
        token: uuid.UUID | None = await connection.fetchval(
            "SELECT lease_token FROM webhook_deliveries WHERE job_id = $1", job_id)
    return token


@pytest.fixture
async def notices(engine: AsyncEngine) -> AsyncIterator[asyncio.Queue[str]]:
    heard: asyncio.Queue[str] = asyncio.Queue()

    def notified(*args: Any) -> None:
        heard.put_nowait(args[2])  # (connection, pid, channel, payload)

    async with driver_connection(engine) as listener:
        await listener.add_listener(NOTIFY_CHANNEL, notified)
        yield heard
        await listener.remove_listener(NOTIFY_CHANNEL, notified)


async def test_a_webhook_is_leased_to_the_worker_with_room_as_it_is_written(
    engine: AsyncEngine, notices: asyncio.Queue[str]
) -> None:
    slots = DeliverySlots(concurrency=1, per_host=1, lease=timedelta(seconds=60))
    slots.open()
    repository = JobRepository(engine, webhook_slots=slots)
    first, _ = await repository.insert(Job(workflow="invert", callback_url=RECEIVER))
    assert await repository.finish(first, JobStatus.CANCELLED, {JobStatus.QUEUED})
    handed = await asyncio.wait_for(slots.handed(), 5)
    assert handed.job_id == first.id
    assert handed.lease_token is not None
    assert await lease_token(engine, first.id) == handed.lease_token
    assert (slots.taken, slots.busy[HOST]) == (1, 1)
    # The worker's one slot is taken: the next is written due and unleased, and notified.
    second, _ = await repository.insert(Job(workflow="invert", callback_url=RECEIVER))
    assert await repository.finish(second, JobStatus.CANCELLED, {JobStatus.QUEUED})
    assert await lease_token(engine, second.id) is None
    async with asyncio.timeout(5):
        assert await notices.get() == NOTIFY_CHANNEL
    assert notices.empty()  # the first, leased, woke nobody
    assert slots.taken == 1
    # A change whose fence holds nothing writes no delivery and keeps no slot.
    slots.free(HOST)
    assert await repository.finish(first, JobStatus.CANCELLED, {JobStatus.QUEUED}) is None
    assert slots.taken == 0 and not slots.busy
    # A worker that stopped takes nothing handed over: written due, for any process.
    assert slots.close() == []
    third, _ = await repository.insert(Job(workflow="invert", callback_url=RECEIVER))
    assert await repository.finish(third, JobStatus.CANCELLED, {JobStatus.QUEUED})
    assert await lease_token(engine, third.id) is None


async def test_a_webhook_sent_by_the_process_ending_the_job_is_never_claimed(
    settings: Settings, receivers: StartReceiver, engine: AsyncEngine
) -> None:
    """Its row is written leased and changed once: when its attempt is recorded (with the
    others made meanwhile, by one statement)."""
    async with driver_connection(engine) as connection:
        await connection.execute(UPDATE_LOG)
    receiver = await receivers()
    async with gateway(settings) as gw:
        job_ids = [await gw.finished_job(receiver.url) for _ in range(5)]
        await receiver.wait_for(5)
        for job_id in job_ids:
            await gw.wait_for(job_id, "delivered")
    async with driver_connection(engine) as connection:
        updates = await connection.fetch(
            "SELECT u.xid, u.leased, u.status FROM delivery_updates AS u"
            " JOIN webhook_deliveries AS d ON d.id = u.delivery_id ORDER BY u.id")
    assert [(row["leased"], row["status"]) for row in updates] == [(False, "delivered")] * 5
    assert len({row["xid"] for row in updates}) < 5


async def no_url(_: str) -> None:
    return None


async def test_a_closing_worker_finishes_and_records_the_attempts_under_way(
    settings: Settings, receivers: StartReceiver, engine: AsyncEngine
) -> None:
    """Its senders (a task per slot) stop as it closes: those waiting at once, those sending
    once their attempt is made, which is recorded before `close` returns (well within the
    time it allows them)."""
    receiver = await receivers(Answer(204, delay=0.5))
    slots = WebhookWorker.slots(settings)
    worker = WebhookWorker.from_settings(settings, engine, new_secret(), no_url, slots)
    repository = JobRepository(engine, webhook_slots=slots)
    worker.start()
    for _ in range(3):
        job, _ = await repository.insert(Job(workflow="invert", callback_url=receiver.url))
        assert await repository.finish(job, JobStatus.CANCELLED, {JobStatus.QUEUED})
    await receiver.wait_for(3)
    async with asyncio.timeout(settings.webhook_timeout):
        await worker.close()
    assert [task for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "").startswith("WebhookWorker.")] == []
    assert (slots.taken, slots.busy) == (0, {})
    async with driver_connection(engine) as connection:
        rows = await connection.fetch("SELECT status, attempts, lease_token FROM"
                                      " webhook_deliveries")
    assert [tuple(row) for row in rows] == [("delivered", 1, None)] * 3
