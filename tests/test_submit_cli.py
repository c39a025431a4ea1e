"""`comfyfleet submit` against a running service with a simulated backend."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from comfyfleet.app import serving
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import child_env


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[str]:
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base:
            yield base + settings.route_prefix


def pngs(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.png"))


async def submit(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfyfleet", "submit", *args, env=child_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_one_job_is_followed_and_its_output_downloaded(server: str, tmp_path: Path
                                                            ) -> None:
    code, output = await submit("invert", "--param", "width=24", "--param", "height=8",
                                "--server", server, "--out", str(tmp_path / "out"))
    assert code == 0, output
    (saved,) = pngs(tmp_path / "out")
    assert Image.open(saved).size == (24, 8)
    assert "succeeded" in output


def picture_folder(directory: Path, *sizes: tuple[int, int]) -> list[Path]:
    """PNGs of those sizes, picture0.png ..., and a file that is not an image."""
    directory.mkdir()
    for n, size in enumerate(sizes):
        buffer = io.BytesIO()
        Image.new("RGB", size, "red").save(buffer, format="PNG")
        (directory / f"picture{n}.png").write_bytes(buffer.getvalue())
    (directory / "notes.txt").write_text("not an image")
    return [directory / f"picture{n}.png" for n in range(len(sizes))]


def job_log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "jobs.jsonl").read_text().splitlines()]


async def test_one_job_per_image_in_a_folder_each_recorded(server: str, tmp_path: Path) -> None:
    """jobs.jsonl says which file became which job, and where that job's outputs went: a
    square input gives a square output, a tall one a tall one (height 0 keeps the aspect)."""
    square, tall = picture_folder(tmp_path / "in", (10, 10), (10, 20))
    out = tmp_path / "out"
    code, output = await submit("blur_image", "--param", "width=20", "--input-dir",
                                str(tmp_path / "in"), "--server", server, "--out", str(out))
    assert code == 0, output
    assert len(pngs(out)) == 2
    submitted, ended = job_log(out)[:2], job_log(out)[2:]
    assert [line["input"] for line in submitted] == [str(square), str(tall)]
    assert [line["status"] for line in submitted] == ["queued", "queued"]
    by_input = {line["input"]: line for line in ended}
    assert {by_input[str(path)]["job_id"] for path in (square, tall)} == {
        line["job_id"] for line in submitted}
    (square_output,) = by_input[str(square)]["outputs"]
    (tall_output,) = by_input[str(tall)]["outputs"]
    assert Image.open(square_output).size == (20, 20)
    assert Image.open(tall_output).size == (20, 40)
    assert by_input[str(square)]["job_id"] in square_output
    assert f"picture1.png: job {by_input[str(tall)]['job_id']}" in output
    job_id = by_input[str(tall)]["job_id"]
    async with aiohttp.ClientSession() as http, http.get(f"{server}/jobs/{job_id}") as response:
        job = await response.json()
    assert job["workflow"] == "blur_image" and job["status"] == "succeeded"


async def test_a_refused_file_is_recorded_and_the_others_run(server: str, tmp_path: Path
                                                             ) -> None:
    (good,) = picture_folder(tmp_path / "in", (10, 10))
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not a PNG at all")
    out = tmp_path / "out"
    code, output = await submit("blur_image", "--input-dir", str(tmp_path / "in"),
                                "--server", server, "--out", str(out))
    assert code == 1, output
    lines = job_log(out)
    refused = [line for line in lines if line["input"] == str(broken)]
    assert len(refused) == 1 and "image" in refused[0]["error"]
    assert "job_id" not in refused[0]
    assert [line["status"] for line in lines if line["input"] == str(good)] == [
        "queued", "succeeded"]
    assert len(pngs(out)) == 1


async def test_an_interrupted_run_has_recorded_its_jobs(settings: Settings, tmp_path: Path
                                                        ) -> None:
    """Killed while its jobs run, submit has already written which file became which job."""
    files = picture_folder(tmp_path / "in", (10, 10), (12, 12))
    out = tmp_path / "out"
    async with SimulatedComfyUI(duration=30) as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base:
            api = base + settings.route_prefix
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "comfyfleet", "submit", "blur_image", "--input-dir",
                str(tmp_path / "in"), "--server", api, "--out", str(out), env=child_env(),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            try:
                async with asyncio.timeout(30):
                    while not (out / "jobs.jsonl").exists() or len(job_log(out)) < 2:
                        assert process.returncode is None
                        await asyncio.sleep(0.1)  # a file gives no event to wait on
            finally:
                process.kill()
                await process.wait()
            async with aiohttp.ClientSession() as http:
                for line, path in zip(job_log(out), files, strict=True):
                    assert line["input"] == str(path)
                    async with http.get(f"{api}/jobs/{line['job_id']}") as response:
                        assert response.status == 200
                        assert (await response.json())["status"] not in ("failed", "cancelled")


async def test_refused_and_failed_jobs_give_a_non_zero_exit(server: str, tmp_path: Path
                                                           ) -> None:
    code, output = await submit("invert", "--param", "width=0", "--server", server)
    assert code == 2
    assert "width" in output
    code, output = await submit("nope", "--server", server)
    assert code == 2
    assert "no workflow named 'nope'" in output


async def test_a_job_failing_on_the_backend_gives_exit_1(settings: Settings) -> None:
    async with SimulatedComfyUI(fail_rate=1.0) as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base:
            code, output = await submit("invert", "--server", base + settings.route_prefix)
    assert code == 1, output
    assert "failed" in output
