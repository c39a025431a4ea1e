"""Capability routing end to end: two backends (real processes) with different checkpoints;
every job runs where its model is, waits while that backend is down, and a job no backend
can run is refused at submit."""

from __future__ import annotations

import asyncio
import shutil
import signal
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp

from comfyfleet.app import serving
from comfyfleet.settings import Settings
from tests.support import LOOPBACK, REPO, free_ports, python_process, wait_for_job

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"  # what workflows/sd15_txt2img.json loads
SDXL = "sd_xl_base_1.0.safetensors"  # and workflows/sdxl_txt2img.json
ELSEWHERE = "flux1-dev-fp8.safetensors"  # on neither backend
PROMPT_SECONDS = 0.3  # long enough for a queue to form on each backend


def model_sim(port: int, data_dir: Path, checkpoint: str) -> AbstractAsyncContextManager[Any]:
    """A simulated ComfyUI with one checkpoint, in a process of its own (tests/model_sim.py)."""
    return python_process(
        "tests.model_sim", "--port", str(port), "--data-dir", str(data_dir),
        "--duration", str(PROMPT_SECONDS), "--checkpoint", checkpoint,
        ready_url=f"http://{LOOPBACK}:{port}/prompt",
    )


def workflows_dir(root: Path) -> Path:
    """The repository's two text-to-image workflows, and a copy of one that loads a model
    nobody has."""
    root.mkdir()
    for name in ("sd15_txt2img", "sdxl_txt2img"):
        for suffix in (".json", ".params.json"):
            shutil.copy(REPO / "workflows" / (name + suffix), root / (name + suffix))
    template = (REPO / "workflows" / "sd15_txt2img.json").read_text()
    assert SD15 in template
    (root / "flux_txt2img.json").write_text(template.replace(SD15, ELSEWHERE))
    shutil.copy(REPO / "workflows" / "sd15_txt2img.params.json", root / "flux_txt2img.params.json")
    return root


async def get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def submit(http: aiohttp.ClientSession, api: str, workflow: str, seed: int) -> str:
    body = {"workflow": workflow, "params": {"prompt": "a lighthouse at dawn", "seed": seed}}
    async with http.post(f"{api}/jobs", json=body) as response:
        job = await response.json()
        assert response.status == 202, job
        return str(job["id"])


async def until_health(http: aiohttp.ClientSession, api: str, **healthy: bool) -> None:
    async with asyncio.timeout(30):
        while await health(http, api) != healthy:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # polling the API: there is no local event to wait on


async def health(http: aiohttp.ClientSession, api: str) -> dict[str, bool]:
    return {backend["name"]: backend["healthy"] for backend in await get(http, f"{api}/backends")}


async def prompt_ids_run_on(http: aiohttp.ClientSession, port: int) -> set[str]:
    return set(await get(http, f"http://{LOOPBACK}:{port}/history"))


async def test_jobs_run_only_where_their_model_is_and_wait_for_it(
    settings: Settings, data_root: Path
) -> None:
    a = free_ports(2)
    b = a + 1
    settings.workflows_dir = workflows_dir(data_root / "workflows")
    settings.comfyui_endpoints = [f"{LOOPBACK}:{a}#sd15", f"{LOOPBACK}:{b}#sdxl"]
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(model_sim(a, data_root / "a", SD15))
        sdxl = await stack.enter_async_context(model_sim(b, data_root / "b", SDXL))
        api = await stack.enter_async_context(serving(settings)) + settings.route_prefix
        http = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)))
        await until_health(http, api, sd15=True, sdxl=True)

        # Neither has the model: refused at once, naming it for each backend.
        body = {"workflow": "flux_txt2img", "params": {"prompt": "a lighthouse"}}
        async with http.post(f"{api}/jobs", json=body) as response:
            refused = await response.json()
        assert response.status == 422, refused
        assert refused["error"]["type"] == "no_capable_backend"
        lacking = [f"CheckpointLoaderSimple.ckpt_name = {ELSEWHERE}"]
        assert refused["error"]["missing"] == {"sd15": lacking, "sdxl": lacking}
        assert ELSEWHERE in refused["error"]["message"]

        # SDXL jobs first: a dispatcher blind to models would give the first to sd15, listed
        # first and as idle as sdxl (and sd15 would reject it: not in its ckpt_name list).
        ids = [await submit(http, api, "sdxl_txt2img", seed) for seed in range(3)]
        ids += [await submit(http, api, "sd15_txt2img", seed) for seed in range(3)]
        jobs = [await wait_for_job(http, api, job_id) for job_id in ids]
        for job in jobs:
            assert job["status"] == "succeeded", job
            assert job["backend"] == job["workflow"].split("_")[0], job
            assert len(job["outputs"]) == 1, job
        assert await prompt_ids_run_on(http, a) == {
            j["prompt_id"] for j in jobs if j["workflow"] == "sd15_txt2img"}
        assert await prompt_ids_run_on(http, b) == {
            j["prompt_id"] for j in jobs if j["workflow"] == "sdxl_txt2img"}

        # The only backend with SDXL dies: its job waits (and says why) while sd15 sits idle
        # and runs a later job of its own.
        sdxl.send_signal(signal.SIGKILL)
        await sdxl.wait()
        await until_health(http, api, sd15=True, sdxl=False)
        waiting = await submit(http, api, "sdxl_txt2img", 10)
        later = await wait_for_job(http, api, await submit(http, api, "sd15_txt2img", 10))
        assert (later["status"], later["backend"]) == ("succeeded", "sd15"), later
        job = await get(http, f"{api}/jobs/{waiting}")
        assert (job["status"], job["backend"], job["attempts"]) == ("queued", None, 0), job
        assert "sdxl" in job["waiting"] and "sd15" not in job["waiting"], job

        # Back (a restarted server, same port and files): the job runs there.
        await stack.enter_async_context(model_sim(b, data_root / "b", SDXL))
        job = await wait_for_job(http, api, waiting)
        assert (job["status"], job["backend"], job["attempts"]) == ("succeeded", "sdxl", 1), job
        assert await prompt_ids_run_on(http, b) == {job["prompt_id"]}
        assert job["prompt_id"] not in await prompt_ids_run_on(http, a)
