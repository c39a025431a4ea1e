"""The catalog as operators and clients see it: listing, hot reload, the check command, and
job outputs served back through the API."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from comfyfleet.workflows.watcher import watch_directory
from tests.support import REPO, child_env, wait_for_healthy_backends, wait_for_job


@pytest.fixture
def workflows(workflows: Path) -> Path:
    """The repository's workflows and a UI-format export beside them."""
    (workflows / "ui-export.json").write_text(json.dumps({"nodes": [], "links": []}))
    return workflows


@asynccontextmanager
async def service(settings: Settings) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """The service in front of one simulated backend, connected (a workflow lists the backends
    that can run it, by what they answered as they connected): a client and the API's base
    URL."""
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [sim.url + "#sim"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            await wait_for_healthy_backends(http, base + settings.route_prefix)
            yield http, base + settings.route_prefix


@pytest.fixture
async def api(settings: Settings, workflows: Path) -> AsyncIterator[tuple[aiohttp.ClientSession,
                                                                          str]]:
    async with service(settings) as running:
        yield running


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def test_catalog_lists_workflows_where_they_run_and_what_is_broken(
    api: tuple[aiohttp.ClientSession, str],
) -> None:
    http, prefix = api
    status, catalog = await get(http, f"{prefix}/workflows")
    assert status == 200
    names = [w["name"] for w in catalog["workflows"]]
    assert names == ["blur_image", "invert", "invert_times", "sd15_img2img", "sd15_txt2img",
                     "sdxl_txt2img", "simulated_model", "simulated_work"]
    assert "Export (API)" in catalog["errors"]["ui-export"]
    invert = catalog["workflows"][1]
    assert (invert["service_function"], invert["reuse_outputs"]) == (None, False)
    assert catalog["workflows"][2]["service_function"] == "invert_times.py"
    assert [p["name"] for p in invert["params"]] == ["width", "height", "color"]
    declared = {"name": "width", "type": "int", "default": 512, "required": False, "min": 1,
                "max": 16384, "choices": None, "description": "Image width in pixels",
                "type_source": "sidecar"}
    assert {key: invert["params"][0][key] for key in declared} == declared
    status, one = await get(http, f"{prefix}/workflows/simulated_work")
    assert (status, one["backends"]) == (200, ["sim"])
    status, body = await get(http, f"{prefix}/workflows/ui-export")
    assert (status, body["error"]["type"]) == (404, "workflow_broken")
    status, body = await get(http, f"{prefix}/workflows/nope")
    assert (status, body["error"]["type"]) == (404, "workflow_not_found")


async def test_a_request_for_a_workflow_that_failed_to_load_names_the_error(
    api: tuple[aiohttp.ClientSession, str],
) -> None:
    http, prefix = api
    async with http.post(f"{prefix}/jobs", json={"workflow": "ui-export"}) as response:
        answer = await response.json()
    assert (response.status, answer["error"]["type"], answer["error"]["field"]) == (
        422, "workflow_broken", "workflow")
    message = answer["error"]["message"]
    assert message.startswith("workflow 'ui-export' could not be loaded: this is a UI-format")
    assert "Workflow > Export (API)" in message
    for method, path in [("POST", "/workflows/ui-export/jobs"), ("GET", "/workflows/ui-export")]:
        async with http.request(method, prefix + path, json={"params": {}}) as response:
            answer = await response.json()
        assert (response.status, answer["error"]["type"]) == (404, "workflow_broken")
        assert answer["error"]["message"] == message
    async with http.post(f"{prefix}/workflows/nope/jobs", json={}) as response:
        answer = await response.json()
    assert (response.status, answer["error"]["type"]) == (404, "workflow_not_found")
    assert answer["error"]["message"].startswith("no workflow named 'nope' (known: blur_image, ")


async def test_dropped_in_file_is_picked_up_without_a_restart(
    api: tuple[aiohttp.ClientSession, str], workflows: Path
) -> None:
    http, prefix = api
    async with asyncio.timeout(10):
        while (await get(http, f"{prefix}/workflows/negative"))[0] != 200:
            # Written again each round: the watcher may begin watching a moment after the
            # service answers, and a write before that is not seen.
            shutil.copy(workflows / "invert.json", workflows / "negative.json")
            await asyncio.sleep(0.5)  # the watcher debounces for 0.3 s; nothing to wait on
    async with http.post(f"{prefix}/jobs", json={"workflow": "negative",
                                                 "params": {"width": 1, "height": 1,
                                                            "color": 0}}) as response:
        assert response.status == 202
    (workflows / "negative.json").unlink()
    async with http.post(f"{prefix}/workflows/reload") as response:
        reloaded = await response.json()
    assert "negative" not in [w["name"] for w in reloaded["workflows"]]


async def test_a_file_written_before_the_watch_begins_is_read(tmp_path: Path) -> None:
    changes = asyncio.Event()

    async def on_change() -> None:
        changes.set()

    watcher = asyncio.create_task(watch_directory(tmp_path, on_change))
    (tmp_path / "early.json").write_text("{}")  # the task has not run: no watch yet
    try:
        async with asyncio.timeout(15):  # the watch's first quiet wake comes after 5 s
            await changes.wait()
    finally:
        watcher.cancel()


async def test_outputs_are_served_by_index_and_through_signed_links(settings: Settings) -> None:
    settings.s3_url_ttl = 3  # local storage's signed links last as long as presigned ones
    async with service(settings) as (http, prefix):
        async with http.post(f"{prefix}/jobs", json={"workflow": "invert", "params": {
                "width": 20, "height": 10}}) as response:
            job_id = (await response.json())["id"]
        await wait_for_job(http, prefix, job_id, "succeeded")
        async with http.get(f"{prefix}/jobs/{job_id}/outputs/0") as response:
            assert response.status == 200
            assert response.content_type == "image/png"
            png = await response.read()
        status, job = await get(http, f"{prefix}/jobs/{job_id}")  # its link signed now
        assert png.startswith(b"\x89PNG") and len(png) == job["outputs"][0]["size"]

        url = job["outputs"][0]["url"]
        async with http.get(url) as response:
            assert response.status == 200
            assert await response.read() == png
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        forged = {**query, "signature": "0" * 64}
        prolonged = {**query, "expires": str(int(query["expires"]) + 3600)}
        for params in (forged, prolonged):
            async with http.get(f"{parts.scheme}://{parts.netloc}{parts.path}?"
                                f"{urlencode(params)}") as response:
                assert response.status == 403
        # The untouched link, once its time is up.
        await asyncio.sleep(max(0.0, int(query["expires"]) - time.time()) + 0.1)
        async with http.get(url) as response:
            assert response.status == 403
        status, body = await get(http, f"{prefix}/jobs/{job_id}/outputs/1")
        assert (status, body["error"]["type"]) == (404, "output_not_found")


async def run_check(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfyfleet", "workflows", "check", *args, env=child_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_check_command_against_a_live_backend(tmp_path: Path) -> None:
    shutil.copy(REPO / "workflows" / "invert.json", tmp_path / "invert.json")
    (tmp_path / "huge.json").write_text(json.dumps({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 99999, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}))
    (tmp_path / "sdxl.json").write_text(json.dumps({
        "1": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "sdxl.safetensors"}}}))
    async with SimulatedComfyUI() as sim:
        code, report = await run_check(str(tmp_path), "--backend", f"{sim.url}#cpu")
    assert code == 1
    lines = report.splitlines()
    assert "ok   invert (width, height, color); runs on cpu" in lines
    assert "FAIL huge (no parameters); runs on cpu" in lines
    assert "     cpu: EmptyImage.width = 99999 (max 16384)" in lines
    assert "FAIL sdxl (no parameters); runs on no backend" in lines
    assert "     cpu: node class CheckpointLoaderSimple" in lines
    code, report = await run_check(str(REPO / "workflows"))
    assert code == 0, report


