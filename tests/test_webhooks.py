"""Webhook delivery (DESIGN §5) against real receivers on loopback: retries, time limits, 410,
Retry-After, receivers that are down or slow, the log and replay API, and a SIGKILLed gateway.

Jobs reach their terminal state through the API (submit, then cancel: no backend needed), so
each delivery goes the whole way: fenced transition + outbox row, NOTIFY, worker, receiver.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from comfyfleet import json_codec
from comfyfleet.db import driver_connection, embedded_url
from comfyfleet.jobs.deliveries import NOTIFY_CHANNEL, DeliveryStatus
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from comfyfleet.webhooks.delivery import AttemptResult
from comfyfleet.webhooks.outbox import Outbox
from comfyfleet.webhooks.schedule import RetrySchedule
from comfyfleet.webhooks.signing import new_secret, signed_headers
from tests import test_database_outage
from tests.conftest import S3_CREDENTIALS, StartReceiver
from tests.support import LOOPBACK, free_ports, python_process, scrape, serve_env, value
from tests.test_database_outage import stop_immediately
from tests.webhook_support import Answer, Gateway, gateway, verified

TERMINAL = ("delivered", "failed", "dead")
own_postgres = test_database_outage.own_postgres  # (its fixture: a PostgreSQL to stop)


@pytest.fixture
def fast_retries(settings: Settings) -> Settings:
    settings.webhook_retry_delays = [0.2]
    return settings


async def test_500_then_200_is_retried_signed_and_logged_under_one_webhook_id(
    fast_retries: Settings, receivers: StartReceiver
) -> None:
    big_error_page = b"<html>" + b"x" * 100_000
    receiver = await receivers(Answer(500, body=big_error_page), Answer(204))
    async with gateway(fast_retries) as gw:
        job_id = await gw.finished_job(receiver.url)
        delivery = await gw.wait_for(job_id, "delivered", attempts=2)
    events = verified(fast_retries, receiver)
    assert len(events) == 2
    assert receiver.webhook_ids == [delivery["webhook_id"]] * 2
    assert receiver.arrivals[1].at - receiver.arrivals[0].at >= 0.2 * 0.8  # schedule - jitter
    for event, arrival in zip(events, receiver.arrivals, strict=True):
        assert event["type"] == "job.cancelled"
        assert event["data"]["id"] == job_id
        assert event["data"]["status"] == "cancelled"
        assert abs(int(arrival.headers["webhook-timestamp"]) - time.time()) < 30
        assert arrival.headers["webhook-signature"].startswith("v1,")
    assert events[0] == events[1]  # the event is rendered once, when it happens
    failed, ok = delivery["attempts"]
    assert (failed["status_code"], failed["error"]) == (500, "HTTP 500")
    assert failed["response_snippet"] == (big_error_page[:1024]).decode()  # capped read
    assert (ok["status_code"], ok["error"]) == (204, None)
    assert all(attempt["latency_ms"] >= 0 for attempt in delivery["attempts"])
    assert delivery["event_type"] == "job.cancelled"
    assert delivery["next_attempt_at"] is None


async def test_an_answer_with_a_nul_character_is_recorded_with_the_rest(
    fast_retries: Settings, receivers: StartReceiver
) -> None:
    """PostgreSQL's text holds no NUL: the snippet has U+FFFD in its place, as for the bytes
    that are not UTF-8. (Kept as it was, it failed the pass recording it, and with it every
    pass after, which record every attempt and lease every delivery: the worker stood still.)"""
    receiver = await receivers(Answer(500, body=b"a\x00b\xff"), Answer(204))
    async with gateway(fast_retries) as gw:
        job_id = await gw.finished_job(receiver.url)
        delivery = await gw.wait_for(job_id, "delivered", attempts=2)
    failed, _ = delivery["attempts"]
    assert (failed["status_code"], failed["response_snippet"]) == (500, "a\ufffdb\ufffd")


class Dropped(logging.Handler):
    """Set when the worker logs that it dropped an attempt."""

    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        if "dropped" in record.getMessage():
            self.message = record.getMessage()
            self.event.set()

    async def wait(self) -> None:
        await self.event.wait()


@pytest.fixture
def dropped() -> Iterator[Dropped]:
    handler = Dropped()
    logger = logging.getLogger("comfyfleet.webhooks.worker")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def test_an_attempt_the_database_refuses_stops_no_other_webhook(
    fast_retries: Settings, receivers: StartReceiver, engine: AsyncEngine, dropped: Dropped,
) -> None:
    """A delivery deleted while its attempt is under way (an operator's clean-up): the
    attempt's record breaks its foreign key, and every pass recording it with the others
    failed. The others are recorded one by one; that one is dropped after a few tries."""
    slow = await receivers(Answer(204, delay=0.5))
    prompt = await receivers(Answer(204))
    async with gateway(fast_retries) as gw:
        unrecorded = "comfyfleet_webhook_attempts_unrecorded_total"
        base = gw.api.removesuffix(fast_retries.route_prefix)  # where /metrics is
        before = value(await scrape(gw.http, base), unrecorded)
        doomed = await gw.finished_job(slow.url)
        await slow.wait_for(1)
        async with driver_connection(engine) as connection:
            deleted = await connection.fetchval(
                "DELETE FROM webhook_deliveries WHERE job_id = $1 RETURNING id",
                uuid.UUID(doomed))
        await asyncio.sleep(0.5)  # its attempt made, waiting to be recorded
        delivered = await gw.wait_for(await gw.finished_job(prompt.url), "delivered",
                                      seconds=10)
        async with asyncio.timeout(10):
            await dropped.wait()
        assert str(deleted) in dropped.message
        assert value(await scrape(gw.http, base), unrecorded) == before + 1
        assert await gw.deliveries(doomed) == []
        after = await gw.wait_for(await gw.finished_job(prompt.url), "delivered", seconds=10)
    assert delivered["attempts"][0]["status_code"] == after["attempts"][0]["status_code"] == 204


async def test_an_attempt_made_while_the_database_is_away_is_recorded_once_it_is_back(
    own_postgres: Any, fast_retries: Settings, receivers: StartReceiver,
) -> None:
    """An outage is not an attempt the database refuses: however many passes fail meanwhile,
    the attempt is kept, not dropped (and sent again) after a few."""
    fast_retries.database_url = embedded_url(own_postgres)
    receiver = await receivers(Answer(204, delay=1.0))
    async with gateway(fast_retries) as gw:
        job_id = await gw.finished_job(receiver.url)
        await receiver.wait_for(1)
        await stop_immediately(own_postgres)
        await asyncio.sleep(1.0 + 3 * 5.0)  # the attempt made; passes fail (5 s apart)
        await asyncio.to_thread(own_postgres.ensure_postgres_running)
        delivery = await gw.wait_for(job_id, "delivered", seconds=30)
    assert len(delivery["attempts"]) == len(receiver.arrivals) == 1


def test_webhook_concurrency_is_bounded(settings: Settings) -> None:
    """Each slot is a sender task for the worker's life and a connection."""
    for name in ("webhook_concurrency", "webhook_concurrency_per_host"):
        with pytest.raises(ValidationError, match="less than or equal to 1000"):
            Settings.model_validate({**settings.model_dump(), name: 1001})
        assert getattr(Settings.model_validate({**settings.model_dump(), name: 1000}),
                       name) == 1000


def test_webhook_max_age_is_at_most_a_year(settings: Settings) -> None:
    """Far past it, the time a delivery is given overflows Python's dates at its first
    failure."""
    year = 366 * 24 * 3600
    with pytest.raises(ValidationError, match="less than or equal to 31622400"):
        Settings.model_validate({**settings.model_dump(), "webhook_max_age": year + 1})
    assert Settings.model_validate(
        {**settings.model_dump(), "webhook_max_age": year}).webhook_max_age == year


async def test_signed_with_the_first_of_several_secrets(
    settings: Settings, receivers: StartReceiver
) -> None:
    new, old = new_secret(), new_secret()
    settings.webhook_secret = f"{new}, {old}"
    receiver = await receivers()
    async with gateway(settings) as gw:
        await gw.finished_job(receiver.url)
        await receiver.wait_for(1)
    arrival = receiver.arrivals[0]
    assert Webhook(new).verify(arrival.body, arrival.headers)["type"] == "job.cancelled"
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(arrival.body, arrival.headers)


def test_a_body_signed_as_its_bytes_is_what_standard_webhooks_signs_and_verifies() -> None:
    """The signature is made over the body's bytes as they are sent (`signed_headers`): the
    one the package's own `sign` makes of its text, which its `verify` accepts, whatever the
    text holds (non-ASCII, escapes) and whatever the secret's padding."""
    body = json_codec.dumps({"type": "job.succeeded", "data": {
        "params": {"prompt": "café 🚀 \u2028 \"quoted\" \\"}, "outputs": []}})
    for secret in (new_secret(), new_secret().rstrip("=")):
        headers = signed_headers(secret, "msg_1", body)
        timestamp = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)
        assert headers["webhook-signature"] == Webhook(secret).sign(
            "msg_1", timestamp, body.decode())
        assert Webhook(secret).verify(body, headers) == json_codec.loads(body)
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(body + b" ", headers)


