"""What the gateway believes each backend's node cache holds: predicted from the prompts it
sends, checked against and corrected by `execution_cached`, shown in GET /backends.

Over real sockets: the service in process, simulated ComfyUI servers (whose cache is checked
against a real server's in test_replay.py), a prompt sent behind the gateway's back.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from comfyfleet.app import serving
from comfyfleet.comfy.cache import CachePolicy
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.cache_probes import chain

# SimulatedLoader -> SimulatedWork -> SaveImage, the model a parameter.
MODEL_WORKFLOW = {
    "1": {"class_type": "SimulatedLoader", "inputs": {"ckpt_name": "$model"}},
    "2": {"class_type": "SimulatedWork",
          "inputs": {"image": ["1", 0], "seconds": 0.0, "steps": 1, "preview": False}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "m"}},
}
MODEL_PARAMS = {"model": {"type": "string", "required": True}}


def add_model_workflow(workflows: Path) -> None:
    (workflows / "model.json").write_text(json.dumps(MODEL_WORKFLOW), encoding="utf-8")
    (workflows / "model.params.json").write_text(json.dumps(MODEL_PARAMS), encoding="utf-8")


class Gateway:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def run(self, model: str) -> None:
        body = {"workflow": "model", "params": {"model": model}}
        async with self.http.post(f"{self.base}/jobs?wait=20", json=body) as response:
            job = await response.json()
        assert job["status"] == "succeeded", job

    async def cache(self) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/backends") as response:
            (backend,) = await response.json()
        cache: dict[str, Any] = backend["cache"]
        return cache


def models(*letters: str) -> list[str]:
    return [f"SimulatedLoader.ckpt_name=model-{letter}.safetensors" for letter in letters]


async def behind_our_back(sim: SimulatedComfyUI, model: str) -> None:
    """Another client runs a prompt on the backend and waits for it to end."""
    prompt_id = str(uuid.uuid4())
    body = {"prompt": chain(model, 0.0, "other"), "prompt_id": prompt_id}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sim.url}/prompt", json=body) as response:
            assert response.status == 200
        async with asyncio.timeout(10):
            while True:
                async with http.get(f"{sim.url}/history/{prompt_id}") as response:
                    if await response.json():
                        return
                await asyncio.sleep(0.05)  # polling a remote server: no event to wait on


async def test_the_model_follows_the_backend_and_is_corrected_by_execution_cached(
    settings: Settings, workflows: Path
) -> None:
    add_model_workflow(workflows)
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            gateway = Gateway(http, base + settings.route_prefix)
            await gateway.run("model-a.safetensors")
            assert await gateway.cache() == {
                "policy": "classic", "held_nodes": 3, "models": models("a"),
                "predictions": 1, "mispredictions": 0,
            }
            # The same model again: loader and work served from cache, as predicted.
            await gateway.run("model-a.safetensors")
            cache = await gateway.cache()
            assert (cache["predictions"], cache["mispredictions"]) == (2, 0)

            # Another client loads model c there: the backend holds c, not a. Our next
            # prompt on c is mispredicted (the loader served from cache, unseen by us) ...
            await behind_our_back(sim, "model-c.safetensors")
            await gateway.run("model-c.safetensors")
            cache = await gateway.cache()
            assert (cache["models"], cache["mispredictions"]) == (models("c"), 1)
            # ... and corrected: the one after is predicted right.
            await gateway.run("model-c.safetensors")
            cache = await gateway.cache()
            assert (cache["predictions"], cache["mispredictions"]) == (4, 1)

            # /free behind our back: what we believed held is not; believed again after.
            async with http.post(f"{sim.url}/free", json={"free_memory": True}) as response:
                assert response.status == 200
            await gateway.run("model-c.safetensors")
            await gateway.run("model-c.safetensors")
            cache = await gateway.cache()
            assert (cache["predictions"], cache["mispredictions"]) == (6, 2)


async def test_an_lru_backend_holds_several_models(settings: Settings, workflows: Path) -> None:
    add_model_workflow(workflows)
    async with SimulatedComfyUI(cache=CachePolicy("lru", 20)) as sim:
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            gateway = Gateway(http, base + settings.route_prefix)
            for letter in "aba":
                await gateway.run(f"model-{letter}.safetensors")
            cache = await gateway.cache()
    assert cache["policy"] == "lru 20"
    assert cache["models"] == models("a", "b")
    assert (cache["predictions"], cache["mispredictions"]) == (3, 0)
