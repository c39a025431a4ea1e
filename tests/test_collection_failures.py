"""A job whose outputs cannot be collected for a reason that is no outage (storage failing in
a way it does not expect, a bug) does not stay where it was, followed by no one: the collection
is tried a few times, with a pause between tries, and the job then fails with
`collection_failed`, its webhook sent and its backend's slot free again."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import scrape, value, wait_for_job

COLLECTION_FAILURES = "comfyfleet_collection_failures_total"


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedComfyUI]:
    async with SimulatedComfyUI() as server:
        yield server


@contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """`directory` replaced by a file while inside: every file stored under it fails with an
    OSError (NotADirectoryError), which the storage does not take for an outage."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.write_bytes(b"")
    try:
        yield
    finally:
        directory.unlink()
        directory.mkdir()


async def test_a_collection_that_keeps_failing_fails_the_job_and_frees_its_slot(
    settings: Settings, sim: SimulatedComfyUI, receiver: WebhookReceiver,
) -> None:
    settings.comfyui_endpoints = [sim.url + "#gpu"]
    settings.max_inflight_per_backend = 1  # the next job needs the failed one's slot
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        api = base + settings.route_prefix
        with unwritable(settings.data_dir / "outputs"):
            async with http.post(f"{api}/jobs", json={"workflow": "invert",
                                                      "callback_url": receiver.url}) as response:
                assert response.status == 202
                job_id = (await response.json())["id"]
            async with asyncio.timeout(30):
                await receiver.wait_for(1)
        (event,) = receiver.verified
        assert event["type"] == "job.failed"
        job = event["data"]
        assert (job["id"], job["status"], job["outputs"]) == (job_id, "failed", [])
        assert job["error"]["type"] == "collection_failed"
        assert "NotADirectoryError" in job["error"]["message"]
        assert job["error"]["details"]["attempts"] == 3
        assert value(await scrape(http, base), COLLECTION_FAILURES) == 3
        # Its slot is free in the database's count too: the next job runs there.
        async with http.post(f"{api}/jobs", json={"workflow": "invert"}) as response:
            next_id = (await response.json())["id"]
        done = await wait_for_job(http, api, next_id, "succeeded")
        assert done["backend"] == "gpu"