async def test_an_attempt_that_times_out_is_a_failure(
    fast_retries: Settings, receivers: StartReceiver
) -> None:
    fast_retries.webhook_timeout = 0.5
    receiver = await receivers(Answer(200, delay=3), Answer(200))
    async with gateway(fast_retries) as gw:
        job_id = await gw.finished_job(receiver.url)
        delivery = await gw.wait_for(job_id, "delivered", attempts=2)
    timed_out, ok = delivery["attempts"]
    assert timed_out["status_code"] is None
    assert timed_out["error"] == "timed out after 0.5 s"
    assert 450 <= timed_out["latency_ms"] < 2500
    assert ok["status_code"] == 200
    assert len(set(receiver.webhook_ids)) == 1


async def test_410_stops_retries(fast_retries: Settings, receivers: StartReceiver) -> None:
    receiver = await receivers(Answer(410))
    async with gateway(fast_retries) as gw:
        job_id = await gw.finished_job(receiver.url)
        delivery = await gw.wait_for(job_id, "failed")
        await asyncio.sleep(1.0)  # five retry delays: none may come
        assert await gw.delivery(job_id) == delivery
    assert len(receiver.arrivals) == 1
    assert delivery["attempts"][0]["status_code"] == 410
    assert delivery["next_attempt_at"] is None


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(
    settings: Settings, receivers: StartReceiver, status: int
) -> None:
    settings.webhook_retry_delays = [0.05]
    receiver = await receivers(Answer(status, headers={"Retry-After": "1"}), Answer(200))
    async with gateway(settings) as gw:
        job_id = await gw.finished_job(receiver.url)
        delivery = await gw.wait_for(job_id, "delivered", attempts=2)
    assert receiver.arrivals[1].at - receiver.arrivals[0].at >= 1.0  # not the 0.05 s schedule
    assert [a["status_code"] for a in delivery["attempts"]] == [status, 200]


