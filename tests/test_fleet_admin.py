"""Changing the fleet at run time: what a backend may be called and where it may point, and
removing one while another process has a job on it."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.app import serving
from comfyfleet.comfy.endpoints import Backend
from comfyfleet.fleet.registry import BackendBusy, BackendExists, BackendRegistry
from comfyfleet.jobs.models import Job
from comfyfleet.jobs.repository import Choice, JobRepository
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import LOOPBACK, free_ports, serve_env, wait_for_job
from tests.test_scale_out import Gateways


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as response:
        return response.status, (await response.json() if response.status != 204 else None)


async def test_backend_names_and_urls_are_checked(settings: Settings) -> None:
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        other = await stack.enter_async_context(SimulatedComfyUI())
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        api = base + settings.route_prefix
        port = sim.url.rsplit(":", 1)[1]

        refused = [
            ({"url": "http://u:p@127.0.0.1:1/x?y#z", "name": "weird/../name"}, "name"),
            ({"url": sim.url, "name": ".."}, "name"),
            ({"url": sim.url, "name": "a#b"}, "name"),
            ({"url": f"http://admin:s3cret@{LOOPBACK}:{port}", "name": "creds"}, "url"),
            ({"url": sim.url + "/?token=abc", "name": "query"}, "url"),
            ({"url": sim.url + "#frag", "name": "fragment"}, "url"),
            ({"url": f"http://{LOOPBACK}:{port}/a b", "name": "space"}, "url"),
            ({"url": "http://a..com:8188", "name": "badhost"}, "url"),
        ]
        for body, field in refused:
            status, answer = await call(http, "POST", f"{api}/backends", body)
            assert status == 422, (body, answer)
            assert field in (answer["error"].get("field"), answer["error"].get("problems", [{}])[0]
                             .get("field")), answer
            assert "s3cret" not in str(answer)  # credentials are never echoed

        status, added = await call(http, "POST", f"{api}/backends",
                                   {"url": sim.url, "name": "gpu-1"})
        assert (status, added["name"], added["url"]) == (201, "gpu-1", sim.url)
        # The same server under a second name (spelled differently) would double its slots.
        for url in (sim.url + "/", f"HTTP://{LOOPBACK}:{port}", f"{LOOPBACK}:{port}"):
            status, answer = await call(http, "POST", f"{api}/backends",
                                        {"url": url, "name": "gpu-2"})
            assert (status, answer["error"]["type"], answer["error"]["field"]) == (
                409, "backend_exists", "url"), url
            assert "gpu-1" in answer["error"]["message"]
        status, answer = await call(http, "POST", f"{api}/backends",
                                    {"url": other.url, "name": "gpu-1"})
        assert (status, answer["error"]["field"]) == (409, "name")

        # The default name (host:port) is a name PATCH and DELETE can address.
        status, added = await call(http, "POST", f"{api}/backends", {"url": other.url})
        assert (status, added["name"]) == (201, other.url.removeprefix("http://"))
        for name in ("gpu-1", added["name"]):
            status, _ = await call(http, "PATCH", f"{api}/backends/{name}", {"drain": True})
            assert status == 200
            assert (await call(http, "DELETE", f"{api}/backends/{name}"))[0] == 204
        assert await call(http, "GET", f"{api}/backends") == (200, [])


async def test_configured_endpoints_follow_the_same_rules(
    settings: Settings, engine: AsyncEngine, data_root: Path
) -> None:
    port = free_ports(1)
    for endpoints, expected in [
        ("http://admin:s3cret@127.0.0.1:1#gpu", "credentials"),
        ("127.0.0.1:1#weird/../name", "not a slug"),
        ("127.0.0.1:1/x?y=1#gpu", "query"),
        ("127.0.0.1:1#a,http://127.0.0.1:1/#b", "duplicate backend urls"),
    ]:
        env = serve_env(settings, data_root, port, COMFYUI_ENDPOINTS=endpoints)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "comfyfleet", "serve", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
        error = stderr.decode()
        assert process.returncode != 0
        assert error.startswith("comfyfleet: COMFYUI_ENDPOINTS: ") and expected in error, error
        assert "Traceback" not in error and "s3cret" not in error

    # A process configured with a server the fleet already has under another name.
    registry = BackendRegistry(engine)
    await registry.add(Backend("gpu", "http://127.0.0.1:1"))
    with pytest.raises(BackendExists, match="fleet has it as 'gpu'"):
        await registry.seed([Backend("127.0.0.1:1", "http://127.0.0.1:1")])
    await registry.seed([Backend("gpu", "http://127.0.0.1:1")])  # the same name is fine


async def test_no_claim_on_a_drained_or_removed_backend_and_no_removal_with_work_on_it(
    engine: AsyncEngine,
) -> None:
    """What keeps a backend from being removed under a job another process sent, or is about
    to send, before that process has even heard of the drain."""
    registry, repository = BackendRegistry(engine), JobRepository(engine)
    await registry.seed([Backend("gpu", "http://127.0.0.1:1")])
    job, _ = await repository.insert(Job(workflow="w", prompt={}))

    async def claim() -> Job | None:
        return (await repository.claim_next(["gpu"], str(uuid.uuid4()), max_inflight=2,
                                            pick=lambda _, read: Choice(read.queued[0].id))).job

    await registry.set_draining("gpu", True)
    assert await claim() is None
    await registry.set_draining("gpu", False)
    claimed = await claim()
    assert claimed is not None and claimed.id == job.id
    await registry.set_draining("gpu", True)
    with pytest.raises(BackendBusy, match="1 jobs on it"):
        await registry.remove("gpu")
    assert await repository.requeue(claimed) is not None
    await registry.remove("gpu")
    assert await claim() is None  # gone from the fleet: nothing is sent there any more
    assert await registry.all() == []


async def test_a_backend_is_not_removed_under_a_job_another_process_sent(
    settings: Settings, data_root: Path
) -> None:
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        spare = await stack.enter_async_context(SimulatedComfyUI())
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateways = Gateways(stack, settings, data_root, sim.url)
        sender, sender_process = await gateways.start(http)
        # The sender's POST /prompt is on its way for a long while: it "has just sent" it.
        async with http.post(f"{sim.url}/_sim/faults", json={"prompt_delay": 60}) as response:
            assert response.status == 200
        body = {"workflow": "invert", "params": {"width": 8}}
        status, job = await call(http, "POST", f"{sender}/api/v1/jobs", body)
        assert status == 202
        await wait_for_job(http, f"{sender}/api/v1", job["id"], "dispatched")

        admin, _ = await gateways.start(http)
        status, _ = await call(http, "PATCH", f"{admin}/api/v1/backends/gpu", {"drain": True})
        assert status == 200
        status, answer = await call(http, "DELETE", f"{admin}/api/v1/backends/gpu")
        assert status == 409, "removed under the job the other process sent"
        assert answer["error"]["type"] == "backend_busy"
        assert "1 jobs on it" in answer["error"]["message"]

        sender_process.send_signal(signal.SIGKILL)  # its prompt never reaches the backend
        await sender_process.wait()
        status, _ = await call(http, "POST", f"{admin}/api/v1/backends",
                               {"url": spare.url, "name": "spare"})
        assert status == 201
        done = await wait_for_job(http, f"{admin}/api/v1", job["id"], "succeeded", "failed")
        assert (done["status"], done["backend"], done["attempts"]) == ("succeeded", "spare", 2)
        assert (await call(http, "DELETE", f"{admin}/api/v1/backends/gpu"))[0] == 204
        status, listed = await call(http, "GET", f"{admin}/api/v1/backends")
        assert [backend["name"] for backend in listed] == ["spare"]
