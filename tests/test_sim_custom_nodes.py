"""Custom node packages in the simulator, loaded the way ComfyUI loads them."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest

from comfyfleet.sim import SimulatedComfyUI
from tests.support import child_env, free_ports, wait_until_answering
from tests.test_sim import TIMEOUT, connect, get_json, receive

# A package that shows what it sees: folder_paths at import time and at request time, and
# PromptServer.send_sync from a thread. It also has a submodule, imported relatively.
PROBE_INIT = '''
import threading

from aiohttp import web

import folder_paths
from server import PromptServer

from .helpers import describe

NODE_CLASS_MAPPINGS = {"ProbeNode": object}
IMPORTED_OUTPUT = folder_paths.get_output_directory()
routes = PromptServer.instance.routes


@routes.get("/probe")
async def probe(request):
    return web.json_response(describe(folder_paths) | {"at_import": IMPORTED_OUTPUT})


@routes.post("/probe/send")
async def send(request):
    server = PromptServer.instance

    def from_a_thread():
        server.send_sync("probe", {"hello": "all"})
        server.send_sync(3, b"\\x00\\x00\\x00\\x01" + b"9" + b"text", "watcher")

    thread = threading.Thread(target=from_a_thread)
    thread.start()
    thread.join()
    return web.json_response({"sent": True})
'''

PROBE_HELPERS = '''
def describe(folder_paths):
    return {
        "output": folder_paths.get_output_directory(),
        "input": folder_paths.get_input_directory(),
        "temp": folder_paths.get_temp_directory(),
        "by_type": [folder_paths.get_directory_by_type(t) for t in ("output", "temp", "models")],
    }
'''


def write_package(folder: Path, name: str, init: str, **modules: str) -> Path:
    package = folder / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    for module, source in modules.items():
        (package / f"{module}.py").write_text(source)
    return package


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


async def test_each_simulator_gets_its_own_routes_and_folders(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    package = write_package(tmp_path, "probe", PROBE_INIT, helpers=PROBE_HELPERS)
    # Whatever the process had as `server` before comes back after the imports.
    ours = ModuleType("server")
    sys.modules["server"] = ours
    try:
        async with (
            SimulatedComfyUI(data_dir=tmp_path / "a", custom_nodes=[package]) as a,
            SimulatedComfyUI(data_dir=tmp_path / "b", custom_nodes=[package]) as b,
        ):
            assert sys.modules["server"] is ours
            assert "folder_paths" not in sys.modules
            for sim in (a, b):
                root = str(sim.data_dir)
                expected = {
                    "output": f"{root}/output",
                    "input": f"{root}/input",
                    "temp": f"{root}/temp",
                    "by_type": [f"{root}/output", f"{root}/temp", None],
                    "at_import": f"{root}/output",
                }
                assert await get_json(http, f"{sim.url}/probe") == expected
                assert await get_json(http, f"{sim.url}/api/probe") == expected

            # send_sync, from any thread: JSON to everyone, bytes as a binary frame to one.
            watcher, other = await connect(http, a, "watcher"), await connect(http, a, "other")
            async with http.post(f"{a.url}/probe/send") as response:
                assert response.status == 200
            assert await receive(watcher) == {"type": "probe", "data": {"hello": "all"}}
            text = {"event": 3, "node_id": "9", "text": "text"}
            assert await receive(watcher) == {"type": "binary", "data": text}
            assert await receive(other) == {"type": "probe", "data": {"hello": "all"}}
            for ws in (watcher, other):
                await ws.close()
        # Stopped simulators take their copies of the package out of sys.modules.
        assert not [name for name in sys.modules if name.startswith("_comfyfleet_sim")]
    finally:
        del sys.modules["server"]


async def test_broken_packages_do_not_stop_the_server(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "custom_nodes"
    route = '''
from aiohttp import web
from server import PromptServer

@PromptServer.instance.routes.get("/{name}")
async def handler(request):
    return web.json_response({{"from": "{name}"}})
'''
    write_package(folder, "good", route.format(name="good") + "NODE_CLASS_MAPPINGS = {}\n")
    write_package(folder, "unmapped", route.format(name="unmapped"))
    write_package(folder, "broken", route.format(name="broken") + "raise ImportError('no torch')\n")
    write_package(folder, "off.disabled", route.format(name="off") + "NODE_CLASS_MAPPINGS = {}\n")
    (folder / "single.py").write_text(route.format(name="single") + "NODE_CLASS_MAPPINGS = {}\n")
    (folder / "notes.txt").write_text("not a package")
    caplog.set_level(logging.INFO, logger="comfyfleet.sim.custom_nodes")
    async with SimulatedComfyUI(data_dir=tmp_path / "sim", custom_nodes=[folder]) as sim:
        assert await get_json(http, f"{sim.url}/prompt") == {"exec_info": {"queue_remaining": 0}}
        # As in ComfyUI, routes registered before a package failed or was skipped are served.
        for name in ("good", "single", "unmapped", "broken"):
            assert await get_json(http, f"{sim.url}/{name}") == {"from": name}
        async with http.get(f"{sim.url}/off") as response:
            assert response.status == 404
    log = caplog.text
    assert "Cannot import" in log and "no torch" in log
    assert "lack of NODE_CLASS_MAPPINGS" in log
    summary = [line for line in log.splitlines() if " seconds" in line]
    failed = sorted(line.rsplit(os.sep, 1)[-1] for line in summary if "IMPORT FAILED" in line)
    assert failed == ["broken", "unmapped"]
    assert len(summary) == 4


async def test_cli_options(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """`comfyfleet sim` with the failure injection and custom node options."""
    package = write_package(tmp_path, "probe", PROBE_INIT, helpers=PROBE_HELPERS)
    port = free_ports(1)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfyfleet", "sim", "--port", str(port),
        "--data-dir", str(tmp_path / "data"), "--custom-nodes", str(package),
        "--fail-rate", "0.5", "--fail-seed", "9", "--view-bytes-per-second", "64K",
        "--output-size", "2G", "--max-upload-size", "0.5",
        cwd=tmp_path, env=child_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_answering(f"{url}/prompt", seconds=TIMEOUT * 4)
        faults = await get_json(http, f"{url}/_sim/faults")
        assert faults == {
            "fail_rate": 0.5,
            "seed": 9,
            "hang": False,
            "view_bytes_per_second": 64 * 1024,
            "output_size": 2 * 1024**3,
            "prompt_delay": None,
            "system_stats_status": None,
            "prompt_status": None,
            "view_status": None,
            "view_cut_bytes": None,
        }
        features = await get_json(http, f"{url}/features")
        assert features["max_upload_size"] == 512 * 1024
        probe = await get_json(http, f"{url}/probe")
        assert probe["output"] == str(tmp_path / "data" / "sim0" / "output")
    finally:
        process.terminate()
        await process.wait()