async def test_retry_after_as_an_http_date_is_honoured(
    settings: Settings, receivers: StartReceiver
) -> None:
    settings.webhook_retry_delays = [0.05]
    async with gateway(settings) as gw:
        # A whole second, as HTTP dates go: 3-4 s after now, once the gateway is up (its
        # start takes seconds on a loaded machine).
        retry_at = datetime.fromtimestamp(int(time.time()) + 4, UTC)
        receiver = await receivers(
            Answer(503, headers={"Retry-After": format_datetime(retry_at, usegmt=True)}),
            Answer(200))
        job_id = await gw.finished_job(receiver.url)
        waiting = await gw.wait_for(job_id, "pending", attempts=1)
        delivery = await gw.wait_for(job_id, "delivered", attempts=2)
    assert waiting["next_attempt_at"] is not None
    assert abs(datetime.fromisoformat(waiting["next_attempt_at"]) - retry_at) < timedelta(
        seconds=0.5)
    wall = time.time() - time.monotonic()  # turns an arrival's monotonic time into epoch
    first, second = (wall + arrival.at for arrival in receiver.arrivals[:2])
    assert first < retry_at.timestamp() - 1  # else the date would say nothing
    assert second >= retry_at.timestamp() - 0.1  # the date, not the 0.05 s schedule
    assert [a["status_code"] for a in delivery["attempts"]] == [503, 200]


