"""Where the simulator's blocking work runs: on the event loop when small, else in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from comfyfleet.sim import SimulatedComfyUI, blocking
from comfyfleet.sim.blocking import Disk, image_work
from tests.test_sim import (
    TIMEOUT,
    get_json,
    invert_prompt,
    submit,
    wait_history,
    work_prompt,
)


def on_loop() -> bool:
    return threading.current_thread() is threading.main_thread()


def burn(seconds: float) -> bool:
    """Use `seconds` of CPU time; whether that happened on the event loop's thread."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass
    return on_loop()


async def test_image_work_runs_on_the_loop_only_for_small_images() -> None:
    assert await image_work(blocking.INLINE_PIXELS, on_loop)
    assert not await image_work(blocking.INLINE_PIXELS + 1, on_loop)


async def test_disk_moves_to_a_thread_while_operations_are_slow_and_back() -> None:
    disk = Disk()
    assert await disk.run(100, on_loop)
    assert not await disk.run(blocking.INLINE_BYTES + 1, on_loop)  # big: always a thread
    # A disk whose operations cost a few ms of CPU each (the kernel's work counts too).
    ran_on_loop = [await disk.run(100, burn, 0.002) for _ in range(10)]
    assert ran_on_loop[0] and not ran_on_loop[-1]
    # Fast again: measured in the thread, the average comes down and the loop takes over.
    ran_on_loop = [await disk.run(100, on_loop) for _ in range(200)]
    assert not ran_on_loop[0] and ran_on_loop[-1]


async def test_disk_stalling_without_cpu_moves_to_a_thread() -> None:
    disk = Disk()
    await disk.run(100, time.sleep, blocking.STALL_SECONDS * 1.5)
    assert not await disk.run(100, on_loop)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


async def test_a_long_queue_of_instant_prompts_lets_requests_through(
    tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # However slow the test's disk: every file operation runs on the loop, never waits.
    monkeypatch.setattr(blocking, "FAST_CPU_SECONDS", float("inf"))
    monkeypatch.setattr(blocking, "STALL_SECONDS", float("inf"))
    async with SimulatedComfyUI(data_dir=tmp_path) as sim:
        # The worker is busy while 300 prompts needing no wait queue up, until it is
        # interrupted: not for a time, which a loaded machine's 300 submissions could outlast
        # (the queue then ran down as it filled, and was never seen long).
        busy = await submit(http, sim, {"prompt": work_prompt(seconds=600.0, steps=1)})
        for n in range(300):
            await submit(http, sim, {"prompt": invert_prompt(prefix=f"queued/{n}/x")})
        queue = await get_json(http, f"{sim.url}/queue")
        assert [item[1] for item in queue["queue_running"]] == [busy["prompt_id"]]
        assert len(queue["queue_pending"]) == 300
        async with http.post(f"{sim.url}/interrupt") as response:
            assert response.status == 200
        remaining: list[int] = []
        while not remaining or remaining[-1]:
            async with http.get(f"{sim.url}/prompt") as response:
                status = await response.json()
            remaining.append(status["exec_info"]["queue_remaining"])
    # Seen while the 300 ran, not only before and after them.
    assert any(0 < left < 300 for left in remaining)


@pytest.mark.parametrize("slow_disk", [False, True])
async def test_saved_files_are_the_same_wherever_written(
    tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, slow_disk: bool
) -> None:
    if slow_disk:
        monkeypatch.setattr(blocking, "FAST_CPU_SECONDS", -1.0)  # every operation is slow
    async with SimulatedComfyUI(data_dir=tmp_path) as sim:
        for n in range(3):
            body = {"prompt": invert_prompt(color=0x102030, prefix=f"saved/{n}/x")}
            prompt_id = (await submit(http, sim, body))["prompt_id"]
            entry = await wait_history(http, sim, prompt_id)
            assert entry["status"]["status_str"] == "success"
    for n in range(3):
        with Image.open(tmp_path / "output" / "saved" / str(n) / "x_00001_.png") as image:
            assert image.size == (64, 48)
            assert image.getpixel((0, 0)) == (0xEF, 0xDF, 0xCF)
            assert '"filename_prefix": "saved/' in image.info["prompt"]
