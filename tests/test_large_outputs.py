"""A large output streams from the backend's /view into S3 with flat memory: `comfyfleet serve`
runs as a process of its own, so its peak RSS can be read from /proc."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.session import get_session

from comfyfleet.sim import SimulatedComfyUI
from tests.conftest import S3_CREDENTIALS
from tests.support import LOOPBACK, REPO, child_env, free_ports, python_process

MIB = 1024 * 1024
OUTPUT_SIZE = 300 * MIB
WARM_UP_SIZE = 40 * MIB  # exercises the multipart path once before the baseline is taken
RSS_GROWTH_LIMIT = 64 * MIB


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise LookupError(f"{field} not in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> int:
    """Start measuring the process's peak RSS afresh; its RSS now, the baseline."""
    # "5" resets VmHWM to the current RSS (proc(5), clear_refs), so an earlier peak (at
    # startup, say) cannot hide what comes next.
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_bytes(pid, "VmRSS")


def peak_rss(pid: int) -> int:
    return _status_bytes(pid, "VmHWM")


@asynccontextmanager
async def s3_service(
    database_url: str, s3_endpoint: str, bucket: str, backend_url: str, data_dir: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`comfyfleet serve` storing in S3, its one backend connected: (process, API base)."""
    port = free_ports(1)
    env = child_env(**{
        "DATABASE_URL": database_url,
        "COMFYUI_ENDPOINTS": f"{backend_url}#gpu",
        "S3_BUCKET": bucket,
        "S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": S3_CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS["aws_secret_access_key"],
        "DATA_DIR": str(data_dir),
        "WORKFLOWS_DIR": str(REPO / "workflows"),
        "SERVICE_PORT": str(port),
    })
    base = f"http://{LOOPBACK}:{port}"
    api = base + "/api/v1"
    async with python_process(
        "comfyfleet", "serve", env=env, ready_url=base + "/healthz"
    ) as process:
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:
                async with http.get(f"{api}/backends") as response:
                    if all(backend["healthy"] for backend in await response.json()):
                        break
                await asyncio.sleep(0.1)  # polling the service: no local event to wait on
        yield process, api


async def run_job(http: aiohttp.ClientSession, api: str, seconds: float) -> dict[str, Any]:
    """One invert job, waited for; the finished job."""
    body = {"workflow": "invert", "params": {"width": 32, "height": 32}}
    async with http.post(f"{api}/jobs", params={"wait": str(seconds)}, json=body) as response:
        assert response.status == 202, await response.text()
        job: dict[str, Any] = await response.json()
    assert job["status"] == "succeeded", job
    return job


async def test_a_large_output_reaches_s3_whole_with_flat_memory(
    database_url: str, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    sim = SimulatedComfyUI(data_dir=tmp_path / "sim", output_size=WARM_UP_SIZE)
    async with (
        sim,
        s3_service(database_url, s3_endpoint, s3_bucket, sim.url, tmp_path / "data")
        as (service, api),
        aiohttp.ClientSession() as http,
    ):
        await run_job(http, api, 60)
        baseline = reset_peak_rss(service.pid)
        sim.faults.update({"output_size": OUTPUT_SIZE})
        job = await run_job(http, api, 120)
        growth = peak_rss(service.pid) - baseline

    (output,) = job["outputs"]
    assert output["size"] == OUTPUT_SIZE
    assert output["key"] == f"{job['id']}/3_0.png"
    async with get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=s3_endpoint, **S3_CREDENTIALS
    ) as s3:
        head = await s3.head_object(Bucket=s3_bucket, Key=output["key"])
        assert head["ContentLength"] == OUTPUT_SIZE
        assert head["ContentType"] == "image/png"
        start = await s3.get_object(Bucket=s3_bucket, Key=output["key"], Range="bytes=0-7")
        assert await start["Body"].read() == b"\x89PNG\r\n\x1a\n"
        end = await s3.get_object(Bucket=s3_bucket, Key=output["key"],
                                  Range=f"bytes={OUTPUT_SIZE - 4096}-")
        assert await end["Body"].read() == bytes(4096)  # the simulator's zero padding
    assert growth < RSS_GROWTH_LIMIT, f"peak RSS grew by {growth / MIB:.1f} MiB"
