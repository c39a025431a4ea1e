"""The progress of running jobs is written together: one statement per interval carries the
latest report of every running job, not a statement per job (seen by the database itself: a
trigger logs each progress write with its transaction)."""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack

import aiohttp
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.app import serving
from comfyfleet.db import driver_connection
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import wait_for_healthy_backends, wait_for_job

PROGRESS_LOG = """
CREATE TABLE progress_log (id bigserial PRIMARY KEY, job_id uuid, tx bigint);
CREATE FUNCTION log_progress() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO progress_log (job_id, tx) VALUES (NEW.id, txid_current());
    RETURN NEW;
END $$;
CREATE TRIGGER log_progress AFTER UPDATE ON jobs FOR EACH ROW
    WHEN (OLD.status = 'running' AND NEW.status = 'running'
          AND OLD.progress IS DISTINCT FROM NEW.progress) EXECUTE FUNCTION log_progress();
"""


async def test_the_progress_of_jobs_running_side_by_side_is_written_by_one_statement(
    settings: Settings, engine: AsyncEngine,
) -> None:
    async with driver_connection(engine) as connection:
        await connection.execute(PROGRESS_LOG)
    async with AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(SimulatedComfyUI(name=f"gpu{n}"))
                for n in range(2)]
        settings.comfyui_endpoints = [f"{sim.url}#{sim.name}" for sim in sims]
        base = await stack.enter_async_context(serving(settings)) + settings.route_prefix
        http = await stack.enter_async_context(aiohttp.ClientSession())
        assert len(await wait_for_healthy_backends(http, base)) == 2
        ids = []
        for seed in range(2):  # two seconds each, a progress report every tenth of a second
            body = {"workflow": "simulated_work",
                    "params": {"seconds": 2.0 + seed / 100, "steps": 20}}
            async with http.post(f"{base}/jobs", json=body) as response:
                assert response.status == 202, await response.text()
                ids.append((await response.json())["id"])
        for job_id in ids:
            await wait_for_job(http, base, job_id, "succeeded")
    async with driver_connection(engine) as connection:
        rows = await connection.fetch("SELECT job_id, tx FROM progress_log")
    per_transaction = Counter(row["tx"] for row in rows)
    # Both jobs ran side by side for most of their two seconds: at an interval of half a
    # second, several statements wrote the progress of both.
    assert sum(count == 2 for count in per_transaction.values()) >= 2, per_transaction
