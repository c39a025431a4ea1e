"""What a job's life writes to PostgreSQL, seen by the database itself: a trigger logs each
write of a job (its transaction, the time, the status it leaves), so a test sees every write
the service made, in order."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet import json_codec, sql
from comfyfleet.db import NotStorable, check_storable, driver_connection, storable_json
from comfyfleet.execution import tracker
from comfyfleet.execution.tracker import END_WRITE_DELAY
from comfyfleet.jobs.models import Job, JobStatus, constructed, new_job, utcnow
from comfyfleet.jobs.repository import JobRepository, _table
from comfyfleet.json_codec import datetime_text
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.conftest import StartReceiver
from tests.support import wait_for_job
from tests.webhook_support import gateway, verified

STATUS_LOG = """
CREATE TABLE status_log (id bigserial PRIMARY KEY, job_id uuid, old text, new text,
                         started boolean, transaction xid8, at timestamptz,
                         uploading_at timestamptz);
CREATE FUNCTION log_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- OLD is null for an INSERT.
    INSERT INTO status_log (job_id, old, new, started, transaction, at, uploading_at)
    VALUES (NEW.id, OLD.status, NEW.status, NEW.started_at IS NOT NULL, pg_current_xact_id(),
            clock_timestamp(), NEW.uploading_at);
    RETURN NEW;
END $$;
CREATE TRIGGER log_status AFTER INSERT OR UPDATE ON jobs FOR EACH ROW
    EXECUTE FUNCTION log_status();
"""


@pytest.fixture
async def status_log(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    async with driver_connection(engine) as connection:
        await connection.execute(STATUS_LOG)
    yield engine


async def changes(engine: AsyncEngine, job_id: str) -> list[tuple[str, str, bool]]:
    """The changes of the job's status, in order: from, to, and whether it has started. A job
    stored already taken (submitted to an idle dispatcher with nothing queued) shows as one
    stored queued and then dispatched: which of the two it was depends on whether the
    dispatcher was busy when it came, not on what these tests look at (the writes after)."""
    async with driver_connection(engine) as connection:
        rows = await connection.fetch(
            "SELECT old, new, started FROM status_log WHERE job_id = $1"
            " AND old IS DISTINCT FROM new ORDER BY id", job_id)
    stored = [("queued", row["new"], row["started"]) for row in rows[:1]
              if row["old"] is None and row["new"] != "queued"]
    return stored + [(row["old"], row["new"], row["started"]) for row in rows
                     if row["old"] is not None]


async def writes_after_claim(engine: AsyncEngine, job_id: str) -> list[asyncpg.Record]:
    """The job's writes made by the transactions after the one that dispatched it, in order
    (`new`, `started`, `transaction`, `at`, `uploading_at`)."""
    async with driver_connection(engine) as connection:
        return list(await connection.fetch(
            "SELECT * FROM status_log WHERE job_id = $1 AND id > ("
            " SELECT max(id) FROM status_log WHERE job_id = $1 AND new = 'dispatched')"
            " ORDER BY id", job_id))


@pytest.fixture
def unhurried_end_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt's end of executing waits for its job's end ten times END_WRITE_DELAY: a test
    of the two written as one does not then need the output stored within 0.5 s, which it
    once was not under three test workers and benchmarks besides (the end of executing then
    written alone, as it should be)."""
    monkeypatch.setattr(tracker, "END_WRITE_DELAY", 10 * END_WRITE_DELAY)