async def test_retry_after_is_never_sooner_than_the_first_delay(
    settings: Settings, receivers: StartReceiver
) -> None:
    """A receiver answering "Retry-After: 0" gets the schedule's first delay, even where
    the schedule itself would be quicker: no busy loop."""
    settings.webhook_retry_delays = [1.0, 0.05]
    receiver = await receivers(*[Answer(429, headers={"Retry-After": "0"})] * 2, Answer(200))
    async with gateway(settings) as gw:
        job_id = await gw.finished_job(receiver.url)
        delivery = await gw.wait_for(job_id, "delivered", attempts=3)
    first, second, third = (arrival.at for arrival in receiver.arrivals)
    assert second - first >= 1.0 and third - second >= 1.0
    assert [a["status_code"] for a in delivery["attempts"]] == [429, 429, 200]


# (The second: past the last date Python has. It failed the attempt's outcome, so its record:
# the delivery was sent again at each lease's end, forever.)
@pytest.mark.parametrize("retry_after", ["3600", "99999999999999"])
async def test_a_retry_after_beyond_the_max_age_makes_the_delivery_dead(
    settings: Settings, receivers: StartReceiver, retry_after: str
) -> None:
    settings.webhook_max_age = 60
    receiver = await receivers(Answer(503, headers={"Retry-After": retry_after}))
    async with gateway(settings) as gw:
        job_id = await gw.finished_job(receiver.url)
        delivery = await gw.wait_for(job_id, "dead", attempts=1)
    assert delivery["next_attempt_at"] is None
    assert [a["status_code"] for a in delivery["attempts"]] == [503]
    assert len(receiver.arrivals) == 1


async def test_the_default_first_retry_is_about_5_s(
    settings: Settings, receivers: StartReceiver
) -> None:
    settings.webhook_retry_delays = default_setting("webhook_retry_delays")
    receiver = await receivers(Answer(500))
    async with gateway(settings) as gw:
        job_id = await gw.finished_job(receiver.url)
        delivery = await gw.wait_for(job_id, "pending", attempts=1)
    (attempt,) = delivery["attempts"]
    delay = (datetime.fromisoformat(delivery["next_attempt_at"])
             - datetime.fromisoformat(attempt["attempted_at"])).total_seconds()
    assert 5 * 0.8 <= delay <= 5 * 1.2 + 1  # the second is for the attempt itself


def default_setting(name: str) -> Any:
    """A setting's default, whatever the environment of the test run says."""
    return Settings.model_fields[name].get_default(call_default_factory=True)


