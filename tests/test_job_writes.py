"""What a job's life writes to PostgreSQL, seen by the database itself: a trigger logs each
change of a job's status, so a test sees every write the service made, in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.db import driver_connection
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.conftest import StartReceiver
from tests.webhook_support import gateway, verified

STATUS_LOG = """
CREATE TABLE status_log (id bigserial PRIMARY KEY, job_id uuid, old text, new text,
                         started boolean);
CREATE FUNCTION log_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO status_log (job_id, old, new, started)
    VALUES (NEW.id, OLD.status, NEW.status, NEW.started_at IS NOT NULL);
    RETURN NEW;
END $$;
CREATE TRIGGER log_status AFTER UPDATE ON jobs FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION log_status();
"""


@pytest.fixture
async def status_log(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    async with driver_connection(engine) as connection:
        await connection.execute(STATUS_LOG)
    yield engine


async def changes(engine: AsyncEngine, job_id: str) -> list[tuple[str, str, bool]]:
    async with driver_connection(engine) as connection:
        rows = await connection.fetch(
            "SELECT old, new, started FROM status_log WHERE job_id = $1 ORDER BY id", job_id)
    return [(row["old"], row["new"], row["started"]) for row in rows]


async def run_job(
    settings: Settings, receivers: StartReceiver, duration: float,
) -> tuple[str, list[str]]:
    """Run one invert job on a simulator whose prompts take `duration` seconds, subscribed to
    job.started; its id and the webhooks its receiver verified, once job.succeeded came."""
    receiver = await receivers()
    async with SimulatedComfyUI(name="gpu", duration=duration) as sim:
        settings.comfyui_endpoints = [f"{sim.url}#gpu"]
        async with gateway(settings) as gw:
            body = {"workflow": "invert", "callback_url": receiver.url,
                    "webhook_events": ["job.started"]}
            async with gw.http.post(f"{gw.api}/jobs", json=body) as response:
                assert response.status == 202
                job_id: str = (await response.json())["id"]
            await receiver.wait_for(2)
            await asyncio.sleep(0.3)  # time for a webhook too many to show up, if there were one
    events = verified(settings, receiver)
    assert all(event["data"]["id"] == job_id for event in events)
    return job_id, [event["type"] for event in events]


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


async def test_a_prompt_that_runs_a_while_is_running_meanwhile(
    settings: Settings, receivers: StartReceiver, status_log: AsyncEngine,
) -> None:
    job_id, webhooks = await run_job(settings, receivers, duration=1.0)
    assert await changes(status_log, job_id) == [
        ("queued", "dispatched", False),
        ("dispatched", "running", True),
        ("running", "uploading", True),
        ("uploading", "succeeded", True),
    ]
    assert webhooks == ["job.started", "job.succeeded"]