async def run_behind_each_other(settings: Settings, jobs: int, **sim: Any) -> list[str]:
    """A prompt of half a second, then `jobs` invert jobs queued behind it for the backend's
    one slot, on a simulator (`sim`: its options) whose other prompts take no time: each ends
    with jobs queued behind it but the last. The ids of the invert jobs, once all succeeded."""
    settings.max_inflight_per_backend = 1
    async with SimulatedComfyUI(name="gpu", **sim) as simulator:
        settings.comfyui_endpoints = [f"{simulator.url}#gpu"]
        async with gateway(settings) as gw:
            job_ids: list[str] = []
            for body in [{"workflow": "simulated_work", "params": {"seconds": 0.5, "steps": 1}},
                         *[{"workflow": "invert", "params": {"width": 16 + index}}
                           for index in range(jobs)]]:
                async with gw.http.post(f"{gw.api}/jobs", json=body) as response:
                    assert response.status == 202
                    job_ids.append((await response.json())["id"])
            for job_id in job_ids:
                await wait_for_job(gw.http, gw.api, job_id, "succeeded")
    return job_ids[1:]


async def run_jobs(
    settings: Settings, receivers: StartReceiver, duration: float, count: int = 1,
    **sim: Any,
) -> list[tuple[str, list[str], dict[str, Any]]]:
    """Run `count` invert jobs, submitted together, on a simulator whose prompts take
    `duration` seconds (`sim`: its other options), each subscribed to job.started; the id of
    each, the webhooks its receiver verified, once every job.succeeded came, and the job as
    the API shows it then."""
    receiver = await receivers()
    async with SimulatedComfyUI(name="gpu", duration=duration, **sim) as simulator:
        settings.comfyui_endpoints = [f"{simulator.url}#gpu"]
        async with gateway(settings) as gw:
            body = {"workflow": "invert", "callback_url": receiver.url,
                    "webhook_events": ["job.started"]}
            job_ids: list[str] = []
            for _ in range(count):
                async with gw.http.post(f"{gw.api}/jobs", json=body) as response:
                    assert response.status == 202
                    job_ids.append((await response.json())["id"])
            await receiver.wait_for(2 * count)
            await asyncio.sleep(0.3)  # time for a webhook too many to show up, if there were one
            jobs = []
            for job_id in job_ids:
                async with gw.http.get(f"{gw.api}/jobs/{job_id}") as response:
                    jobs.append(await response.json())
    events = verified(settings, receiver)
    return [(job_id, [event["type"] for event in events if event["data"]["id"] == job_id], job)
            for job_id, job in zip(job_ids, jobs, strict=True)]


async def run_job(
    settings: Settings, receivers: StartReceiver, duration: float, **sim: Any,
) -> tuple[str, list[str]]:
    """Run one invert job (`run_jobs`); its id and the webhooks its receiver verified."""
    ((job_id, webhooks, job),) = await run_jobs(settings, receivers, duration, **sim)
    assert job["uploading_at"] is not None and job["progress"] == 1.0
    return job_id, webhooks


async def test_a_prompt_ending_as_it_starts_has_its_start_written_with_its_end(
    settings: Settings, receivers: StartReceiver, status_log: AsyncEngine,
) -> None:
    job_id, webhooks = await run_job(settings, receivers, duration=0.0)
    assert await changes(status_log, job_id) == [
        ("queued", "dispatched", False),
        ("dispatched", "uploading", True),  # one write: started and done executing
        ("uploading", "succeeded", True),
    ]
    assert webhooks == ["job.started", "job.succeeded"]


@pytest.mark.usefixtures("unhurried_end_writes")
async def test_a_prompt_that_runs_a_while_is_running_meanwhile(
    settings: Settings, receivers: StartReceiver, status_log: AsyncEngine,
) -> None:
    """With no job queued, its end of executing is written with its end (outputs stored
    soon): no claim waits for the slot it frees."""
    job_id, webhooks = await run_job(settings, receivers, duration=1.0)
    assert await changes(status_log, job_id) == [
        ("queued", "dispatched", False),
        ("dispatched", "running", True),
        ("running", "succeeded", True),  # one write: done executing, outputs stored
    ]
    assert webhooks == ["job.started", "job.succeeded"]