def test_the_default_schedule_jitter_and_max_age() -> None:
    """About 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, then hourly, each ±20 %, until 24 h."""
    schedule = RetrySchedule(
        delays=tuple(default_setting("webhook_retry_delays")),
        max_age=timedelta(seconds=default_setting("webhook_max_age")))
    steps = [5, 30, 120, 600, 1800, 3600, 3600, 3600]
    for attempts, step in enumerate(steps, start=1):
        drawn = [schedule.delay(attempts) for _ in range(2000)]
        assert all(step * 0.8 <= delay <= step * 1.2 for delay in drawn), attempts
        # Spread over the whole band, not fixed: failures together do not retry together.
        assert min(drawn) < step * 0.85 and max(drawn) > step * 1.15, attempts

    failing = AttemptResult(500, latency_ms=1, error="HTTP 500")
    since = now = datetime(2025, 1, 1, tzinfo=UTC)
    attempts = 0
    while True:
        attempts += 1
        outcome = schedule.after(failing, attempts=attempts, pending_since=since, now=now)
        if outcome.status != DeliveryStatus.PENDING:
            break
        assert outcome.next_attempt_at is not None
        now = outcome.next_attempt_at
    assert outcome.status == DeliveryStatus.DEAD
    assert now - since <= timedelta(hours=24)  # the last attempt within the max age
    # 6 steps in the first ~1.7 h, then one an hour (±20 %) for the rest of the day.
    assert 24 <= attempts <= 32


async def test_a_receiver_that_is_down_gets_the_webhook_when_it_comes_back(
    fast_retries: Settings, receivers: StartReceiver
) -> None:
    port = free_ports(1)
    async with gateway(fast_retries) as gw:
        job_id = await gw.finished_job(f"http://{LOOPBACK}:{port}/hooks")
        down = await gw.wait_for(job_id, "pending", attempts=2)
        receiver = await receivers(port=port)
        delivery = await gw.wait_for(job_id, "delivered", attempts=3)
    assert all("Connect" in attempt["error"] for attempt in down["attempts"])
    assert receiver.webhook_ids == [delivery["webhook_id"]]
    assert len(verified(fast_retries, receiver)) == 1


async def test_a_slow_receiver_does_not_delay_the_others(
    settings: Settings, receivers: StartReceiver
) -> None:
    settings.webhook_concurrency = 10
    settings.webhook_concurrency_per_host = 2
    slow = await receivers(Answer(200, delay=4))
    fast = await receivers(Answer(200))
    async with gateway(settings) as gw:
        for _ in range(5):
            await gw.finished_job(slow.url)
        await slow.wait_for(2)
        started = time.monotonic()
        for _ in range(3):
            await gw.finished_job(fast.url)
        await fast.wait_for(3, seconds=2)
        fast_seconds = time.monotonic() - started
        assert len(slow.arrivals) == 2  # its other three wait for its own slots only
    assert fast_seconds < 2  # submit + cancel + deliver three, while the slow one sleeps 4 s
    assert slow.max_active == 2


async def test_retried_until_max_age_then_dead(
    settings: Settings, receivers: StartReceiver
) -> None:
    settings.webhook_retry_delays = [0.1, 0.3]
    settings.webhook_max_age = 1
    receiver = await receivers(Answer(500))
    async with gateway(settings) as gw:
        job_id = await gw.finished_job(receiver.url)
        delivery = await gw.wait_for(job_id, "dead", seconds=10)
        await asyncio.sleep(0.5)
        assert len(receiver.arrivals) == len(delivery["attempts"])
    assert 3 <= len(delivery["attempts"]) <= 6  # 0.1 s, then every 0.3 s, within 1 s
    # None is scheduled past the 1 s age (the slack is for a busy test machine).
    assert receiver.arrivals[-1].at - receiver.arrivals[0].at <= 1.3


