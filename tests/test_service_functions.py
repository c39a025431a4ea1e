"""Service functions: `workflows/<name>.py` with `build(params, template)`, loaded, reloaded and
reported like the JSON files, run without stalling the service, and failing with a clear 422."""

from __future__ import annotations

import asyncio
import io
import json
import os
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from comfyfleet.app import serving
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from comfyfleet.workflows.catalog import Workflow, load_catalog
from comfyfleet.workflows.service_functions import BuildError
from tests.support import REPO

TEMPLATE = {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": "$width", "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                        "filename_prefix": "x"}}}


def add_workflow(directory: Path, name: str, code: str | None = None,
                 params: dict[str, Any] | None = None) -> None:
    (directory / f"{name}.json").write_text(json.dumps(TEMPLATE))
    if code is not None:
        (directory / f"{name}.py").write_text(textwrap.dedent(code))
    if params is not None:
        (directory / f"{name}.params.json").write_text(json.dumps(params))


def loaded(directory: Path, name: str) -> Workflow:
    catalog = load_catalog(directory)
    assert name in catalog.workflows, catalog.errors
    return catalog.workflows[name]


async def test_sample_derives_the_size_and_chains_the_inverts() -> None:
    sample = loaded(REPO / "workflows", "invert_times")
    prompt = await sample.make_prompt(sample.validate({"size": 64, "shape": "landscape",
                                                       "times": 2, "color": 7}))
    assert prompt["1"]["inputs"] == {"width": 64, "height": 36, "batch_size": 1, "color": 7}
    assert [node["class_type"] for node in prompt.values()] == [
        "EmptyImage", "SaveImage", "ImageInvert", "ImageInvert"]
    assert prompt["3"]["inputs"]["images"] == ["11", 0]
    none = await sample.make_prompt(sample.validate({"times": 0}))
    assert set(none) == {"1", "3"} and none["3"]["inputs"]["images"] == ["1", 0]
    assert sample.template["2"]["class_type"] == "ImageInvert"  # every job gets a fresh copy


async def test_a_sync_build_runs_in_a_worker_thread_and_an_async_one_is_awaited(
    tmp_path: Path,
) -> None:
    add_workflow(tmp_path, "sync", """
        import threading

        def build(params, template):
            template["1"]["inputs"]["color"] = threading.current_thread().name
            return template
    """)
    add_workflow(tmp_path, "coroutine", """
        import asyncio

        async def build(params, template):
            await asyncio.sleep(0)
            template["1"]["inputs"]["height"] = params["width"] * 2
            return template
    """)
    sync = await loaded(tmp_path, "sync").make_prompt({"width": 4})
    assert sync["1"]["inputs"]["color"] != threading.current_thread().name
    coroutine = await loaded(tmp_path, "coroutine").make_prompt({"width": 4})
    assert coroutine["1"]["inputs"] == {"width": 4, "height": 8, "batch_size": 1, "color": 0}


async def test_parameters_only_a_service_function_uses_may_be_declared(tmp_path: Path) -> None:
    params = {"width": {"type": "int", "default": 8},
              "double": {"type": "bool", "default": False}}
    add_workflow(tmp_path, "derived", """
        def build(params, template):
            if params["double"]:
                template["1"]["inputs"]["width"] *= 2
            return template
    """, params)
    add_workflow(tmp_path, "plain", params=params)
    catalog = load_catalog(tmp_path)
    assert "'double' is not used in plain.json" in catalog.errors["plain"]
    derived = catalog.workflows["derived"]
    prompt = await derived.make_prompt(derived.validate({"width": 5, "double": "true"}))
    assert prompt["1"]["inputs"]["width"] == 10


def test_broken_files_are_reported_with_their_line_and_the_others_load(tmp_path: Path) -> None:
    add_workflow(tmp_path, "good", "def build(params, template):\n    return template\n")
    add_workflow(tmp_path, "syntax", "def build(params, template)\n    return template\n")
    add_workflow(tmp_path, "raises", "import os\n\nCONFIG = os.environ['NOT_SET_ANYWHERE']\n")
    add_workflow(tmp_path, "exits", "import sys\nsys.exit(3)\n")
    add_workflow(tmp_path, "nobuild", "BUILD = None\n")
    (tmp_path / "orphan.py").write_text("def build(params, template):\n    return template\n")
    catalog = load_catalog(tmp_path)
    assert list(catalog.workflows) == ["good"]
    assert catalog.errors["syntax"].startswith("syntax.py cannot be loaded: SyntaxError")
    assert catalog.errors["syntax"].endswith("(syntax.py line 1)")
    assert catalog.errors["raises"] == (
        "raises.py cannot be loaded: KeyError: 'NOT_SET_ANYWHERE' (raises.py line 3)")
    assert catalog.errors["exits"].startswith("exits.py cannot be loaded: SystemExit: 3")
    assert catalog.errors["nobuild"] == "nobuild.py defines no build(params, template) function"
    assert "orphan.py has no template orphan.json" in catalog.errors["orphan"]