async def test_outputs_that_take_a_while_to_store_show_the_job_uploading(
    settings: Settings, receivers: StartReceiver, status_log: AsyncEngine,
) -> None:
    # A 4 KB output read from the backend at 2 KB/s: longer than END_WRITE_DELAY.
    job_id, webhooks = await run_job(settings, receivers, duration=1.0, output_size=4096,
                                     view_bytes_per_second=2048)
    assert await changes(status_log, job_id) == [
        ("queued", "dispatched", False),
        ("dispatched", "running", True),
        ("running", "uploading", True),
        ("uploading", "succeeded", True),
    ]
    assert webhooks == ["job.started", "job.succeeded"]


@pytest.mark.usefixtures("unhurried_end_writes")
async def test_a_prompt_ending_while_a_job_waits_has_its_end_written_with_the_jobs(
    settings: Settings, receivers: StartReceiver, status_log: AsyncEngine,
) -> None:
    """The second job waits for the backend's one slot: the first's end of executing is
    written with its end all the same (the claim of the second counts the slot free as soon as
    the end is read), and so is the second's."""
    settings.max_inflight_per_backend = 1
    (first, first_hooks, first_job), (second, second_hooks, second_job) = await run_jobs(
        settings, receivers, duration=0.5, count=2)
    for job_id in (first, second):
        assert await changes(status_log, job_id) == [
            ("queued", "dispatched", False),
            ("dispatched", "running", True),
            ("running", "succeeded", True),
        ]
    assert first_hooks == second_hooks == ["job.started", "job.succeeded"]
    assert first_job["uploading_at"] is not None and second_job["uploading_at"] is not None


@pytest.mark.usefixtures("unhurried_end_writes")
async def test_with_jobs_queued_a_quick_upload_ends_the_job_in_one_write(
    settings: Settings, status_log: AsyncEngine,
) -> None:
    """Each job ends with others queued behind it for its backend's slot: after the
    transaction that claims it, one transaction writes the job, its start (a prompt ending as
    it starts), its end of executing and its end with its outputs, three a job in all."""
    job_ids = await run_behind_each_other(settings, 3)
    for job_id in job_ids:
        (end,) = await writes_after_claim(status_log, job_id)
        assert (end["new"], end["started"]) == ("succeeded", True), job_id
        assert end["uploading_at"] is not None
        assert await changes(status_log, job_id) == [
            ("queued", "dispatched", False),
            ("dispatched", "succeeded", True),
        ]


async def test_with_jobs_queued_a_slow_upload_shows_the_job_uploading_after_a_moment(
    settings: Settings, status_log: AsyncEngine,
) -> None:
    """Outputs that take longer to store than END_WRITE_DELAY (a 4 KB output read from the
    backend at 2 KB/s): the end of executing is written on its own once that moment has
    passed, jobs queued or not, and the job shows `uploading` until its end."""
    job_ids = await run_behind_each_other(settings, 2, output_size=4096,
                                          view_bytes_per_second=2048)
    for job_id in job_ids:
        uploading, end = await writes_after_claim(status_log, job_id)
        assert (uploading["new"], uploading["started"]) == ("uploading", True), job_id
        assert uploading["at"] - uploading["uploading_at"] >= datetime.timedelta(
            seconds=END_WRITE_DELAY)
        assert end["new"] == "succeeded"
        assert uploading["transaction"] != end["transaction"]


@pytest.mark.usefixtures("unhurried_end_writes")
async def test_a_prompt_that_waited_its_turn_and_ends_as_it_starts_is_written_once(
    settings: Settings, status_log: AsyncEngine,
) -> None:
    """Queued on its backend behind a prompt of a second, it starts long after its dispatch
    was written: its start is still written with its end (nothing queued: with its outputs
    too), not by the first progress report. (A third slot stays free: the claims see the
    backlog empty.)"""
    settings.max_inflight_per_backend = 3
    async with SimulatedComfyUI(name="gpu") as sim:
        settings.comfyui_endpoints = [f"{sim.url}#gpu"]
        async with gateway(settings) as gw:
            job_ids = []
            for body in ({"workflow": "simulated_work", "params": {"seconds": 1.0, "steps": 2}},
                         {"workflow": "invert"}):
                async with gw.http.post(f"{gw.api}/jobs", json=body) as response:
                    assert response.status == 202
                    job_ids.append((await response.json())["id"])
            await wait_for_job(gw.http, gw.api, job_ids[1], "succeeded")
    assert await changes(status_log, job_ids[1]) == [
        ("queued", "dispatched", False),
        ("dispatched", "succeeded", True),
    ]


