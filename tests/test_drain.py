"""Draining a backend and waiting until it is idle: what a GPU pod's preStop hook does before
the pod stops (POST /backends/{name}/drain, through comfyui_nodes' drain.py)."""

from __future__ import annotations

import asyncio
import sys
from contextlib import AsyncExitStack
from typing import Any

import aiohttp

from comfyfleet.app import serving
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import REPO, wait_for_job

DRAIN_SCRIPT = REPO / "comfyui_nodes" / "comfyfleet_cleanup" / "drain.py"
RUN_SECONDS = 3.0


async def run_script(base: str, name: str, wait: float) -> tuple[int, str]:
    """drain.py as a preStop hook runs it: the standard library only, settings from the
    environment (no API keys configured here, so no key)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-I", str(DRAIN_SCRIPT), "--name", name, "--wait", str(wait),
        env={"COMFYFLEET_URL": base, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_drain_waits_for_the_job_on_the_backend(settings: Settings) -> None:
    async with AsyncExitStack() as stack:
        slow = await stack.enter_async_context(SimulatedComfyUI(duration=RUN_SECONDS))
        other = await stack.enter_async_context(SimulatedComfyUI())
        settings.comfyui_endpoints = [slow.url + "#leaving", other.url + "#staying"]
        base = await stack.enter_async_context(serving(settings)) + settings.route_prefix
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            async with http.request(method, base + path, json=body) as response:
                return response.status, await response.json()

        await call("PATCH", "/backends/staying", {"drain": True})
        status, job = await call("POST", "/jobs", {"workflow": "invert",
                                                   "params": {"width": 16}})
        assert status == 202
        await call("PATCH", "/backends/staying", {"drain": False})
        await wait_for_job(http, base, job["id"], "running")

        # No waiting: drained at once, and the answer says the job is still there.
        status, drained = await call("POST", "/backends/leaving/drain", {"wait": 0})
        assert (status, drained["draining"], drained["jobs_left"]) == (202, True, 1)

        # The script returns once the job has ended, and only then.
        code, out = await run_script(base, "leaving", 30)
        assert code == 0, out
        assert "leaving: idle" in out
        status, finished = await call("GET", f"/jobs/{job['id']}")
        assert (finished["status"], finished["backend"]) == ("succeeded", "leaving")
        status, after = await call("POST", "/jobs?wait=30", {"workflow": "invert",
                                                             "params": {"width": 16}})
        assert (after["status"], after["backend"]) == ("succeeded", "staying")

        # Idle now: removable, and a second drain answers at once.
        status, again = await call("POST", "/backends/leaving/drain", {"wait": 5})
        assert (status, again["jobs_left"]) == (200, 0)


async def test_the_script_reports_a_backend_still_busy_and_refusals(settings: Settings) -> None:
    async with AsyncExitStack() as stack:
        slow = await stack.enter_async_context(SimulatedComfyUI(duration=30))
        settings.comfyui_endpoints = [slow.url + "#busy"]
        base = await stack.enter_async_context(serving(settings)) + settings.route_prefix
        http = await stack.enter_async_context(aiohttp.ClientSession())
        async with http.post(f"{base}/jobs", json={"workflow": "invert",
                                                   "params": {"width": 16}}) as response:
            job = await response.json()
        await wait_for_job(http, base, job["id"], "running")

        code, out = await run_script(base, "busy", 0.5)
        assert (code, "busy: still busy" in out) == (1, True), out
        code, out = await run_script(base, "nobody", 0)
        assert (code, "answered 404" in out) == (2, True), out
        code, out = await run_script("http://127.0.0.1:9/api/v1", "busy", 0)
        assert (code, "unreachable" in out) == (2, True), out
