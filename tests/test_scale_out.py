"""Two comfyfleet processes on one database share the work: every job runs exactly once, and a
backend never holds more than MAX_INFLIGHT_PER_BACKEND prompts from both together."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp

from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.comfy.messages import Status, parse_text
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import (
    LOOPBACK,
    free_ports,
    python_process,
    serve_env,
    wait_for_healthy_backends,
    wait_for_job,
)

JOBS = 24


async def watch_queue(http: aiohttp.ClientSession, url: str, peaks: dict[str, int]) -> None:
    """Record the longest queue the backend reports (its broadcast `status`)."""
    async with http.ws_connect(f"{url}/ws", params={"clientId": uuid.uuid4().hex}) as ws:
        async for frame in ws:
            message = parse_text(frame.data) if frame.type == aiohttp.WSMsgType.TEXT else None
            if isinstance(message, Status) and message.queue_remaining is not None:
                peaks[url] = max(peaks.get(url, 0), message.queue_remaining)


async def test_two_processes_share_one_database_and_the_backend_slots(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    sim_port = free_ports(2)
    sims = [f"http://{LOOPBACK}:{sim_port + i}" for i in range(2)]
    ports = [free_ports(1), free_ports(1)]
    bases = [f"http://{LOOPBACK}:{port}" for port in ports]
    peaks: dict[str, int] = {}
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(python_process(
            "comfyfleet", "sim", "--backends", "2", "--port", str(sim_port), "--duration", "0.2",
            ready_url=sims[1] + "/prompt"))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        watchers = [asyncio.create_task(watch_queue(http, url, peaks)) for url in sims]
        for i, (port, base) in enumerate(zip(ports, bases, strict=True)):
            env = serve_env(
                settings, data_root / f"process{i}", port,
                COMFYUI_ENDPOINTS=",".join(f"{url}#gpu{n}" for n, url in enumerate(sims)))
            await stack.enter_async_context(
                python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz"))
        for base in bases:  # both have their backends before any work arrives
            await wait_for_healthy_backends(http, f"{base}/api/v1")
        ids = []
        for n in range(JOBS):
            body = {"workflow": "invert", "params": {"width": 8 + n},
                    "callback_url": receiver.url}
            async with http.post(f"{bases[n % 2]}/api/v1/jobs", json=body) as response:
                assert response.status == 202
                ids.append((await response.json())["id"])
        async with asyncio.timeout(60):
            await receiver.wait_for(JOBS)
        ran = 0
        for url in sims:
            async with http.get(f"{url}/history") as response:
                ran += len(await response.json())
        jobs = []
        for job_id in ids:
            async with http.get(f"{bases[0]}/api/v1/jobs/{job_id}") as response:
                jobs.append(await response.json())
        for watcher in watchers:
            watcher.cancel()
    assert sorted(event["data"]["id"] for event in receiver.verified) == sorted(ids)
    assert all(job["status"] == "succeeded" and job["attempts"] == 1 for job in jobs)
    assert ran == JOBS  # each prompt ran once, on one backend
    assert {job["backend"] for job in jobs} == {"gpu0", "gpu1"}
    assert peaks and max(peaks.values()) <= settings.max_inflight_per_backend


class Gateways:
    """`comfyfleet serve` processes on the test's database, all in front of one backend."""

    def __init__(self, stack: AsyncExitStack, settings: Settings, data_root: Path,
                 backend: str) -> None:
        self.stack, self.settings, self.data_root, self.backend = (
            stack, settings, data_root, backend)
        self.started = 0

    async def start(self, http: aiohttp.ClientSession, **overrides: str
                    ) -> tuple[str, asyncio.subprocess.Process]:
        """`overrides`: more settings of the process (see serve_env)."""
        port = free_ports(1)
        base = f"http://{LOOPBACK}:{port}"
        env = serve_env(self.settings, self.data_root / f"process{self.started}", port,
                        COMFYUI_ENDPOINTS=self.backend + "#gpu", **overrides)
        self.started += 1
        process = await self.stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz"))
        await wait_for_healthy_backends(http, f"{base}/api/v1")  # its reconciliation done
        return base, process


