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


@pytest.mark.parametrize("started_hook", [False, True],
                         ids=["end-of-executing-deferred", "end-of-executing-written-at-once"])
async def test_a_collection_that_keeps_failing_fails_the_job_and_frees_its_slot(
    settings: Settings, sim: SimulatedComfyUI, receiver: WebhookReceiver, started_hook: bool,
) -> None:
    """With no job.started webhook (and no job queued) the end of executing is left for the
    job's end to record (tracker._defer_end); with one it is written at once (`uploading`)."""
    settings.comfyui_endpoints = [sim.url + "#gpu"]
    settings.max_inflight_per_backend = 1  # the next job needs the failed one's slot
    hooks = {"webhook_events": ["job.started"]} if started_hook else {}
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        api = base + settings.route_prefix
        failures = value(await scrape(http, base), COLLECTION_FAILURES)
        with unwritable(settings.data_dir / "outputs"):
            async with http.post(f"{api}/jobs", json={
                    "workflow": "invert", "callback_url": receiver.url, **hooks}) as response:
                assert response.status == 202
                job_id = (await response.json())["id"]
            async with asyncio.timeout(30):
                await receiver.wait_for(1 + started_hook)
        assert [event["type"] for event in receiver.verified] == \
            ["job.started"] * started_hook + ["job.failed"]
        job = receiver.verified[-1]["data"]
        assert (job["id"], job["status"], job["outputs"]) == (job_id, "failed", [])
        assert job["error"]["type"] == "collection_failed"
        assert "NotADirectoryError" in job["error"]["message"]
        assert job["error"]["details"]["attempts"] == 3
        assert value(await scrape(http, base), COLLECTION_FAILURES) == failures + 3
        # Its slot is free in the database's count too: the next job runs there.
        async with http.post(f"{api}/jobs", json={"workflow": "invert"}) as response:
            next_id = (await response.json())["id"]
        done = await wait_for_job(http, api, next_id, "succeeded")
        assert done["backend"] == "gpu"


async def test_a_collection_that_fails_once_is_tried_again_and_succeeds(
    settings: Settings, sim: SimulatedComfyUI,
) -> None:
    settings.comfyui_endpoints = [sim.url]
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        api = base + settings.route_prefix
        failures = value(await scrape(http, base), COLLECTION_FAILURES)
        with unwritable(settings.data_dir / "outputs"):
            async with http.post(f"{api}/jobs", json={"workflow": "invert"}) as response:
                job_id = (await response.json())["id"]
            async with asyncio.timeout(30):
                while value(await scrape(http, base), COLLECTION_FAILURES) == failures:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # polling /metrics: no local event to wait on
        # Storage works again before the last try.
        job = await wait_for_job(http, api, job_id, "succeeded")
        async with http.get(f"{api}/jobs/{job_id}/outputs/0") as response:
            assert response.status == 200
            stored = await response.read()
    assert stored[:4] == b"\x89PNG"
    assert job["outputs"][0]["size"] == len(stored)