@pytest.mark.parametrize(("fields", "field", "problem"), [
    ({"prompt": {"3": {"inputs": {"te\u0000xt": "a"}}}}, "prompt.3.inputs",
     "has a key with a NUL character (\\u0000)"),
    ({"params": {"seeds": [1, 2.5, float("nan")]}}, "params.seeds.2", "nan is not a number"),
    ({"params": {"at": datetime.datetime.now(datetime.UTC), "text": "a\u0000"}},
     "params.text", "contains a NUL character"),
    ({"priority": float("inf")}, "priority", "inf is not a number"),
    # A key that is not a string: the text is the standard library's, which writes NaN.
    ({"params": {"steps": {1: float("nan")}}}, "params.steps.1", "nan is not a number"),
    ({"source": "s" * 17}, "source", "is longer than 16 characters"),
    ({"client_task_id": "a\u0000"}, "client_task_id", "contains a NUL character"),
    ({"progress": float("-inf")}, "progress", "-inf is not a number"),
])
@pytest.mark.parametrize("check", [check_storable, storable_json])
def test_what_cannot_be_stored_is_named_whatever_the_documents_shape(
    fields: dict[str, Any], field: str, problem: str,
    check: Callable[[dict[str, Any], Table], Any],
) -> None:
    """A job's documents are checked as JSON text first (a walk through every value cost
    0.1-0.2 ms a job), and a job's row as the JSON its insert sends (`storable_json`): a
    document that text cannot show whole (values JSON does not hold) or that looks wrong in
    it is walked, which names the value."""
    with pytest.raises(NotStorable) as refused:
        check({"workflow": "invert", **fields}, _table)
    assert refused.value.field == field
    assert problem in refused.value.problem


def test_the_text_of_an_escape_is_stored() -> None:
    check_storable({"params": {"prompt": "\\u0000 is how JSON writes NUL"}}, _table)


def test_a_new_job_has_the_models_defaults_and_containers_of_its_own() -> None:
    """The intake builds jobs from a table of the model's defaults (`new_job`): what it stores
    is what pydantic would have filled in, and no two jobs share a default list or dict."""
    built = new_job(workflow="invert", priority=3)
    assert built.model_dump(exclude={"id", "created_at"}) == Job.model_construct(
        workflow="invert", priority=3).model_dump(exclude={"id", "created_at"})
    assert built.model_fields_set == {"workflow", "priority"}
    other = new_job(workflow="invert")
    built.outputs.append({"key": "a.png"})
    built.params["seed"] = 1
    assert (other.outputs, other.params, other.prompt) == ([], {}, {})
    assert other.id != built.id


async def test_a_job_is_stored_as_its_fields_whatever_json_writes_them(
    engine: AsyncEngine,
) -> None:
    """A job's row goes to the insert as orjson's JSON, pydantic's where orjson refuses (an
    integer beyond 64 bits, a key that is not text): read back, the job stored either way."""
    repository = JobRepository(engine)
    for params in ({"seed": 2**64 - 1, "text": "é 😀", "ratio": 0.1}, {"seed": 2**70},
                   {"nested": {"values": [1, 2.5, None, True]}}):
        job = new_job(workflow="invert", params=params, prompt={"1": {"inputs": params}},
                      callback_url="http://x/hook", created_at=utcnow(), priority=2)
        stored, created = await repository.insert(job)
        assert created and stored.id == job.id
        read = await repository.get(job.id)
        assert read is not None
        assert (read.params, read.prompt, read.created_at, read.status, read.priority) == (
            params, {"1": {"inputs": params}}, job.created_at, "queued", 2)