async def test_an_event_whose_body_cannot_be_made_is_retried_on_schedule_then_dead(
    settings: Settings, receivers: StartReceiver, engine: AsyncEngine
) -> None:
    """An outbox row this version cannot turn into a body (written by another version, or
    edited by hand): each attempt is recorded as a failure of ours, so the delivery follows
    its schedule to dead instead of coming due again at every lease's end, unrecorded."""
    settings.webhook_retry_delays = [0.1, 0.3]
    settings.webhook_max_age = 1
    async with driver_connection(engine) as connection:
        # The row as written; the first attempt goes out from the delivery in memory.
        await connection.execute("""
            CREATE FUNCTION spoil_outputs() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                NEW.payload = jsonb_set(NEW.payload, '{data,outputs}', '5');
                RETURN NEW;
            END $$;
            CREATE TRIGGER spoil_outputs BEFORE INSERT ON webhook_deliveries
                FOR EACH ROW EXECUTE FUNCTION spoil_outputs();
        """)
    receiver = await receivers(Answer(500))
    async with gateway(settings) as gw:
        job_id = await gw.finished_job(receiver.url)
        delivery = await gw.wait_for(job_id, "dead", seconds=10)
    first, *ours = delivery["attempts"]
    assert first["status_code"] == 500 and len(receiver.arrivals) == 1
    assert ours and all(attempt["status_code"] is None for attempt in ours)
    assert all(attempt["error"].startswith("not sent: TypeError") for attempt in ours)


async def test_redeliver_sends_again_with_the_same_webhook_id(
    settings: Settings, receivers: StartReceiver
) -> None:
    receiver = await receivers()
    async with gateway(settings) as gw:
        job_id = await gw.finished_job(receiver.url)
        first = await gw.wait_for(job_id, "delivered")
        async with gw.http.post(f"{gw.api}/deliveries/{first['id']}/redeliver") as response:
            assert response.status == 202
            assert (await response.json())["status"] == "pending"
        again = await gw.wait_for(job_id, "delivered", attempts=2)
        async with gw.http.post(f"{gw.api}/deliveries/{uuid.uuid4()}/redeliver") as response:
            assert response.status == 404
            assert (await response.json())["error"]["type"] == "delivery_not_found"
        async with gw.http.get(f"{gw.api}/jobs/{uuid.uuid4()}/deliveries") as response:
            assert response.status == 404
            assert (await response.json())["error"]["type"] == "job_not_found"
    assert receiver.webhook_ids == [first["webhook_id"]] * 2
    assert again["id"] == first["id"]
    assert [a["status_code"] for a in again["attempts"]] == [200, 200]


async def test_started_and_progress_webhooks_only_when_asked_for(
    settings: Settings, receivers: StartReceiver, engine: AsyncEngine
) -> None:
    receiver = await receivers()
    repository, outbox = JobRepository(engine), Outbox(engine)

    async def queued(**fields: Any) -> Job:
        job, _ = await repository.insert(Job(workflow="invert", **fields))
        return job

    asked = await queued(callback_url=receiver.url, webhook_events=["job.started"])
    for event in ("job.started", "job.progress"):
        assert await repository.transition(asked, {JobStatus.QUEUED}, event=event,
                                           progress=0.0)
    plain = await queued(callback_url=receiver.url)
    assert await repository.transition(plain, {JobStatus.QUEUED}, event="job.started",
                                       progress=0.0)
    # A stale actor's terminal transition (fence fails): no webhook either.
    assert await repository.finish(plain, JobStatus.SUCCEEDED, {JobStatus.RUNNING}) is None
    silent = await queued()
    assert await repository.finish(silent, JobStatus.CANCELLED, {JobStatus.QUEUED})

    assert [d.event_type for d, _ in await outbox.for_job(asked.id)] == ["job.started"]
    assert await outbox.for_job(plain.id) == []
    assert await outbox.for_job(silent.id) == []


async def test_each_outbox_row_wakes_the_workers_as_it_commits(engine: AsyncEngine) -> None:
    """The statement writing a job's end (at its finish, or as it is stored) notifies the
    workers' channel too, so a delivery never waits for a worker's safety pass."""
    repository = JobRepository(engine)
    heard: asyncio.Queue[str] = asyncio.Queue()

    def notified(*args: Any) -> None:
        heard.put_nowait(args[2])  # (connection, pid, channel, payload)

    async with driver_connection(engine) as listener:
        await listener.add_listener(NOTIFY_CHANNEL, notified)
        job, _ = await repository.insert(Job(workflow="invert", callback_url="http://127.0.0.1:9/"))
        assert await repository.finish(job, JobStatus.CANCELLED, {JobStatus.QUEUED})
        async with asyncio.timeout(5):
            assert await heard.get() == NOTIFY_CHANNEL
        await repository.insert(Job(workflow="invert", callback_url="http://127.0.0.1:9/",
                                    status=JobStatus.SUCCEEDED))
        async with asyncio.timeout(5):
            assert await heard.get() == NOTIFY_CHANNEL
        await listener.remove_listener(NOTIFY_CHANNEL, notified)
    assert heard.empty()  # the insert of the queued job woke nobody


