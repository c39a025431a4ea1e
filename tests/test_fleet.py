"""The fleet as the API sees it: cancel in each state, drain, add and remove backends, and
jobs moving elsewhere when a backend stays away."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import LOOPBACK, free_ports, python_process, wait_for_job

SLOW = 20.0  # seconds a prompt takes where a test must catch it queued or running


class Api:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, self.base + path, json=body) as response:
            payload = await response.json() if response.status != 204 else None
            return response.status, payload

    async def submit(self, callback: str | None = None, width: int = 16) -> str:
        status, job = await self.call("POST", "/jobs", {
            "workflow": "invert", "params": {"width": width}, "callback_url": callback})
        assert status == 202, job
        return str(job["id"])

    async def job(self, job_id: str) -> dict[str, Any]:
        status, job = await self.call("GET", f"/jobs/{job_id}")
        assert status == 200
        return dict(job)


@pytest.fixture
async def slow_sim() -> AsyncIterator[SimulatedComfyUI]:
    async with SimulatedComfyUI(duration=SLOW) as sim:
        yield sim


async def sim_queue(sim: SimulatedComfyUI) -> dict[str, list[Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{sim.url}/queue") as response:
        queue: dict[str, list[Any]] = await response.json()
        return queue


async def wait_until_idle(sim: SimulatedComfyUI) -> None:
    async with asyncio.timeout(10):
        while any((await sim_queue(sim)).values()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # polling the backend: no local event to wait on


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        yield Api(http, base + settings.route_prefix)


async def test_cancel_a_queued_job(api: Api, receiver: WebhookReceiver) -> None:
    job_id = await api.submit(receiver.url)  # no backends: it stays queued
    status, job = await api.call("POST", f"/jobs/{job_id}/cancel")
    assert status == 200
    assert job["status"] == "cancelled"
    assert job["error"]["type"] == "cancelled"
    async with asyncio.timeout(10):
        await receiver.wait_for(1)
    assert receiver.verified[0]["type"] == "job.cancelled"
    status, again = await api.call("DELETE", f"/jobs/{job_id}")  # idempotent: same answer
    assert (status, again["status"]) == (200, "cancelled")
    # And no second event: a webhook is due only in the transaction that ends the job.
    status, log = await api.call("GET", f"/jobs/{job_id}/deliveries")
    assert (status, len(log["deliveries"])) == (200, 1)
    assert len(receiver.verified) == 1


async def test_cancel_unknown_job_is_404(api: Api) -> None:
    status, body = await api.call("POST", "/jobs/6f1c0b7a-9e31-4b2f-8e1c-62a34c559d2e/cancel")
    assert status == 404
    assert body["error"]["type"] == "job_not_found"


async def test_cancel_running_interrupts_and_cancel_dispatched_dequeues(
    settings: Settings, slow_sim: SimulatedComfyUI, receiver: WebhookReceiver
) -> None:
    settings.comfyui_endpoints = [slow_sim.url + "#slow"]
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        api = Api(http, base + settings.route_prefix)
        running = await api.submit(receiver.url)
        await wait_for_job(api.http, api.base, running, "running")
        pending = await api.submit(receiver.url)  # the backend's second slot: queued there
        await wait_for_job(api.http, api.base, pending, "dispatched")
        assert len((await sim_queue(slow_sim))["queue_pending"]) == 1

        status, job = await api.call("DELETE", f"/jobs/{pending}")
        assert (status, job["status"]) == (200, "cancelled")
        status, job = await api.call("POST", f"/jobs/{running}/cancel")
        assert (status, job["status"]) == (200, "cancelled")
        await wait_until_idle(slow_sim)  # interrupted long before its 20 s were up

        async with asyncio.timeout(10):
            await receiver.wait_for(2)
        for job_id in (running, pending):
            assert (await api.job(job_id))["status"] == "cancelled"
    assert sorted(e["type"] for e in receiver.verified) == ["job.cancelled", "job.cancelled"]


async def test_drain_enable_add_and_remove_backends(settings: Settings) -> None:
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(SimulatedComfyUI())
        second = await stack.enter_async_context(SimulatedComfyUI())
        settings.comfyui_endpoints = [first.url + "#first"]
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        api = Api(http, base + settings.route_prefix)

        status, added = await api.call("POST", "/backends", {"url": second.url, "name": "second"})
        assert (status, added["name"]) == (201, "second")
        status, body = await api.call("POST", "/backends", {"url": second.url, "name": "second"})
        assert (status, body["error"]["type"]) == (409, "backend_exists")
        status, body = await api.call("POST", "/backends", {"url": "ftp://nope"})
        assert (status, body["error"]["type"]) == (422, "invalid_backend")

        status, drained = await api.call("PATCH", "/backends/first", {"drain": True})
        assert (status, drained["draining"]) == (200, True)
        status, body = await api.call("DELETE", "/backends/second")
        assert (status, body["error"]["type"]) == (409, "backend_busy")  # not drained

        ran_on = [(await wait_for_job(http, api.base, await api.submit(), "succeeded"))["backend"]
                  for _ in range(3)]
        assert ran_on == ["second"] * 3  # nothing goes to a draining backend
        finished = await wait_for_job(api.http, api.base, await api.submit(), "succeeded")
        status, body = await api.call("POST", f"/jobs/{finished['id']}/cancel")
        assert (status, body["error"]["type"]) == (409, "job_finished")

        await api.call("PATCH", "/backends/second", {"drain": True})
        waiting = await api.submit()  # the dispatcher looks at once, and must leave it
        queued = await wait_for_job(api.http, api.base, waiting, "queued")
        assert queued["status"] == "queued", queued
        assert "first is draining; second is draining" in queued["waiting"]
        undrained = datetime.now(UTC)
        await api.call("PATCH", "/backends/first", {"drain": False})
        done = await wait_for_job(api.http, api.base, waiting, "succeeded")
        assert done["backend"] == "first"
        # Queued until a backend took work again: not sent anywhere while every one drained.
        assert datetime.fromisoformat(done["dispatched_at"]) >= undrained

        assert await api.call("DELETE", "/backends/second") == (204, None)
        status, listed = await api.call("GET", "/backends")
        assert status == 200
        assert [b["name"] for b in listed] == ["first"]
        assert listed[0]["healthy"] is True
        status, body = await api.call("DELETE", "/backends/second")
        assert (status, body["error"]["type"]) == (404, "backend_not_found")


async def test_a_queued_job_says_why_it_waits(settings: Settings) -> None:
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        nothing_there = free_ports(1)
        settings.comfyui_endpoints = [sim.url + "#up", f"http://{LOOPBACK}:{nothing_there}#down"]
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        api = Api(http, base + settings.route_prefix)
        await wait_until_connected(api, "up")
        await api.call("PATCH", "/backends/up", {"drain": True})

        job = await api.job(await api.submit())
        assert job["status"] == "queued"
        assert job["waiting"].startswith("every backend that can run it is out of service")
        assert "up is draining" in job["waiting"]
        assert "down has not connected yet" in job["waiting"]

        await api.call("PATCH", "/backends/up", {"drain": False})
        done = await wait_for_job(api.http, api.base, job["id"], "succeeded")
        assert done["waiting"] is None


async def test_a_prompt_cleared_from_the_backend_queue_runs_again(
    settings: Settings, receiver: WebhookReceiver
) -> None:
    settings.quiet_prompt_seconds = 1.0
    async with SimulatedComfyUI(duration=2.0) as sim:
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            api = Api(http, base + settings.route_prefix)
            running = await api.submit(receiver.url)
            await wait_for_job(api.http, api.base, running, "running")
            pending = await api.submit(receiver.url, width=24)
            await wait_for_job(api.http, api.base, pending, "dispatched")
            # Another client of that ComfyUI clears its queue: no event tells us.
            async with http.post(f"{sim.url}/queue", json={"clear": True}) as response:
                assert response.status == 200
            assert (await sim_queue(sim))["queue_pending"] == []

            again = await wait_for_job(api.http, api.base, pending, "succeeded")
            assert again["attempts"] == 2
            assert (await wait_for_job(api.http, api.base, running, "succeeded"))["attempts"] == 1
            await receiver.wait_for(2)
    assert sorted(e["type"] for e in receiver.verified) == ["job.succeeded"] * 2


async def wait_until_connected(api: Api, name: str) -> None:
    async with asyncio.timeout(10):
        while not any(b["name"] == name and b["capabilities"]  # noqa: ASYNC110
                      for b in (await api.call("GET", "/backends"))[1]):
            await asyncio.sleep(0.05)  # polling the API: no local event to wait on


async def test_a_backend_is_healthy_only_while_its_system_stats_answer(
    settings: Settings,
) -> None:
    """DESIGN §7: healthy = its websocket up and /system_stats answering. The simulator's
    /system_stats fails while its socket and every other route work."""
    async with SimulatedComfyUI() as sim, aiohttp.ClientSession() as http:
        async def stats_answer(status: int | None) -> None:
            async with http.post(f"{sim.url}/_sim/faults",
                                 json={"system_stats_status": status}) as response:
                assert response.status == 200

        async def until_backend(healthy: bool, error: str | None) -> dict[str, Any]:
            async with asyncio.timeout(30):
                while True:
                    (backend,) = (await client.call("GET", "/backends"))[1]
                    if (backend["healthy"], backend["last_error"]) == (healthy, error):
                        return dict(backend)
                    await asyncio.sleep(0.05)  # polling the API: no local event to wait on

        await stats_answer(500)  # from the start: it never becomes healthy
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        async with serving(settings) as base:
            client = Api(http, base + settings.route_prefix)
            await until_backend(False, "GET /system_stats: HTTP 500")
            job = await client.job(await client.submit())
            assert "gpu has not connected yet (GET /system_stats: HTTP 500)" in job["waiting"]
            await stats_answer(None)
            first = await wait_for_job(http, client.base, job["id"], "succeeded")
            assert first["backend"] == "gpu"

            await stats_answer(503)  # connected, its socket up: it stops being healthy
            await until_backend(False, "GET /system_stats: HTTP 503")
            waiting = await client.job(await client.submit())
            assert waiting["status"] == "queued"
            assert "gpu unreachable for" in waiting["waiting"]
            assert "(GET /system_stats: HTTP 503)" in waiting["waiting"]
            await stats_answer(None)
            await until_backend(True, None)
            done = await wait_for_job(http, client.base, waiting["id"], "succeeded")
    assert (done["backend"], done["attempts"]) == ("gpu", 1)


@pytest.mark.parametrize(("max_attempts", "outcome"), [(3, "succeeded"), (1, "failed")])
async def test_backend_gone_for_good_hands_its_job_to_another(
    settings: Settings, max_attempts: int, outcome: str
) -> None:
    port = free_ports(1)
    async with AsyncExitStack() as stack:
        doomed = await stack.enter_async_context(python_process(
            "comfyfleet", "sim", "--port", str(port), "--duration", str(SLOW),
            ready_url=f"http://{LOOPBACK}:{port}/prompt"))
        settings.comfyui_endpoints = [f"{LOOPBACK}:{port}#doomed"]
        settings.backend_grace_seconds = 1.0
        settings.max_attempts = max_attempts
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        api = Api(http, base + settings.route_prefix)
        job_id = await api.submit()
        await wait_for_job(api.http, api.base, job_id, "running")
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
        healthy = await stack.enter_async_context(SimulatedComfyUI())
        await api.call("POST", "/backends", {"url": healthy.url, "name": "healthy"})
        job = await wait_for_job(api.http, api.base, job_id, "succeeded", "failed")
    assert job["status"] == outcome
    if outcome == "succeeded":
        assert (job["backend"], job["attempts"]) == ("healthy", 2)
    else:
        assert job["error"]["type"] == "backend_lost"
        assert "doomed unreachable" in job["error"]["message"]


@pytest.mark.parametrize(("losses", "outcome"), [(2, "succeeded"), (3, "failed")])
async def test_max_attempts_counts_every_backend_loss(
    settings: Settings, receiver: WebhookReceiver, losses: int, outcome: str
) -> None:
    """The backend restarts under the job again and again, each time losing the prompt it
    was running: each loss spends one of MAX_ATTEMPTS, and the last one fails the job."""
    settings.max_attempts = 3
    async with SimulatedComfyUI(duration=2.0) as sim:
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            api = Api(http, base + settings.route_prefix)
            job_id = await api.submit(receiver.url)
            lost: list[str] = []
            for _ in range(losses):
                lost.append(await prompt_running_anew(sim, lost))
                await sim.crash_and_restart()  # queue and history gone: the prompt is lost
            job = await wait_for_job(http, api.base, job_id)
            await receiver.wait_for(1)
            history = await sim_history(sim)
    assert (job["status"], job["attempts"]) == (outcome, 3), job
    assert job["prompt_id"] not in lost[:2]  # every attempt ran under a prompt id of its own
    assert [event["type"] for event in receiver.verified] == [f"job.{outcome}"]
    if outcome == "succeeded":
        assert list(history) == [job["prompt_id"]]
    else:
        assert job["error"]["type"] == "backend_lost"
        assert job["error"]["message"] == (
            "backend gpu lost the prompt (attempt 3); no attempts left")
        assert history == {}


async def prompt_running_anew(sim: SimulatedComfyUI, seen: list[str]) -> str:
    """The id of the prompt the backend runs once it runs one not in `seen`."""
    async with asyncio.timeout(20):
        while True:
            running = [item[1] for item in (await sim_queue(sim))["queue_running"]]
            fresh = [prompt_id for prompt_id in running if prompt_id not in seen]
            if fresh:
                return str(fresh[0])
            await asyncio.sleep(0.05)  # polling the backend: no local event to wait on


async def sim_history(sim: SimulatedComfyUI) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{sim.url}/history") as response:
        history: dict[str, Any] = await response.json()
        return history


async def test_silent_socket_is_caught_by_the_history_check(settings: Settings) -> None:
    """The backend runs the prompt but its websocket says nothing (a hung socket)."""
    settings.quiet_prompt_seconds = 1.0
    async with SimulatedComfyUI(hang=True) as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            api = Api(http, base + settings.route_prefix)
            job = await wait_for_job(api.http, api.base, await api.submit(), "succeeded", "failed")
    assert job["status"] == "succeeded"
    assert len(job["outputs"]) == 1


async def test_dropped_websocket_mid_job_reconnects_and_the_job_finishes(
    settings: Settings,
) -> None:
    async with SimulatedComfyUI(duration=1.5) as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            api = Api(http, base + settings.route_prefix)
            job_id = await api.submit()
            await wait_for_job(api.http, api.base, job_id, "running")
            sim.drop_websockets()
            job = await wait_for_job(api.http, api.base, job_id, "succeeded", "failed")
    assert (job["status"], job["attempts"]) == ("succeeded", 1)  # followed, not rerun


async def test_every_process_shares_the_fleet_and_it_outlives_them(settings: Settings) -> None:
    async def names(api: Api) -> dict[str, bool]:
        status, listed = await api.call("GET", "/backends")
        assert status == 200
        return {backend["name"]: backend["draining"] for backend in listed}

    async def until(api: Api, expected: dict[str, bool]) -> None:
        async with asyncio.timeout(10):  # each process re-reads the fleet every 2 s
            while await names(api) != expected:  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # polling the API: no local event to wait on

    async with AsyncExitStack() as stack:
        one = await stack.enter_async_context(SimulatedComfyUI())
        two = await stack.enter_async_context(SimulatedComfyUI())
        http = await stack.enter_async_context(aiohttp.ClientSession())
        configured = settings.model_copy(update={"comfyui_endpoints": [one.url + "#one"]})
        async with serving(configured) as base_a:
            first = Api(http, base_a + settings.route_prefix)
            async with serving(settings) as base_b:  # configured with no backend at all
                second = Api(http, base_b + settings.route_prefix)
                assert await names(second) == {"one": False}
                status, _ = await first.call("POST", "/backends", {"url": two.url, "name": "two"})
                assert status == 201
                await until(second, {"one": False, "two": False})
                await second.call("PATCH", "/backends/one", {"drain": True})
                await until(first, {"one": True, "two": False})
                ran_on = await wait_for_job(http, first.base, await first.submit(), "succeeded")
                assert ran_on["backend"] == "two"
        async with serving(configured) as base_a:  # restarted: the fleet is as it was left
            first = Api(http, base_a + settings.route_prefix)
            assert await names(first) == {"one": True, "two": False}
            await first.call("PATCH", "/backends/two", {"drain": True})
            assert (await first.call("DELETE", "/backends/two"))[0] == 204
            assert await names(first) == {"one": True}


async def test_the_backlog_runs_highest_priority_first_then_oldest(settings: Settings) -> None:
    settings.max_inflight_per_backend = 1  # one at a time: the order of dispatch is plain
    priorities = [0, 5, -3, 5, 1000, 0, -1000]
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        api = Api(http, base + settings.route_prefix)
        ids = []
        for n, priority in enumerate(priorities):  # no backend yet: every one waits
            status, job = await api.call("POST", "/jobs", {
                "workflow": "invert", "params": {"width": 16 + n}, "priority": priority})
            assert (status, job["priority"]) == (202, priority), job
            ids.append(job["id"])
        async with SimulatedComfyUI() as sim:
            status, _ = await api.call("POST", "/backends", {"url": sim.url, "name": "gpu"})
            assert status == 201
            jobs = [await wait_for_job(http, api.base, job_id, "succeeded") for job_id in ids]
    ran = [job["id"] for job in sorted(jobs, key=lambda job: job["dispatched_at"])]
    # Highest priority first; equal priorities in the order they came.
    expected = sorted(range(len(ids)), key=lambda n: (-priorities[n], n))
    assert ran == [ids[n] for n in expected]
    assert all(job["attempts"] == 1 for job in jobs)
