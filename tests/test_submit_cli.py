"""`comfyfleet submit` against a running service with a simulated backend."""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import AsyncIterator
from pathlib import Path

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


async def test_one_job_per_image_in_a_folder(server: str, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n, color in enumerate(["red", "blue"]):
        buffer = io.BytesIO()
        Image.new("RGB", (10, 10), color).save(buffer, format="PNG")
        (inputs / f"picture{n}.png").write_bytes(buffer.getvalue())
    (inputs / "notes.txt").write_text("not an image")
    code, output = await submit("blur_image", "--param", "width=20", "--input-dir",
                                str(inputs), "--server", server, "--out", str(tmp_path / "out"))
    assert code == 0, output
    saved = pngs(tmp_path / "out")
    assert len(saved) == 2
    assert {Image.open(path).size for path in saved} == {(20, 20)}


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
