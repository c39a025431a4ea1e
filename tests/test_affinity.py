"""Cache-aware placement over real sockets: a backend with a free slot takes the queued job it
runs soonest from what its cache holds (its model loaded), within AFFINITY_WINDOW: no job is
passed by more than that many later jobs (one passed that often goes next, to the backend
holding its model when waiting for that one is sooner), and priorities hold; a job held back
for the backend holding its model still runs when that backend is killed or the service
restarts, and one that others overtook can be cancelled.

Simulated ComfyUI servers with a loader that takes time unless cached (SimulatedLoader), one
prompt per backend at a time so that the order of dispatch is the order of choice.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.metrics import REGISTRY
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import LOOPBACK, free_ports, python_process, wait_for_healthy_backends
from tests.test_warm_cache import Gateway, behind_our_back

LOAD = 0.5  # seconds SimulatedLoader takes when not cached
A, B = "model-a.safetensors", "model-b.safetensors"


def served_from_cache(entry: dict[str, Any]) -> list[str]:
    (nodes,) = [data["nodes"] for kind, data in entry["status"]["messages"]
                if kind == "execution_cached"]
    return list(nodes)


@pytest.mark.parametrize("window", [0, 4])
async def test_a_job_goes_where_its_model_is_loaded(
    window: int, settings: Settings
) -> None:
    settings.affinity_window = window
    async with AsyncExitStack() as stack:
        # Backend a loads model a, backend b model b.
        gateway = await two_warm_backends(stack, settings, load=LOAD)
        # Both busy on their own model, a for less long; then a job for b, one for a.
        busy_a = await gateway.submit(A, seconds=2.0)
        await gateway.reached(busy_a, "running")
        busy_b = await gateway.submit(B, seconds=6.0)
        await gateway.reached(busy_b, "running")
        job_b = await gateway.submit(B)
        job_a = await gateway.submit(A)
        jobs = {name: await gateway.finished(job_id) for name, job_id in
                [("busy_a", busy_a), ("busy_b", busy_b), ("b", job_b), ("a", job_a)]}
        a_cached = jobs["a"]["backend"] == "a" and await loader_cached(gateway, jobs["a"])
    assert (jobs["busy_a"]["backend"], jobs["busy_b"]["backend"]) == ("a", "b")
    if window == 0:
        # FIFO: backend a, free first, takes the job for b and loads model b; the job for a
        # then has to load model a again.
        assert jobs["b"]["dispatched_at"] < jobs["a"]["dispatched_at"]
        assert not a_cached
    else:
        # The job for a goes first, to backend a, where its model is loaded.
        assert jobs["a"]["dispatched_at"] < jobs["b"]["dispatched_at"]
        assert jobs["a"]["backend"] == "a" and a_cached


@pytest.mark.parametrize(("window", "expected"), [
    (0, ["b1", "a1", "a2", "a3", "low_b"]),
    (1, ["a1", "b1", "a2", "a3", "low_b"]),
    (2, ["a1", "a2", "b1", "a3", "low_b"]),
])
async def test_no_job_is_overtaken_more_than_the_window_and_priorities_hold(
    window: int, expected: list[str], settings: Settings
) -> None:
    settings.max_inflight_per_backend = 1
    settings.affinity_window = window
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(load_seconds=LOAD))
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateway = Gateway(http, base + settings.route_prefix)
        await gateway.run(A)  # model a loaded, and what a load costs learned
        busy = await gateway.submit(A, seconds=2.0)
        await gateway.reached(busy, "running")
        # Queued behind it: one job for b, three for a, and a job for b of lower priority
        # (cheap once b is loaded, yet never before a job of higher priority). Drained
        # meanwhile, so the order is chosen among all five however long submitting takes.
        await gateway.call("PATCH", "/backends/gpu", {"drain": True})
        queued = {"b1": await gateway.submit(B), "a1": await gateway.submit(A),
                  "a2": await gateway.submit(A), "a3": await gateway.submit(A),
                  "low_b": await gateway.submit(B, priority=-1)}
        await gateway.call("PATCH", "/backends/gpu", {"drain": False})
        await gateway.finished(busy)
        jobs = {name: await gateway.finished(job_id) for name, job_id in queued.items()}
    assert sorted(jobs, key=lambda name: jobs[name]["dispatched_at"]) == expected


async def test_backends_whose_cache_is_unknown_take_a_burst_of_one_workflow(
    settings: Settings,
) -> None:
    """Four backends already hold model a (another client ran it): this process's model of
    their caches says they hold nothing, and the loader's cost is a guess that no run
    measures, for every backend serves it from its cache. Short jobs for a: a backend that
    waited for the one seen to hold a would wait for ever (its guessed 5 s load never looked
    worth it); each in turn tries one, finds a loaded, and all four share the burst."""
    settings.max_inflight_per_backend = 2
    settings.affinity_window = 4
    async with AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(SimulatedComfyUI(load_seconds=2.0))
                for _ in range(4)]
        for sim in sims:
            await behind_our_back(sim, A)
        settings.comfyui_endpoints = [f"{sim.url}#gpu{index}" for index, sim in enumerate(sims)]
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateway = Gateway(http, base + settings.route_prefix)
        await wait_for_healthy_backends(http, gateway.base)
        # A little work each, none the same (the same would be served from the cache).
        queued = await asyncio.gather(*(gateway.submit(A, seconds=0.3 + index / 1000)
                                        for index in range(16)))
        jobs = [await gateway.finished(job_id) for job_id in queued]
        cached = [await loader_cached(gateway, job) for job in jobs]
    assert {job["backend"] for job in jobs} == {f"gpu{index}" for index in range(4)}
    assert all(cached)  # no backend loaded it


async def two_warm_backends(stack: AsyncExitStack, settings: Settings,
                            load: float, max_inflight: int = 1) -> Gateway:
    """Backends a and b, `max_inflight` prompts each at a time (one unless told), a holding
    model a and b model b."""
    settings.max_inflight_per_backend = max_inflight
    sim_a = await stack.enter_async_context(SimulatedComfyUI(load_seconds=load))
    sim_b = await stack.enter_async_context(SimulatedComfyUI(load_seconds=load))
    settings.comfyui_endpoints = [sim_a.url + "#a", sim_b.url + "#b"]
    base = await stack.enter_async_context(serving(settings))
    http = await stack.enter_async_context(aiohttp.ClientSession())
    gateway = Gateway(http, base + settings.route_prefix)
    await warm(gateway)
    return gateway


async def warm(gateway: Gateway) -> None:
    """Backend a loads model a, b model b (and what a load costs is learned)."""
    for model, other in [(A, "b"), (B, "a")]:
        await gateway.call("PATCH", f"/backends/{other}", {"drain": True})
        await gateway.run(model)
        await gateway.call("PATCH", f"/backends/{other}", {"drain": False})


async def loader_cached(gateway: Gateway, job: dict[str, Any]) -> bool:
    """Whether the backend that ran `job` served its loader from its cache."""
    backends = await gateway.call("GET", "/backends")
    (url,) = [backend["url"] for backend in backends if backend["name"] == job["backend"]]
    async with aiohttp.ClientSession() as http, \
            http.get(f"{url}/history/{job['prompt_id']}") as response:
        entry: dict[str, Any] = (await response.json())[job["prompt_id"]]
    return "1" in served_from_cache(entry)


@pytest.mark.parametrize(("busy_seconds", "runs_on"), [(0.3, "a"), (6.0, "b")])
async def test_a_job_waits_for_the_backend_holding_its_model_only_when_that_is_sooner(
    busy_seconds: float, runs_on: str, settings: Settings
) -> None:
    """Backend a holds the job's model but is busy; b is idle and would have to load it (2 s).
    Shortly busy, a finishes the job sooner: the job waits for it. Busy for long (its
    progress shows it), loading on b is sooner: b takes the job."""
    settings.affinity_window = 4
    async with AsyncExitStack() as stack:
        gateway = await two_warm_backends(stack, settings, load=2.0)
        busy = await gateway.submit(A, seconds=busy_seconds, steps=20)
        await gateway.reached(busy, "running")
        job = await gateway.finished(await gateway.submit(A))
        cached = await loader_cached(gateway, job)
    assert (job["backend"], cached) == (runs_on, runs_on == "a")


@pytest.mark.parametrize(("window", "busy_seconds", "runs_on"), [(2, 4.0, "a"), (1, 10.0, "b")])
async def test_a_job_waiting_for_its_warm_backend_is_passed_at_most_the_window(
    window: int, busy_seconds: float, runs_on: str, settings: Settings,
) -> None:
    """Backend b, free, takes the jobs for its own model b past the job for model a queued
    before them, which waits for backend a, busy, that holds model a: `window` of them, no
    more (counted from the dispatch times, not from the count the bound keeps).
    Then the job for a goes where it finishes sooner: to a, shortly busy, while b waits
    rather than pass it again; or to b, which loads model a, when a is busy for long (its
    progress shows it). The rest of the jobs for b follow. (The bound was two-level: a job
    waiting for its warm backend could be passed 8 times the window.)"""
    settings.affinity_window = window
    async with AsyncExitStack() as stack:
        gateway = await two_warm_backends(stack, settings, load=3.0)
        busy = await gateway.submit(A, seconds=busy_seconds, steps=20)
        await gateway.reached(busy, "running")
        names = ["a1", *(f"b{i}" for i in range(1, 9))]
        queued = await queued_while_b_is_drained(
            gateway, {name: A if name == "a1" else B for name in names})
        jobs = {name: await gateway.finished(job_id) for name, job_id in queued.items()}
        cached = await loader_cached(gateway, jobs["a1"])
    order = sorted(jobs, key=lambda name: jobs[name]["dispatched_at"])
    assert order.index("a1") == window
    assert order == [*(f"b{i}" for i in range(1, window + 1)), "a1",
                     *(f"b{i}" for i in range(window + 1, 9))]
    assert (jobs["a1"]["backend"], cached) == (runs_on, runs_on == "a")


async def queued_while_b_is_drained(gateway: Gateway, models: dict[str, str]) -> dict[str, str]:
    """Jobs for `models` (by name), all queued before backend b looks at any of them."""
    await gateway.call("PATCH", "/backends/b", {"drain": True})
    queued = {name: await gateway.submit(model) for name, model in models.items()}
    await gateway.call("PATCH", "/backends/b", {"drain": False})
    return queued


async def test_the_rebalancer_leaves_a_prompt_queued_where_its_model_is_loaded(
    settings: Settings,
) -> None:
    """A job for model a waits in backend a's queue behind a 2 s prompt; backend b is idle but
    would first load model a (4 s). Moving it to b would only make it later: it stays. (By
    run times per workflow, b looked as fast as a for it and a busy for 4 s more: it moved.)"""
    settings.affinity_window = 4
    async with AsyncExitStack() as stack:
        gateway = await two_warm_backends(stack, settings, load=4.0, max_inflight=2)
        busy = await gateway.submit(A, seconds=2.0, steps=20)
        await gateway.reached(busy, "running")
        queued = await gateway.submit(A, seconds=0.5)
        job = await gateway.finished(queued)
        cached = await loader_cached(gateway, job)
        busy_job = await gateway.finished(busy)
    assert (busy_job["backend"], job["backend"], job["attempts"], cached) == ("a", "a", 1, True)


def waits_for_warm() -> float:
    """How many claims of this process found every job sooner on a backend holding its model."""
    return REGISTRY.get_sample_value("comfyfleet_dispatch_claims_total",
                                     {"outcome": "waits_for_warm"}) or 0.0


async def held_back(gateway: Gateway, busy_seconds: float) -> tuple[str, str]:
    """Backends a and b warmed (a holding model a, b model b), a busy for `busy_seconds` on
    model a, and a job for model a that idle b has left queued to wait for a: their ids."""
    await warm(gateway)
    busy = await gateway.submit(A, seconds=busy_seconds)
    await gateway.reached(busy, "running")
    claims_before = waits_for_warm()
    job_id = await gateway.submit(A)
    async with asyncio.timeout(10):
        # An in-process counter: no event to wait on.
        while waits_for_warm() == claims_before:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert (await gateway.call("GET", f"/jobs/{job_id}"))["status"] == "queued"
    return busy, job_id


@pytest.mark.parametrize("leaves", ["killed", "drained"])
async def test_a_job_waiting_for_its_warm_backend_runs_elsewhere_once_that_backend_leaves(
    leaves: str, settings: Settings,
) -> None:
    """Backend a holds model a and is busy; the job for a waits for it rather than load the
    model on idle b. a leaves service: the job goes to b at once, not at the dispatcher's next
    safety pass. Killed, a's prompt is requeued once a stays away past the grace and runs on
    b; drained, it finishes on a. Both jobs succeed."""
    settings.affinity_window = 4
    settings.max_inflight_per_backend = 1
    settings.backend_grace_seconds = 1.0
    settings.dispatch_interval = 60.0  # longer than the test waits
    port = free_ports(1)
    async with AsyncExitStack() as stack:
        doomed = await stack.enter_async_context(python_process(
            "comfyfleet", "sim", "--port", str(port), "--load-seconds", str(2.0),
            ready_url=f"http://{LOOPBACK}:{port}/prompt"))
        sim_b = await stack.enter_async_context(SimulatedComfyUI(load_seconds=2.0))
        settings.comfyui_endpoints = [f"{LOOPBACK}:{port}#a", sim_b.url + "#b"]
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateway = Gateway(http, base + settings.route_prefix)
        busy, job_id = await held_back(gateway, 6.0)
        if leaves == "killed":
            doomed.send_signal(signal.SIGKILL)
            await doomed.wait()
        else:
            await gateway.call("PATCH", "/backends/a", {"drain": True})
        job = await gateway.finished(job_id)
        busy_job = await gateway.finished(busy)
    assert (job["backend"], job["attempts"]) == ("b", 1)
    if leaves == "killed":
        # Sent to b before a's prompt came back to the backlog (the grace past).
        assert (busy_job["backend"], busy_job["attempts"]) == ("b", 2)
        assert job["dispatched_at"] < busy_job["dispatched_at"]
    else:
        # Sent to b while a's prompt still ran there.
        assert (busy_job["backend"], busy_job["attempts"]) == ("a", 1)
        assert job["dispatched_at"] < busy_job["uploading_at"]


async def test_a_job_held_back_for_its_warm_backend_survives_a_restart_of_the_service(
    settings: Settings,
) -> None:
    """The job for model a waits (queued) for busy backend a; the service stops and another
    starts, knowing nothing of either cache: the job runs, and a's prompt, which went on
    meanwhile, is taken up where it ran, not run again."""
    settings.affinity_window = 4
    settings.max_inflight_per_backend = 1
    async with AsyncExitStack() as stack:
        sim_a = await stack.enter_async_context(SimulatedComfyUI(load_seconds=2.0))
        sim_b = await stack.enter_async_context(SimulatedComfyUI(load_seconds=2.0))
        settings.comfyui_endpoints = [sim_a.url + "#a", sim_b.url + "#b"]
        http = await stack.enter_async_context(aiohttp.ClientSession())
        async with serving(settings) as base:
            busy, job_id = await held_back(Gateway(http, base + settings.route_prefix), 3.0)
        async with serving(settings) as base:
            gateway = Gateway(http, base + settings.route_prefix)
            job = await gateway.finished(job_id)
            busy_job = await gateway.finished(busy)
    assert job["attempts"] == 1
    assert (busy_job["backend"], busy_job["attempts"]) == ("a", 1)


async def test_a_job_others_overtook_while_it_waited_for_its_warm_backend_can_be_cancelled(
    settings: Settings,
) -> None:
    """The job for model a waits for busy backend a while b runs a job for b queued after it;
    cancelled then, it never runs: a takes nothing once free, and the others succeed."""
    settings.affinity_window = 1
    async with AsyncExitStack() as stack:
        gateway = await two_warm_backends(stack, settings, load=2.0)
        busy = await gateway.submit(A, seconds=3.0)
        await gateway.reached(busy, "running")
        await gateway.call("PATCH", "/backends/b", {"drain": True})
        a1, b1 = await gateway.submit(A), await gateway.submit(B, seconds=1.0)
        await gateway.call("PATCH", "/backends/b", {"drain": False})
        await gateway.reached(b1, "running")
        cancelled = await gateway.call("POST", f"/jobs/{a1}/cancel")
        jobs = {name: await gateway.finished(job_id)
                for name, job_id in [("busy", busy), ("b1", b1)]}
        # Backend a, free again, has nothing of ours, and the job never reached a backend.
        after = await gateway.call("GET", f"/jobs/{a1}")
        backends = {backend["name"]: backend for backend in await gateway.call("GET", "/backends")}
    assert cancelled["status"] == after["status"] == "cancelled"
    assert (after["dispatched_at"], after["backend"], after["prompt_id"]) == (None, None, None)
    assert (jobs["busy"]["backend"], jobs["b1"]["backend"]) == ("a", "b")
    assert backends["a"]["inflight"] == 0