async def test_started_and_progress_webhooks_from_a_running_job(
    settings: Settings, receivers: StartReceiver
) -> None:
    receiver = await receivers()
    async with SimulatedComfyUI(name="gpu", duration=1.5) as sim:
        settings.comfyui_endpoints = [f"{sim.url}#gpu"]
        async with gateway(settings) as gw:
            jobs = []
            for extra in ({"webhook_events": ["job.started", "job.progress"]}, {}):
                body = {"workflow": "invert", "callback_url": receiver.url, **extra}
                async with gw.http.post(f"{gw.api}/jobs", json=body) as response:
                    assert response.status == 202
                    jobs.append((await response.json())["id"])
            for job_id in jobs:
                async with asyncio.timeout(20):
                    while True:
                        deliveries = await gw.deliveries(job_id)
                        if deliveries and deliveries[-1]["event_type"] == "job.succeeded" and all(
                            d["status"] == "delivered" for d in deliveries
                        ):
                            break
                        await asyncio.sleep(0.05)
    events = sorted(verified(settings, receiver), key=lambda event: event["timestamp"])
    asked, plain = ([e["type"] for e in events if e["data"]["id"] == job_id] for job_id in jobs)
    assert asked[0] == "job.started" and asked[-1] == "job.succeeded"
    assert set(asked[1:-1]) <= {"job.progress"}
    assert plain == ["job.succeeded"]


async def test_webhook_events_are_validated_at_submit(settings: Settings) -> None:
    async with gateway(settings) as gw:
        body = {"workflow": "invert", "callback_url": "http://127.0.0.1:9/hooks",
                "webhook_events": ["job.started", "job.exploded"]}
        async with gw.http.post(f"{gw.api}/jobs", json=body) as response:
            assert response.status == 422
            assert (await response.json())["error"]["type"] == "invalid_request"


async def test_output_urls_are_presigned_at_each_attempt(
    settings: Settings, receivers: StartReceiver, s3_endpoint: str, s3_bucket: str,
    engine: AsyncEngine,
) -> None:
    """Not the URL of the event's time: one with at least half of S3_URL_TTL left when the
    attempt is made (a URL is handed out again until then)."""
    settings.storage = "s3"
    settings.s3_bucket, settings.s3_endpoint_url = s3_bucket, s3_endpoint
    settings.aws_access_key_id = S3_CREDENTIALS["aws_access_key_id"]
    settings.aws_secret_access_key = S3_CREDENTIALS["aws_secret_access_key"]
    settings.s3_url_ttl = 2  # the retry comes after half of it
    settings.webhook_retry_delays = [1.2]  # presigned URLs carry the second they were signed
    receiver = await receivers(Answer(500), Answer(200))
    async with gateway(settings) as gw:
        repository = JobRepository(engine)
        job, _ = await repository.insert(Job(workflow="invert", callback_url=receiver.url))
        output = {"node_id": "3", "filename": "a.png", "content_type": "image/png",
                  "size": 1, "key": f"{job.id}/3_0.png"}
        await repository.finish(job, JobStatus.SUCCEEDED, {JobStatus.QUEUED},
                                outputs=[output])
        await gw.wait_for(str(job.id), "delivered", attempts=2)
    urls = [event["data"]["outputs"][0]["url"] for event in verified(settings, receiver)]
    assert all(urlsplit(url).path.endswith(f"/{job.id}/3_0.png") for url in urls)
    assert signed_when(urls[0]) < signed_when(urls[1])


