"""Cache-aware placement over real sockets: a backend with a free slot takes the queued job it
runs soonest from what its cache holds (its model loaded), within AFFINITY_WINDOW; no job is
passed by more than AFFINITY_WINDOW later ones, and priorities hold.

Simulated ComfyUI servers with a loader that takes time unless cached (SimulatedLoader), one
prompt per backend at a time so that the order of dispatch is the order of choice.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.test_warm_cache import Gateway

LOAD = 0.5  # seconds SimulatedLoader takes when not cached
A, B = "model-a.safetensors", "model-b.safetensors"


async def history(sim: SimulatedComfyUI, prompt_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"{sim.url}/history/{prompt_id}") as response:
        entry: dict[str, Any] = (await response.json())[prompt_id]
        return entry


def served_from_cache(entry: dict[str, Any]) -> list[str]:
    (nodes,) = [data["nodes"] for kind, data in entry["status"]["messages"]
                if kind == "execution_cached"]
    return list(nodes)


@pytest.mark.parametrize("window", [0, 4])
async def test_a_job_goes_where_its_model_is_loaded(
    window: int, settings: Settings
) -> None:
    settings.max_inflight_per_backend = 1
    settings.affinity_window = window
    async with AsyncExitStack() as stack:
        sim_a = await stack.enter_async_context(SimulatedComfyUI(load_seconds=LOAD))
        sim_b = await stack.enter_async_context(SimulatedComfyUI(load_seconds=LOAD))
        settings.comfyui_endpoints = [sim_a.url + "#a", sim_b.url + "#b"]
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateway = Gateway(http, base + settings.route_prefix)
        # Backend a loads model a, backend b model b.
        await gateway.call("PATCH", "/backends/b", {"drain": True})
        await gateway.run(A)
        await gateway.call("PATCH", "/backends/b", {"drain": False})
        await gateway.call("PATCH", "/backends/a", {"drain": True})
        await gateway.run(B)
        await gateway.call("PATCH", "/backends/a", {"drain": False})
        # Both busy on their own model, a for less long; then a job for b, one for a.
        busy_a = await gateway.submit(A, seconds=2.0)
        await gateway.reached(busy_a, "running")
        busy_b = await gateway.submit(B, seconds=6.0)
        await gateway.reached(busy_b, "running")
        job_b = await gateway.submit(B)
        job_a = await gateway.submit(A)
        jobs = {name: await gateway.finished(job_id) for name, job_id in
                [("busy_a", busy_a), ("busy_b", busy_b), ("b", job_b), ("a", job_a)]}
        run_of_a = await history(sim_a, jobs["a"]["prompt_id"]) \
            if jobs["a"]["backend"] == "a" else None
    assert (jobs["busy_a"]["backend"], jobs["busy_b"]["backend"]) == ("a", "b")
    loaded = served_from_cache(run_of_a) if run_of_a is not None else []
    if window == 0:
        # FIFO: backend a, free first, takes the job for b and loads model b; the job for a
        # then has to load model a again.
        assert jobs["b"]["dispatched_at"] < jobs["a"]["dispatched_at"]
        assert "1" not in loaded
    else:
        # The job for a goes first, to backend a, where its model is loaded.
        assert jobs["a"]["dispatched_at"] < jobs["b"]["dispatched_at"]
        assert jobs["a"]["backend"] == "a" and "1" in loaded


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
        # (cheap once b is loaded, yet never before a job of higher priority).
        queued = {"b1": await gateway.submit(B), "a1": await gateway.submit(A),
                  "a2": await gateway.submit(A), "a3": await gateway.submit(A),
                  "low_b": await gateway.submit(B, priority=-1)}
        await gateway.finished(busy)
        jobs = {name: await gateway.finished(job_id) for name, job_id in queued.items()}
    assert sorted(jobs, key=lambda name: jobs[name]["dispatched_at"]) == expected
