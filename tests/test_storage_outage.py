"""S3 away for a while: a job whose outputs are being stored waits in `uploading`, nothing
claims success early, and it finishes once S3 is back; a submit whose input image cannot be
kept is refused with 503 and makes no job, and the same submit works once S3 is back; a job
whose input S3 cannot serve when it is to be sent waits for S3, not failed as one whose input
is gone."""

from __future__ import annotations

import asyncio
import base64
from contextlib import AsyncExitStack
from dataclasses import dataclass

import aiohttp
from aiobotocore.session import get_session

from comfyfleet.app import serving
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.conftest import S3_CREDENTIALS
from tests.support import (
    LOOPBACK,
    free_ports,
    png,
    python_process,
    scrape,
    value,
    wait_for_job,
)

BUCKET = "outage"
STORAGE_ERRORS = "comfyfleet_storage_errors_total"
CLAIMS = "comfyfleet_dispatch_claims_total"


async def create_bucket(endpoint: str) -> None:
    async with get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=endpoint, **S3_CREDENTIALS
    ) as client:
        await client.create_bucket(Bucket=BUCKET)


@dataclass
class S3Outage:
    """A service storing in S3 on a moto server that went away once the service was up:
    `stack` stops them all."""

    stack: AsyncExitStack
    moto: tuple[str, ...]  # its command line
    endpoint: str
    sim: SimulatedComfyUI  # the service's one backend
    base: str  # the service's
    api: str
    http: aiohttp.ClientSession

    @classmethod
    async def begin(cls, stack: AsyncExitStack, settings: Settings) -> S3Outage:
        """The service serving `settings`, storing in S3 on a moto server started for it and
        stopped once the service is up."""
        port = free_ports(1)
        moto = ("moto.server", "-H", LOOPBACK, "-p", str(port))
        endpoint = f"http://{LOOPBACK}:{port}"
        settings.storage = "s3"
        settings.s3_bucket = BUCKET
        settings.s3_endpoint_url = endpoint
        settings.aws_access_key_id = S3_CREDENTIALS["aws_access_key_id"]
        settings.aws_secret_access_key = S3_CREDENTIALS["aws_secret_access_key"]
        sim = await stack.enter_async_context(SimulatedComfyUI())
        settings.comfyui_endpoints = [sim.url]
        first = await stack.enter_async_context(python_process(*moto, ready_url=endpoint))
        await create_bucket(endpoint)
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        first.kill()
        await first.wait()
        return cls(stack, moto, endpoint, sim, base, base + settings.route_prefix, http)

    async def end(self) -> asyncio.subprocess.Process:
        """S3 back: a new server, its bucket created (it starts empty)."""
        server = await self.stack.enter_async_context(
            python_process(*self.moto, ready_url=self.endpoint))
        await create_bucket(self.endpoint)
        return server


async def test_job_waits_in_uploading_while_s3_is_down_and_resumes(settings: Settings) -> None:
    async with AsyncExitStack() as stack:
        # S3 goes away before the job's outputs are stored.
        outage = await S3Outage.begin(stack, settings)
        base, api, http = outage.base, outage.api, outage.http

        failures = value(await scrape(http, base), STORAGE_ERRORS)
        async with http.post(f"{api}/jobs", json={"workflow": "invert"}) as response:
            job_id = (await response.json())["id"]
        await wait_for_job(http, api, job_id, "uploading")
        async with asyncio.timeout(30):  # several failed attempts later (1 s apart, then 2 s)
            while value(await scrape(http, base), STORAGE_ERRORS) < failures + 3:  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # polling /metrics: no local event to wait on
        async with http.get(f"{api}/jobs/{job_id}") as response:
            assert (await response.json())["status"] == "uploading"  # ...still waiting
        async with http.get(f"{base}/readyz") as response:
            assert response.status == 503
            assert (await response.json())["storage"] is False

        await outage.end()
        job = await wait_for_job(http, api, job_id, "succeeded", seconds=60)
        async with get_session().create_client(
            "s3", region_name="us-east-1", endpoint_url=outage.endpoint, **S3_CREDENTIALS
        ) as client:
            stored = await client.head_object(Bucket=BUCKET, Key=job["outputs"][0]["key"])
    assert job["status"] == "succeeded"
    assert stored["ContentLength"] == job["outputs"][0]["size"] > 0