async def test_a_killed_process_jobs_are_taken_over_without_a_reconnect(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    async with AsyncExitStack() as stack:
        # Long enough for the second process to start while the job runs.
        sim = await stack.enter_async_context(SimulatedComfyUI(duration=10.0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateways = Gateways(stack, settings, data_root, sim.url)
        first, first_process = await gateways.start(http)
        body = {"workflow": "invert", "params": {"width": 8}, "callback_url": receiver.url}
        async with http.post(f"{first}/api/v1/jobs", json=body) as response:
            job_id = (await response.json())["id"]
        await wait_for_job(http, f"{first}/api/v1", job_id, "running")
        # Started only now, the second takes no part in it: the job is surely the first's.
        second, _ = await gateways.start(http)
        async with http.get(f"{second}/api/v1/jobs/{job_id}") as response:
            assert (await response.json())["status"] == "running"
        first_process.send_signal(signal.SIGKILL)
        await first_process.wait()

        # The backend never drops the second process's socket: only noticing that the first
        # process died can get this job collected.
        done = await wait_for_job(http, f"{second}/api/v1", job_id, "succeeded", "failed")
        await receiver.wait_for(1)
        async with http.get(f"{sim.url}/history") as response:
            ran = len(await response.json())
    assert (done["status"], done["attempts"], ran) == ("succeeded", 1, 1)
    assert [event["type"] for event in receiver.verified] == ["job.succeeded"]


async def test_a_prompt_another_live_process_is_sending_is_left_to_it(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateways = Gateways(stack, settings, data_root, sim.url)
        first, _ = await gateways.start(http)
        # The first process's POST /prompt hangs at the backend until the second process has
        # started and looked at the job, however long that takes (the fault holds it until
        # cleared; the first gives up on a POST after 30 s).
        async with http.post(f"{sim.url}/_sim/faults", json={"prompt_delay": 600}) as response:
            assert response.status == 200
        body = {"workflow": "invert", "params": {"width": 8}, "callback_url": receiver.url}
        async with http.post(f"{first}/api/v1/jobs", json=body) as response:
            job_id = (await response.json())["id"]
        await wait_for_job(http, f"{first}/api/v1", job_id, "dispatched")
        # Its prompt is in neither /queue nor /history yet: from here it looks lost.
        second, _ = await gateways.start(http)
        async with http.get(f"{second}/api/v1/jobs/{job_id}") as response:
            assert (await response.json())["status"] == "dispatched"  # not requeued
        async with http.post(f"{sim.url}/_sim/faults", json={"prompt_delay": None}) as response:
            assert response.status == 200

        done = await wait_for_job(http, f"{first}/api/v1", job_id, "succeeded", "failed")
        await receiver.wait_for(1)
        async with http.get(f"{sim.url}/history") as response:
            ran = len(await response.json())
    assert (done["status"], done["attempts"], ran) == ("succeeded", 1, 1)


async def test_a_job_queued_through_one_process_is_dispatched_by_another_at_once(
    settings: Settings, data_root: Path
) -> None:
    """The process a job is submitted to has no free slot; the other one, told by the
    database as the job commits, claims it at once, not at its next safety pass."""
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(duration=30.0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateways = Gateways(stack, settings, data_root, sim.url)
        # The safety pass comes long after the test is over: only a wake-up can dispatch.
        full, _ = await gateways.start(http, MAX_INFLIGHT_PER_BACKEND="1", DISPATCH_INTERVAL="60")
        free, _ = await gateways.start(http, MAX_INFLIGHT_PER_BACKEND="2", DISPATCH_INTERVAL="60")
        body = {"workflow": "invert", "params": {"width": 8}}
        async with http.post(f"{free}/api/v1/jobs", json=body) as response:
            first = (await response.json())["id"]
        # On the backend (whichever process took it): the first process takes no second job.
        await wait_for_job(http, f"{free}/api/v1", first, "running")
        submitted = time.monotonic()
        async with http.post(f"{full}/api/v1/jobs", json={**body, "params": {"width": 9}}
                             ) as response:
            second = (await response.json())["id"]
        job = await wait_for_job(http, f"{free}/api/v1", second, "dispatched", "running",
                                 seconds=10)
        waited = time.monotonic() - submitted
    assert job["backend"] == "gpu"
    assert waited < 1.0  # 30 to 130 ms here; up to DISPATCH_INTERVAL before
