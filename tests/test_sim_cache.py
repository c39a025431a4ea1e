"""The simulator's loader stand-in and its cost: the replay of real ComfyUI's cache between
prompts is in test_replay.py (cache_between_prompts)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from comfyfleet.sim import SimulatedComfyUI
from tests.cache_probes import chain, run_step


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