async def test_a_submit_whose_input_cannot_be_kept_makes_no_job_until_s3_is_back(
    settings: Settings,
) -> None:
    request = {"workflow": "blur_image", "client_task_id": "photo-1",
               "params": {"image": base64.b64encode(png()).decode(), "width": 16}}
    async with AsyncExitStack() as stack:
        outage = await S3Outage.begin(stack, settings)
        api, http = outage.api, outage.http

        async with http.post(f"{api}/jobs", json=request) as response:
            refused = await response.json()
            assert (response.status, refused["error"]["type"]) == (503, "storage_unavailable")
            assert int(response.headers["Retry-After"]) > 0
        assert "image" in refused["error"]["message"]
        # What needs no storage now is still taken; nothing of the refused one was kept.
        async with http.post(f"{api}/jobs", json={"workflow": "invert"}) as response:
            assert response.status == 202
            plain = (await response.json())["id"]
        async with http.get(f"{api}/jobs") as response:
            assert [job["id"] for job in (await response.json())["jobs"]] == [plain]

        await outage.end()
        async with http.post(f"{api}/jobs", json=request) as response:  # the client retries
            assert response.status == 202, await response.text()
            submitted = await response.json()
        job = await wait_for_job(http, api, submitted["id"], "succeeded")
        assert (await wait_for_job(http, api, plain, "succeeded"))["outputs"]
        record = job["params"]["image"]
        uploaded = outage.sim.data_dir / "input" / record["subfolder"] / record["name"]
        assert uploaded.read_bytes() == png()  # the input reached the backend whole


async def test_a_job_whose_input_cannot_be_read_now_waits_for_s3(settings: Settings) -> None:
    async with AsyncExitStack() as stack:
        outage = await S3Outage.begin(stack, settings)
        server = await outage.end()  # S3 up while the job is submitted
        base, api, http = outage.base, outage.api, outage.http
        async with http.get(f"{api}/backends") as response:
            (backend,) = [entry["name"] for entry in await response.json()]

        async def drain(drained: bool) -> None:
            async with http.patch(f"{api}/backends/{backend}",
                                  json={"drain": drained}) as response:
                assert response.status == 200, await response.text()

        await drain(True)  # the job waits in the backlog...
        async with http.post(f"{api}/jobs", json={"workflow": "blur_image", "params": {
                "image": base64.b64encode(png()).decode(), "width": 16}}) as response:
            assert response.status == 202, await response.text()
            submitted = await response.json()
        server.kill()  # ...while S3 goes away
        await server.wait()
        taken = value(await scrape(http, base), CLAIMS, outcome="took")
        await drain(False)
        async with asyncio.timeout(30):  # claimed, its input unreadable, released: twice
            while value(await scrape(http, base), CLAIMS, outcome="took") < taken + 2:  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # polling /metrics: no local event to wait on
        async with http.get(f"{api}/jobs/{submitted['id']}") as response:
            assert (await response.json())["status"] in {"queued", "dispatched"}

        # S3 back, with what it kept (a new moto server starts empty): put back while no claim
        # can read it, or a claim between the two would find it gone, not away.
        await drain(True)
        await wait_for_job(http, api, submitted["id"], "queued", seconds=30)
        await outage.end()
        record = submitted["params"]["image"]
        async with get_session().create_client(
            "s3", region_name="us-east-1", endpoint_url=outage.endpoint, **S3_CREDENTIALS
        ) as client:
            await client.put_object(Bucket=BUCKET, Key=record["input"], Body=png())
        await drain(False)
        job = await wait_for_job(http, api, submitted["id"], "succeeded", seconds=60)
    assert job["error"] is None
