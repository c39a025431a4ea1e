"""The simulator's loaders (its stand-in and the real loader classes of the sample SD
workflows) and their cost: the replay of real ComfyUI's cache between prompts is in
test_replay.py (cache_between_prompts)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyfleet.sim import SimulatedComfyUI
from comfyfleet.sim.nodes import LOADER_FILE_INPUTS, model_specs
from comfyfleet.workflows.catalog import load_catalog
from tests.cache_probes import chain, run_step
from tests.model_sim import FULL_OBJECT_INFO
from tests.support import REPO


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def test_simulated_loader_takes_its_load_time_unless_cached(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    load_seconds, speed = 0.4, 2.0
    sim = SimulatedComfyUI(data_dir=tmp_path, load_seconds=load_seconds, speed=speed)
    await sim.start()
    try:
        async with http.ws_connect(f"{sim.url}/ws?clientId=loader") as ws:
            started = time.monotonic()
            cold = await run_step(http, sim.url, ws, "loader",
                                  {"prompt": chain("model-b.safetensors", 0.0, "one")})
            cold_seconds = time.monotonic() - started
            warm = await run_step(http, sim.url, ws, "loader",
                                  {"prompt": chain("model-b.safetensors", 0.01, "two")})
    finally:
        await sim.stop()
    assert cold["ran"] == ["1", "2", "3"] and cold["cached"] == []
    assert cold_seconds >= load_seconds / speed
    assert warm["cached"] == ["1"] and warm["ran"] == ["2", "3"]


async def test_a_sample_workflow_loads_its_checkpoint_unless_cached(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """sd15_txt2img on a simulator with model files: its CheckpointLoaderSimple takes the load
    time on the first run and for another checkpoint, not on a rerun of the same one."""
    load_seconds = 1.0
    models = ["v1-5-pruned-emaonly-fp16.safetensors", "dreamshaper_8.safetensors"]
    workflow = load_catalog(REPO / "workflows").workflows["sd15_txt2img"]
    defaults = {name: spec.default for name, spec in workflow.params.items()}

    def txt2img(seed: int, checkpoint: str) -> dict[str, Any]:
        prompt = workflow.fill({**defaults, "prompt": "a lighthouse at dawn", "seed": seed})
        prompt["4"]["inputs"]["ckpt_name"] = checkpoint
        return prompt

    sim = SimulatedComfyUI(data_dir=tmp_path, load_seconds=load_seconds, models=models)
    async with sim, http.ws_connect(f"{sim.url}/ws?clientId=sd") as ws:
        async with http.get(f"{sim.url}/object_info") as response:
            info = await response.json()
        for loader, name in [("CheckpointLoaderSimple", "ckpt_name"), ("LoraLoader", "lora_name"),
                             ("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name")]:
            assert info[loader]["input"]["required"][name][0] == models
        assert info["VAELoader"]["input"]["required"]["vae_name"][0] == [*models, "pixel_space"]
        runs = []
        for seed, checkpoint in [(1, models[0]), (2, models[0]), (3, models[1])]:
            started = time.monotonic()
            step = await run_step(http, sim.url, ws, "sd", {"prompt": txt2img(seed, checkpoint)})
            runs.append((step, time.monotonic() - started))
    (first, first_seconds), (same, same_seconds), (other, other_seconds) = runs
    assert "4" in first["ran"] and first_seconds >= load_seconds
    # The same checkpoint and texts: only the sampler and what follows it run again.
    assert sorted(same["cached"]) == ["4", "5", "6", "7"] and same_seconds < load_seconds
    assert "4" in other["ran"] and other_seconds >= load_seconds


def test_the_model_nodes_are_real_comfyuis_listing_the_files_given() -> None:
    real = json.loads(FULL_OBJECT_INFO.read_text())
    specs = model_specs(["x.safetensors"])
    for class_type, spec in specs.items():
        for name, config in spec["input"]["required"].items():
            if name == LOADER_FILE_INPUTS.get(class_type):
                assert config[0][0] == "x.safetensors"
                config[0].remove("x.safetensors")
        assert spec == real[class_type]