async def test_check_command_runs_service_functions_with_the_defaults(tmp_path: Path) -> None:
    for suffix in (".json", ".params.json", ".py"):
        shutil.copy(REPO / "workflows" / f"invert_times{suffix}", tmp_path / f"big{suffix}")
    (tmp_path / "big.py").write_text((tmp_path / "big.py").read_text().replace(
        '["size"] * across', '["size"] * 100 * across'))
    for suffix in (".json", ".params.json"):  # every parameter has a default: it is run
        shutil.copy(REPO / "workflows" / f"invert{suffix}", tmp_path / f"raises{suffix}")
    (tmp_path / "raises.py").write_text("def build(params, template):\n    return 1 / 0\n")
    (tmp_path / "broken.json").write_text((REPO / "workflows" / "invert.json").read_text())
    (tmp_path / "broken.py").write_text("import no_such_module\n")
    async with SimulatedComfyUI() as sim:
        code, report = await run_check(str(tmp_path), "--backend", f"{sim.url}#cpu")
    assert code == 1
    lines = report.splitlines()
    assert ("FAIL broken: broken.py cannot be loaded: ModuleNotFoundError: No module named "
            "'no_such_module' (broken.py line 1)") in lines
    assert ("FAIL raises: with the default parameters, build() in raises.py failed: "
            "ZeroDivisionError: division by zero (raises.py line 2)") in lines
    assert "FAIL big (color, size, shape, times); runs on cpu" in lines
    assert "     cpu: EmptyImage.width = 51200 (max 16384)" in lines
