"""A job whose outputs cannot be collected for a reason that is no outage (the backend failing
to serve a file, storage failing in a way it does not expect, a bug) does not stay where it
was, followed by no one: the collection is tried a few times, with a pause between tries, and
the job then fails (`output_unavailable`, `collection_failed`), its webhook sent and its
backend's slot free again."""

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
from tests.conftest import S3_CREDENTIALS
from tests.support import scrape, value, wait_for_job

COLLECTION_FAILURES = "comfyfleet_collection_failures_total"
STORAGE_ERRORS = "comfyfleet_storage_errors_total"


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedComfyUI]:
    async with SimulatedComfyUI() as server:
        yield server


async def set_faults(http: aiohttp.ClientSession, sim: SimulatedComfyUI, **faults: object
                     ) -> None:
    async with http.post(f"{sim.url}/_sim/faults", json=faults) as response:
        assert response.status == 200, await response.text()


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


async def test_a_backend_failing_to_serve_an_output_is_asked_again(
    settings: Settings, sim: SimulatedComfyUI,
) -> None:
    """/view answering an error page (a busy or restarting server) is not the end of a job
    whose prompt ran: the collection is tried again, and succeeds once the file is served."""
    settings.comfyui_endpoints = [sim.url]
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        api = base + settings.route_prefix
        failures = value(await scrape(http, base), COLLECTION_FAILURES)
        await set_faults(http, sim, view_status=500)
        async with http.post(f"{api}/jobs", json={"workflow": "invert"}) as response:
            job_id = (await response.json())["id"]
        async with asyncio.timeout(30):
            while value(await scrape(http, base), COLLECTION_FAILURES) == failures:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling /metrics: no local event to wait on
        await set_faults(http, sim, view_status=None)
        job = await wait_for_job(http, api, job_id, "succeeded")
    assert job["outputs"][0]["size"] > 0


async def test_a_file_the_backend_breaks_off_fails_the_job_instead_of_waiting_on_s3(
    settings: Settings, sim: SimulatedComfyUI, receiver: WebhookReceiver, s3_endpoint: str,
    s3_bucket: str,
) -> None:
    """A /view body that breaks off is the backend's failure, not an S3 outage to wait out
    (S3 streams it, and its client sees the read fail): tried again a few times, then the
    job fails, saying so."""
    settings.comfyui_endpoints = [sim.url]
    settings.storage, settings.s3_bucket, settings.s3_endpoint_url = "s3", s3_bucket, s3_endpoint
    settings.aws_access_key_id = S3_CREDENTIALS["aws_access_key_id"]
    settings.aws_secret_access_key = S3_CREDENTIALS["aws_secret_access_key"]
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        api = base + settings.route_prefix
        storage_errors = value(await scrape(http, base), STORAGE_ERRORS)
        await set_faults(http, sim, view_cut_bytes=8)  # a PNG's signature, then nothing
        async with http.post(f"{api}/jobs", json={"workflow": "invert",
                                                  "callback_url": receiver.url}) as response:
            job_id = (await response.json())["id"]
        async with asyncio.timeout(30):
            await receiver.wait_for(1)
        (event,) = receiver.verified
        job = event["data"]
        assert (event["type"], job["id"], job["outputs"]) == ("job.failed", job_id, [])
        assert job["error"]["type"] == "output_unavailable"
        assert "body broke off" in job["error"]["message"]
        assert job["error"]["details"]["attempts"] == 3
        assert value(await scrape(http, base), STORAGE_ERRORS) == storage_errors
