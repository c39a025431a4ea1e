"""A finished prompt's outputs come from its `executed` messages when those are surely all of
them (every message of its run on one connection, every output node reported); else from
GET /history/{prompt_id}, as after a reconnect, which ComfyUI does not replay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI

HISTORY_ITEM = "GET /history/{prompt_id}"
IMAGE = {"class_type": "EmptyImage",
         "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedComfyUI]:
    async with SimulatedComfyUI() as server:
        yield server


def add_workflow(settings: Settings, tmp_path: Path, name: str, prompt: dict[str, Any]) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir(exist_ok=True)
    (workflows / f"{name}.json").write_text(json.dumps(prompt))
    settings.workflows_dir = workflows


async def history_outputs(sim: SimulatedComfyUI, prompt_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"{sim.url}/history/{prompt_id}") as response:
        outputs: dict[str, Any] = (await response.json())[prompt_id]["outputs"]
    return outputs


def stored_files(job: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((output["node_id"], output["filename"]) for output in job["outputs"]
                  if "filename" in output)


def listed_files(outputs: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((node, item["filename"]) for node, ui in outputs.items()
                  for items in ui.values() for item in items if isinstance(item, dict))


async def run_job(settings: Settings, receiver: WebhookReceiver, workflow: str,
                  while_running: Any = None) -> dict[str, Any]:
    """Submit one job of `workflow`, call `while_running()` once it runs, and return the job
    as its (verified) webhook tells its end."""
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        async with http.post(f"{base}{settings.route_prefix}/jobs", json={"workflow": workflow,
                                                   "callback_url": receiver.url}) as response:
            assert response.status == 202
            job_id = (await response.json())["id"]
        if while_running is not None:
            async with asyncio.timeout(10):
                while True:  # the service's own state: polled, nothing tells this test
                    async with http.get(f"{base}{settings.route_prefix}/jobs/{job_id}") as response:
                        if (await response.json())["status"] == "running":
                            break
                    await asyncio.sleep(0.05)
            await while_running()
        async with asyncio.timeout(30):
            while not any(event["type"] in ("job.succeeded", "job.failed")
                          for event in receiver.verified):
                await receiver.wait_for(len(receiver.verified) + 1)
    (ended,) = [event for event in receiver.verified
                if event["type"] in ("job.succeeded", "job.failed")]
    job: dict[str, Any] = ended["data"]
    return job


async def test_outputs_heard_on_one_connection_are_collected_without_reading_the_history(
    settings: Settings, sim: SimulatedComfyUI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """Two output nodes (a saved image, a preview in temp), both reported by `executed` on
    the connection that heard the prompt start: the job stores what /history would list,
    and the history is never asked for."""
    add_workflow(settings, tmp_path, "two_outputs", {
        "1": IMAGE,
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    })
    settings.comfyui_endpoints = [sim.url]
    job = await run_job(settings, receiver, "two_outputs")
    assert job["status"] == "succeeded"
    assert sim.requests[HISTORY_ITEM] == 0
    files = stored_files(job)
    assert [node for node, _ in files] == ["2", "3"]
    assert files == listed_files(await history_outputs(sim, job["prompt_id"]))


async def test_an_output_node_that_reports_nothing_leaves_the_outputs_to_the_history(
    settings: Settings, sim: SimulatedComfyUI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """SaveImageWebsocket is an output node without UI: it sends no `executed`, so the
    messages heard cannot be known to be all, and the history is read."""
    add_workflow(settings, tmp_path, "silent_output", {
        "1": IMAGE,
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
        "3": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    })
    settings.comfyui_endpoints = [sim.url]
    job = await run_job(settings, receiver, "silent_output")
    assert job["status"] == "succeeded"
    assert sim.requests[HISTORY_ITEM] == 1
    assert [node for node, _ in stored_files(job)] == ["2"]


async def test_after_a_reconnect_while_the_prompt_runs_the_outputs_come_from_the_history(
    settings: Settings, sim: SimulatedComfyUI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """The socket drops while the prompt runs (messages sent meanwhile are lost for good);
    the prompt's end is heard on the next connection, and its outputs are read from the
    history."""
    add_workflow(settings, tmp_path, "slow", {
        "1": IMAGE,
        "2": {"class_type": "SimulatedWork",
              "inputs": {"image": ["1", 0], "seconds": 3.0, "steps": 3, "preview": False}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "a"}},
    })
    settings.comfyui_endpoints = [sim.url]

    async def drop() -> None:
        assert sim.drop_websockets() == 1

    job = await run_job(settings, receiver, "slow", while_running=drop)
    assert job["status"] == "succeeded"
    assert sim.requests[HISTORY_ITEM] >= 1
    assert [node for node, _ in stored_files(job)] == ["3"]


async def test_a_prompt_settled_from_its_history_entry_is_collected_from_that_entry(
    settings: Settings, sim: SimulatedComfyUI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """The socket stays open but goes silent (no message of the prompt arrives): the quiet
    prompt's history entry, read once by the safety net, settles it and gives its outputs;
    the history is not read a second time to collect them."""
    add_workflow(settings, tmp_path, "quick", {
        "1": IMAGE,
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
    })
    settings.comfyui_endpoints = [sim.url]
    # Long enough for the prompt to have ended at the first look (a look sooner would read
    # an empty entry, and count).
    settings.quiet_prompt_seconds = 2.0
    sim.faults.update({"hang": True})
    job = await run_job(settings, receiver, "quick")
    assert job["status"] == "succeeded"
    assert sim.requests[HISTORY_ITEM] == 1
    assert [node for node, _ in stored_files(job)] == ["2"]