def test_a_model_constructed_with_the_fields_given_is_the_one_model_construct_builds(
) -> None:
    """The intake builds jobs past pydantic's `model_construct` (`constructed`, `new_job`):
    the same instance, the fields given as the ones set."""
    job = new_job(workflow="invert", params={"seed": 1}, callback_url="http://x/hook")
    values = dict(vars(job))
    for fields_set in (None, {"workflow", "params"}):
        ours = constructed(Job, dict(values), fields_set)
        theirs = Job.model_construct(fields_set, **values)
        assert vars(ours) == vars(theirs)
        assert ours.model_fields_set == theirs.model_fields_set
        assert (ours.__pydantic_extra__, ours.__pydantic_private__) == (
            theirs.__pydantic_extra__, theirs.__pydantic_private__)
        assert ours.model_dump_json() == theirs.model_dump_json()
    assert job.model_fields_set == {"workflow", "params", "callback_url"}


async def running_jobs(engine: AsyncEngine, *tenants: str, callback_url: str | None = None
                       ) -> list[Job]:
    """A job running on backend gpu for each of `tenants` (API key digests), charged 2 s
    each (sql/claim.sql `claim` as a take does: its tenant's share has it unsettled)."""
    repository = JobRepository(engine)
    jobs = []
    for tenant in tenants:
        job, _ = await repository.insert(Job(
            workflow="invert", status=JobStatus.RUNNING, backend="gpu", attempts=1,
            prompt_id=str(uuid.uuid4()), started_at=utcnow(), api_key_hash=tenant,
            callback_url=callback_url))
        jobs.append(job)
    async with driver_connection(engine) as connection:
        await connection.execute("UPDATE jobs SET charged_seconds = 2")
        await connection.execute(
            "INSERT INTO tenant_shares (tenant, virtual_seconds, last_start, unsettled_seconds)"
            " SELECT api_key_hash, 0, 0, 2 * count(*) FROM jobs GROUP BY api_key_hash")
    return jobs


async def written_by(engine: AsyncEngine, jobs: list[Job]) -> list[int | None]:
    """The transaction that ended each of `jobs` (None: not ended)."""
    async with driver_connection(engine) as connection:
        rows = await connection.fetch(
            "SELECT job_id, transaction::text::bigint FROM status_log"
            " WHERE new IN ('succeeded', 'failed', 'cancelled')")
    ended = {row["job_id"]: row["transaction"] for row in rows}
    return [ended.get(job.id) for job in jobs]