@pytest.mark.parametrize(("body", "says"), [
    ("raise ValueError('no such style')", "failed: ValueError: no such style (bad.py line 3)"),
    ("return [template]", "returned an invalid prompt: expected a JSON object"),
    ("return {'1': {'inputs': {}}}", "returned an invalid prompt: node '1' has no class_type"),
    ("return {'1': {'class_type': 'X', 'inputs': {'v': float('nan')}}}",
     "returned an invalid prompt: Out of range float values are not JSON compliant"),
    ("return {'1': {'class_type': 'X', 'inputs': {'v': object()}}}",
     "returned an invalid prompt: Object of type object is not JSON serializable"),
])
async def test_a_build_that_fails_or_returns_no_prompt_is_a_build_error(
    tmp_path: Path, body: str, says: str
) -> None:
    add_workflow(tmp_path, "bad", f"def build(params, template):\n    x = 1\n    {body}\n")
    with pytest.raises(BuildError) as caught:
        await loaded(tmp_path, "bad").make_prompt({"width": 4})
    assert str(caught.value).startswith(f"build() in bad.py {says}")


async def test_a_reload_runs_the_file_as_it_is_now(tmp_path: Path) -> None:
    whole = "def build(params, template):\n    return template\n"
    first_node = "def build(params, template):\n    return {'1': template['1']}\n"
    code = tmp_path / "edited.py"
    add_workflow(tmp_path, "edited", whole.ljust(len(first_node) - 1, "#") + "\n")
    before = code.stat()
    first = loaded(tmp_path, "edited")
    # The same size and modification time: what a bytecode cache would take for unchanged.
    code.write_text(first_node)
    os.utime(code, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert code.stat().st_size == before.st_size
    second = loaded(tmp_path, "edited")
    assert set(await first.make_prompt({"width": 1})) == {"1", "2"}
    assert set(await second.make_prompt({"width": 1})) == {"1"}
    assert second.digest != first.digest  # so earlier outputs are not reused for it


@pytest.fixture
async def api(settings: Settings, workflows: Path
              ) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [f"{sim.url}#sim"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            yield http, base + settings.route_prefix


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as response:
        return response.status, await response.json()


async def test_sample_runs_through_the_api(api: tuple[aiohttp.ClientSession, str]) -> None:
    http, prefix = api
    pixels = {}
    for times in (1, 2):
        status, job = await post(http, f"{prefix}/workflows/invert_times/jobs?wait=20", {
            "params": {"size": 64, "shape": "portrait", "times": times, "color": 0x102030}})
        assert (status, job["status"]) == (202, "succeeded"), job
        async with http.get(f"{prefix}/jobs/{job['id']}/outputs/0") as response:
            image = Image.open(io.BytesIO(await response.read())).convert("RGB")
        assert image.size == (36, 64)
        pixels[times] = image.getpixel((0, 0))
    assert pixels == {1: (0xEF, 0xDF, 0xCF), 2: (0x10, 0x20, 0x30)}


async def test_failing_build_is_a_422_and_routing_uses_the_built_prompt(
    api: tuple[aiohttp.ClientSession, str], workflows: Path
) -> None:
    http, prefix = api
    add_workflow(workflows, "strict", """
        def build(params, template):
            if params["width"] > 100:
                raise ValueError("width over 100 is not for sale")
            if params["width"] == 13:
                template["9"] = {"class_type": "CheckpointLoaderSimple",
                                 "inputs": {"ckpt_name": "sd.safetensors"}}
            return template
    """, {"width": {"type": "int", "default": 8}})
    async with http.post(f"{prefix}/workflows/reload") as response:
        assert response.status == 200
    status, body = await post(http, f"{prefix}/jobs", {"workflow": "strict",
                                                       "params": {"width": 101}})
    assert (status, body["error"]["type"]) == (422, "workflow_build_failed")
    assert body["error"]["message"] == (
        "build() in strict.py failed: ValueError: width over 100 is not for sale "
        "(strict.py line 4)")
    status, body = await post(http, f"{prefix}/jobs", {"workflow": "strict",
                                                       "params": {"width": 13}})
    assert (status, body["error"]["type"]) == (422, "no_capable_backend")
    assert "node class CheckpointLoaderSimple" in body["error"]["missing"]["sim"]
    async with http.get(f"{prefix}/jobs") as response:
        assert (await response.json())["jobs"] == []
    status, job = await post(http, f"{prefix}/jobs?wait=20", {"workflow": "strict"})
    assert (status, job["status"]) == (202, "succeeded")


async def test_an_edited_service_function_is_picked_up_and_a_broken_one_reported(
    api: tuple[aiohttp.ClientSession, str], workflows: Path
) -> None:
    http, prefix = api
    code = workflows / "invert_times.py"
    working = code.read_text()

    async def catalog() -> dict[str, Any]:
        async with http.get(f"{prefix}/workflows") as response:
            found: dict[str, Any] = await response.json()
            return found

    code.write_text(working.replace("def build(", "def build(("))
    async with asyncio.timeout(10):
        while "invert_times" not in (await catalog())["errors"]:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # the watcher debounces; nothing local to wait on
    listed = await catalog()
    assert "invert_times.py cannot be loaded: SyntaxError" in listed["errors"]["invert_times"]
    assert "invert" in [w["name"] for w in listed["workflows"]]
    code.write_text(working)
    async with asyncio.timeout(10):
        while "invert_times" in (await catalog())["errors"]:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    described = next(w for w in (await catalog())["workflows"] if w["name"] == "invert_times")
    assert described["service_function"] == "invert_times.py"