def signed_when(url: str) -> str:
    """When a presigned URL was signed, as comparable text: SigV4 URLs say it (X-Amz-Date),
    SigV2 ones give their expiry, which is the signing time plus the TTL."""
    query = parse_qs(urlsplit(url).query)
    return (query.get("X-Amz-Date") or query["Expires"])[0]


async def test_a_delivery_whose_process_died_mid_attempt_is_taken_up_after_its_lease(
    settings: Settings, receivers: StartReceiver, engine: AsyncEngine
) -> None:
    receiver = await receivers()
    repository = JobRepository(engine)
    job, _ = await repository.insert(Job(workflow="invert", callback_url=receiver.url))
    await repository.finish(job, JobStatus.CANCELLED, {JobStatus.QUEUED})
    # Another process claims it and dies before it records anything.
    (claimed,) = await Outbox(engine).claim(
        limit=10, per_host=10, busy={}, lease=timedelta(seconds=1.5)
    )
    assert claimed.locked_until is not None
    async with gateway(settings) as gw:
        delivery = await gw.wait_for(str(job.id), "delivered")
    assert receiver.webhook_ids == [delivery["webhook_id"]]
    attempted_at = datetime.fromisoformat(delivery["attempts"][0]["attempted_at"])
    # Not before the lease ran out, and promptly then (not at some later periodic pass).
    assert timedelta(0) <= attempted_at - claimed.locked_until < timedelta(seconds=1)


async def test_deliveries_pending_when_the_gateway_is_killed_go_out_after_restart(
    settings: Settings, receivers: StartReceiver, data_root: Path
) -> None:
    port = free_ports(2)  # two ports at once: two single picks may be one port
    receiver_port = port + 1
    env = serve_env(settings, data_root, port, WEBHOOK_RETRY_DELAYS="0.5", COMFYUI_ENDPOINTS="")
    base = f"http://{LOOPBACK}:{port}"
    callback = f"http://{LOOPBACK}:{receiver_port}/hooks"  # nothing listens there yet
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gw = Gateway(http, base + settings.route_prefix)
        first = await stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz")
        )
        job_ids = [await gw.finished_job(callback) for _ in range(2)]
        before = [await gw.wait_for(job_id, "pending", attempts=1) for job_id in job_ids]
        first.send_signal(signal.SIGKILL)
        await first.wait()
        receiver = await receivers(port=receiver_port)
        await stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz")
        )
        after = [await gw.wait_for(job_id, "delivered") for job_id in job_ids]
    assert sorted(receiver.webhook_ids) == sorted(d["webhook_id"] for d in before)
    assert [d["webhook_id"] for d in after] == [d["webhook_id"] for d in before]
    assert {event["data"]["id"] for event in verified(settings, receiver)} == set(job_ids)
    for delivery in after:  # the attempts made before the kill are still in the log
        assert delivery["attempts"][0]["status_code"] is None
        assert delivery["attempts"][-1]["status_code"] == 200


async def test_two_gateways_on_one_database_deliver_each_webhook_once(
    settings: Settings, receivers: StartReceiver
) -> None:
    receiver = await receivers(Answer(200, delay=0.2))
    async with gateway(settings) as one, gateway(settings) as other:
        job_ids = [await gw.finished_job(receiver.url) for gw in (one, other) * 10]
        await receiver.wait_for(20)
        await asyncio.sleep(0.5)  # time for a duplicate to show up, if there were one
        # Each attempt is recorded up to ACK_DELAY_SECONDS after it, with others.
        deliveries = [await one.wait_for(job_id, "delivered") for job_id in job_ids]
    assert sorted(receiver.webhook_ids) == sorted(d["webhook_id"] for d in deliveries)
    assert all(d["status"] == "delivered" and len(d["attempts"]) == 1 for d in deliveries)