async def waiting_for_locks(engine: AsyncEngine, count: int, ended: Job | None = None) -> None:
    """Until `count` statements wait for a lock (once `ended` has ended, if given). (Read
    outside the transactions holding them: one reads pg_stat_activity once.)"""
    async with asyncio.timeout(10):
        while True:
            async with driver_connection(engine) as connection:
                if (ended is None or await connection.fetchval(
                        "SELECT finished_at IS NOT NULL FROM jobs WHERE id = $1", ended.id)) \
                        and await connection.fetchval(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE wait_event_type = 'Lock'") >= count:
                    return
            await asyncio.sleep(0.01)


async def test_ends_that_come_while_one_is_written_are_written_together_each_fenced(
    status_log: AsyncEngine,
) -> None:
    """Group commit: while the statement ending one job is in flight (held here by a lock on
    its row), the ends that come wait, and the next statement writes them all, in one
    transaction; a stale one among them (an older attempt) is refused alone: its job, its
    outbox and its tenant's share are left as they were, and its caller hears None."""
    repository = JobRepository(status_log)
    first, *others = await running_jobs(status_log, "a", "a", "b", "b",
                                        callback_url="http://127.0.0.1:9/hooks")
    stale = others[1].model_copy(update={"attempts": 0})
    async with driver_connection(status_log) as db:
        holding = db.transaction()
        await holding.start()
        await db.execute("SELECT FROM jobs WHERE id = $1 FOR UPDATE", first.id)
        ending_first = asyncio.create_task(
            repository.finish(first, JobStatus.SUCCEEDED, {JobStatus.RUNNING}))
        await waiting_for_locks(status_log, 1)
        ending = asyncio.gather(*(repository.finish(job, JobStatus.SUCCEEDED,
                                                    {JobStatus.RUNNING})
                                  for job in (others[0], stale, others[2])))
        await asyncio.sleep(0.2)
        assert not ending.done()  # they wait for the statement in flight
        await holding.rollback()
        ended_first = await ending_first
        ended = await ending
        assert ended_first is not None and ended_first.status == JobStatus.SUCCEEDED
        assert ended[1] is None
        assert [job.status for job in ended if job is not None] == [JobStatus.SUCCEEDED] * 2
        transactions = await written_by(status_log, [first, *others])
        assert transactions[2] is None
        assert transactions[1] == transactions[3] != transactions[0]
        assert await db.fetchval("SELECT status FROM jobs WHERE id = $1",
                                 others[1].id) == "running"
        outbox = await db.fetch("SELECT job_id FROM webhook_deliveries")
        assert sorted(row["job_id"] for row in outbox) == sorted(
            job.id for job in (first, others[0], others[2]))
        shares = await db.fetch("SELECT tenant, unsettled_seconds FROM tenant_shares")
        assert {row["tenant"]: row["unsettled_seconds"] for row in shares} == {"a": 0, "b": 2}


async def test_two_processes_ending_jobs_of_the_same_tenants_do_not_deadlock(
    status_log: AsyncEngine,
) -> None:
    """Two processes each end a job of tenant a and one of b in one statement (the two ends
    came while the process's statement ending a job of c was held by a lock on its row), one
    a's first, the other b's, while a's share is held: each statement locks the shares in one
    order (a's first), so the second does not hold b's while it waits for a's, which the first
    has next; each pair is written in one transaction (a deadlock would have PostgreSQL refuse
    one statement, then each of its ends be written alone), and each tenant's charges
    settled."""
    # Stored in the order each statement names them: a plan that reads the table in its
    # order writes them (and fires their triggers) as one that follows the ends' does.
    a1, b1, b2, a2, c1, c2 = await running_jobs(status_log, "a", "b", "b", "a", "c", "c")
    async with driver_connection(status_log) as share, \
            driver_connection(status_log) as row1, driver_connection(status_log) as row2:
        holds = [share.transaction(), row1.transaction(), row2.transaction()]
        for hold in holds:
            await hold.start()
        await share.execute("SELECT FROM tenant_shares WHERE tenant = 'a' FOR UPDATE")
        ending: list[asyncio.Future[list[Job | None]]] = []
        for held, lone, pair in ((row1, c1, (a1, b1)), (row2, c2, (b2, a2))):
            await held.execute("SELECT FROM jobs WHERE id = $1 FOR UPDATE", lone.id)
            repository = JobRepository(status_log)
            ending.append(asyncio.gather(*(repository.finish(job, JobStatus.SUCCEEDED,
                                                             {JobStatus.RUNNING})
                                           for job in (lone, *pair))))
        await waiting_for_locks(status_log, 2)  # c1's end and c2's
        await holds[1].rollback()
        await waiting_for_locks(status_log, 2, c1)  # a1 and b1's for a's share, and c2's
        await holds[2].rollback()
        await waiting_for_locks(status_log, 2, c2)  # a1 and b1's, then b2 and a2's
        await holds[0].rollback()
        for statement in ending:
            assert None not in await statement
        first, second, third, fourth = await written_by(status_log, [a1, b1, a2, b2])
        assert first == second != third == fourth
        shares = await share.fetch("SELECT tenant, unsettled_seconds FROM tenant_shares")
        assert {row["tenant"]: row["unsettled_seconds"] for row in shares} \
            == {"a": 0, "b": 0, "c": 0}


async def test_the_statement_ending_jobs_is_planned_once_per_connection(
    engine: AsyncEngine,
) -> None:
    """sql/jobs.sql `finish`, prepared on a connection, ends one job at a call after another
    with the plan PostgreSQL made once (its generic plan, after the five it makes with a
    call's values before choosing), not a plan made afresh at every call, each of which cost
    more of its CPU than running the statement; every job is ended all the same."""
    jobs = await running_jobs(engine, *"abcdefgh")
    async with driver_connection(engine) as connection:
        # Jobs ended long ago, as a service has, counted as autovacuum would: in a table of a
        # few, a scan of it all costs as little as looking the ends up by id, however many.
        await connection.execute(
            "INSERT INTO jobs SELECT (jsonb_populate_record(jobs, jsonb_build_object("
            "'id', gen_random_uuid(), 'status', 'succeeded'))).*"
            " FROM jobs, generate_series(1, 100)")
        await connection.execute("ANALYZE jobs")
        for job in jobs:
            ended = await connection.fetch(
                sql.queries("jobs")["finish"], [job.id], [1], [job.prompt_id], ["running"],
                ["succeeded"], [utcnow()], [None], [None], [None], [None], [None], [False],
                [None], [None])
            assert [row["status"] for row in ended] == ["succeeded"]
        plans = await connection.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement = $1", sql.queries("jobs")["finish"])
    assert (plans["generic_plans"], plans["custom_plans"]) == (len(jobs) - 5, 5)


async def test_an_end_refused_for_its_values_is_refused_alone(status_log: AsyncEngine) -> None:
    """Ends written together, one with an error PostgreSQL cannot store (a NUL in jsonb): the
    others are written, and only that end's caller hears the refusal."""
    repository = JobRepository(status_log)
    jobs = await running_jobs(status_log, "a", "a", "a")
    ended = await asyncio.gather(*(
        repository.finish(job, JobStatus.FAILED, {JobStatus.RUNNING},
                          error={"message": "nul \u0000" if index == 1 else "failed"})
        for index, job in enumerate(jobs)), return_exceptions=True)
    assert isinstance(ended[1], asyncpg.PostgresError)
    assert [type(job) for job in (ended[0], ended[2])] == [Job, Job]
    transactions = await written_by(status_log, jobs)
    assert transactions[1] is None and None not in (transactions[0], transactions[2])


async def test_an_ended_job_and_its_webhook_row_are_what_pydantic_would_build(
    status_log: AsyncEngine,
) -> None:
    """A job's end is built past pydantic (models.py `constructed`, the outbox row's JSON by
    the package's encoder): the job the caller gets back is the model pydantic builds from the
    same values, and a payload the encoder cannot write (an integer beyond 64 bits in the
    job's params) is written all the same, by the standard library."""
    repository = JobRepository(status_log)
    job, = await running_jobs(status_log, "a", callback_url="http://127.0.0.1:9/hooks")
    async with driver_connection(status_log) as db:
        await db.execute("""UPDATE jobs SET params = '{"seed": 1180591620717411303424}'""")
    job = job.model_copy(update={"params": {"seed": 2**70}})
    outputs = [{"node_id": "9", "filename": "a.png", "content_type": "image/png", "size": 3,
                "key": f"outputs/{job.id}/9_0.png"}]
    ended = await repository.finish(job, JobStatus.SUCCEEDED, {JobStatus.RUNNING},
                                    outputs=outputs)
    assert ended is not None
    async with driver_connection(status_log) as db:
        row = await db.fetchrow("SELECT * FROM jobs WHERE id = $1", job.id)
        payload = await db.fetchval("SELECT payload FROM webhook_deliveries WHERE job_id = $1",
                                    job.id)
    built = Job.model_construct(**{name: row[name] for name in Job.model_fields})
    assert ended.model_dump() == built.model_dump() | {"id": job.id}
    assert list(ended.__dict__) == list(Job.model_fields)
    assert ended.model_fields_set == set(Job.model_fields)
    assert (ended.status, ended.outputs, ended.params) == (JobStatus.SUCCEEDED, outputs,
                                                           {"seed": 2**70})
    data = payload["data"]
    assert (data["params"], data["status"], data["outputs"]) == (
        {"seed": 2**70}, "succeeded", [{**outputs[0], "url": None}])
    assert ended.finished_at is not None
    assert data["finished_at"] == ended.finished_at.isoformat()


async def test_a_changes_row_gives_back_none_of_the_documents_it_wrote(
    status_log: AsyncEngine,
) -> None:
    """The connection decodes each jsonb value of a row in Python: sql/jobs.sql `transition`
    and `finish` give the outputs, error and progress detail they wrote back null (the caller
    has them), those they did not write as stored; the repository's job holds them all."""
    repository = JobRepository(status_log)
    job, other = await running_jobs(status_log, "a", "b")
    outputs = [{"node_id": "9", "filename": "a.png", "key": f"outputs/{job.id}/9_0.png"}]
    detail = {"node": "3", "class_type": "KSampler", "step": 2, "steps": 20}
    error = {"type": "execution_error", "message": "boom"}
    statements = sql.queries("jobs")
    async with driver_connection(status_log) as db:
        written = await db.fetchrow(
            statements["transition"], job.id, job.attempts, job.prompt_id, ["running"], None,
            None, True, json_codec.dumps_text(detail), None, None,
            json_codec.dumps_text(outputs), None, None, None)
        kept = await db.fetchrow(
            statements["transition"], job.id, job.attempts, job.prompt_id, ["running"], None,
            0.5, False, None, None, None, None, None, None, None)
        ended = await db.fetchrow(
            statements["finish"], [job.id], [job.attempts], [job.prompt_id], ["running"],
            ["failed"], [utcnow()], [None], [json_codec.dumps_text(error)], [None], [None],
            [None], [False], [None], [None])
    assert (written["outputs"], written["progress_detail"], written["error"]) == (
        None, None, None)
    assert (kept["outputs"], kept["progress_detail"], kept["error"]) == (outputs, detail, None)
    assert (ended["outputs"], ended["progress_detail"], ended["error"]) == (
        outputs, detail, None)
    changed = await repository.transition(other, {JobStatus.RUNNING}, outputs=outputs,
                                          progress_detail=detail)
    assert changed is not None
    ended_job = await repository.finish(changed, JobStatus.FAILED, {JobStatus.RUNNING},
                                        error=error, progress_detail=None)
    read = await repository.get(other.id)
    assert ended_job is not None and read is not None
    assert (changed.outputs, changed.progress_detail, changed.error) == (outputs, detail, None)
    assert (ended_job.outputs, ended_job.progress_detail, ended_job.error) == (
        read.outputs, read.progress_detail, read.error) == (outputs, None, error)


@pytest.mark.parametrize("moment", [
    datetime.datetime(2026, 12, 7, 17, 13, 12, 438175, tzinfo=datetime.UTC),
    datetime.datetime(2026, 12, 7, tzinfo=datetime.UTC),  # no microseconds: none written
    datetime.datetime(999, 1, 1, 0, 0, 0, 5, tzinfo=datetime.UTC),
    datetime.datetime(2026, 12, 7, 17, 13, tzinfo=datetime.timezone(
        datetime.timedelta(hours=-5, minutes=-30))),
    datetime.datetime(2026, 12, 7, 17, 13, 12),  # naive
])
def test_a_timestamp_is_rendered_as_isoformat_writes_it(moment: datetime.datetime) -> None:
    assert datetime_text(moment) == moment.isoformat()
