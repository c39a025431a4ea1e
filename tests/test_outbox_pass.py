"""The webhook worker's pass over the outbox (sql/outbox.sql `pass`): the attempts made are
recorded, the due deliveries leased and the next due one found, by one statement, which sees
the rows as they were before it and must still answer as if it ran after its own changes."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.jobs.deliveries import Delivery, DeliveryStatus, OutgoingDelivery
from comfyfleet.jobs.models import Job, JobStatus, utcnow
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.webhooks.outbox import Attempt, Outbox, Outcome, Settled

LEASE = timedelta(seconds=60)
ONE = "http://127.0.0.1:9/hooks"  # never called: deliveries are only leased and recorded
OTHER = "http://127.0.0.1:10/hooks"


async def ended_jobs(engine: AsyncEngine, *callbacks: str) -> None:
    repository = JobRepository(engine)
    for callback in callbacks:
        job, _ = await repository.insert(Job(workflow="invert", callback_url=callback))
        assert await repository.finish(job, JobStatus.CANCELLED, {JobStatus.QUEUED})


async def stored(outbox: Outbox, delivery_id: uuid.UUID) -> Delivery:
    found = await outbox.get(delivery_id)
    assert found is not None
    return found[0]


def attempted(delivery: OutgoingDelivery, outcome: Outcome, status_code: int = 204) -> Settled:
    return Settled(delivery, Attempt(delivery.id, delivery.lease_token, utcnow(), status_code,
                                     1, None, "", *outcome))


async def test_a_pass_records_leases_and_times_the_next_as_after_its_own_changes(
    engine: AsyncEngine,
) -> None:
    outbox = Outbox(engine)
    await ended_jobs(engine, ONE, ONE)
    first, second = await outbox.claim(limit=2, per_host=10, busy={}, lease=LEASE)
    await ended_jobs(engine, ONE)
    retry_at = utcnow() + timedelta(seconds=30)
    done = await outbox.settle(
        [attempted(first, Outcome(DeliveryStatus.DELIVERED)),
         attempted(second, Outcome(DeliveryStatus.PENDING, retry_at), 500)],
        limit=10, per_host=10, busy={}, lease=LEASE)
    assert done.kept == {first.id, second.id}
    (third,) = done.leased
    assert third.id not in (first.id, second.id) and third.lease_token is not None
    # The retry, as recorded by this very statement: not the lease it held before it, and
    # not the third delivery, due before it but leased by this statement.
    assert done.next_due == retry_at
    delivered, retried = [await stored(outbox, d.id) for d in (first, second)]
    assert (delivered.status, delivered.attempts, delivered.lease_token) == (
        DeliveryStatus.DELIVERED, 1, None)
    assert (retried.status, retried.next_attempt_at, retried.last_status_code) == (
        DeliveryStatus.PENDING, retry_at, 500)


async def test_a_pass_times_the_next_without_the_hosts_it_fills(engine: AsyncEngine) -> None:
    outbox = Outbox(engine)
    await ended_jobs(engine, ONE, ONE, OTHER)
    # One at a time per host: the pass leases one of each, and ONE's second, due now, waits
    # for room (a slot freed wakes the worker), so it is no reason to look again soon.
    done = await outbox.settle([], limit=10, per_host=1, busy={}, lease=LEASE)
    assert sorted(d.host for d in done.leased) == ["127.0.0.1:10", "127.0.0.1:9"]
    assert done.next_due is None
    # The same with ONE full already: its host is skipped, OTHER's second is leased.
    await ended_jobs(engine, OTHER)
    done = await outbox.settle([], limit=10, per_host=1, busy={"127.0.0.1:10": 0,
                                                               "127.0.0.1:9": 1}, lease=LEASE)
    assert [d.host for d in done.leased] == ["127.0.0.1:10"]
    assert done.next_due is None


async def test_an_attempt_whose_lease_was_lost_is_logged_and_changes_nothing(
    engine: AsyncEngine,
) -> None:
    outbox = Outbox(engine)
    await ended_jobs(engine, ONE)
    (leased,) = await outbox.claim(limit=1, per_host=10, busy={}, lease=LEASE)
    stale = leased._replace(lease_token=uuid.uuid4())
    done = await outbox.settle([attempted(stale, Outcome(DeliveryStatus.DELIVERED))],
                               limit=10, per_host=10, busy={}, lease=LEASE)
    assert done.kept == frozenset() and done.leased == []
    delivery = await stored(outbox, leased.id)
    (_, attempts), = await outbox.for_job(leased.job_id)
    assert (delivery.status, delivery.lease_token) == (DeliveryStatus.PENDING,
                                                       leased.lease_token)
    assert [attempt.status_code for attempt in attempts] == [204]


async def test_leases_given_back_make_their_deliveries_due_at_once_unless_lost_meanwhile(
    engine: AsyncEngine,
) -> None:
    """What a stopping worker does with the attempts it cut short (`Outbox.release`)."""
    outbox = Outbox(engine)
    await ended_jobs(engine, ONE, ONE)
    mine, lost = await outbox.claim(limit=2, per_host=10, busy={}, lease=LEASE)
    stale = lost._replace(lease_token=uuid.uuid4())  # leased anew elsewhere
    await outbox.release([mine, stale])
    assert [(d.locked_until, d.lease_token) for d in
            [await stored(outbox, mine.id), await stored(outbox, lost.id)]] == [
        (None, None), (lost.locked_until, lost.lease_token)]
    (again,) = await outbox.claim(limit=2, per_host=10, busy={}, lease=LEASE)
    assert again.id == mine.id
