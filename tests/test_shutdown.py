"""SIGTERM mid-job: the process claims nothing more, finishes the upload in progress, exits 0,
and the next process completes what was left. Its JSON log lines parse."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import LOOPBACK, free_ports, serve_env, wait_for_job, wait_until_answering

PROMPT_SECONDS = 1.0
OUTPUT_BYTES = 3 * 1024 * 1024
VIEW_BYTES_PER_SECOND = 1024 * 1024  # so each upload takes about 3 s


@asynccontextmanager
async def serve(env: dict[str, str], log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`comfyfleet serve` with its stderr in `log`; killed if the test leaves it running."""
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "comfyfleet", "serve", cwd=log.parent, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
    try:
        await wait_until_answering(f"http://{LOOPBACK}:{env['SERVICE_PORT']}/healthz")
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def job_rows(settings: Settings, ids: list[str]) -> list[dict[str, Any]]:
    assert settings.database_url is not None
    connection = await asyncpg.connect(settings.database_url.replace("+asyncpg", ""))
    try:
        rows = {str(row["id"]): dict(row) for row in await connection.fetch(
            "SELECT id, status, attempts, outputs FROM jobs")}
    finally:
        await connection.close()
    return [{**rows[job_id], "outputs": json.loads(rows[job_id]["outputs"])} for job_id in ids]


async def test_sigterm_mid_job_drains_and_the_next_process_finishes(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    port = free_ports(1)
    api = f"http://{LOOPBACK}:{port}{settings.route_prefix}"
    log = data_root / "serve.log"
    async with SimulatedComfyUI(duration=PROMPT_SECONDS, output_size=OUTPUT_BYTES,
                                view_bytes_per_second=VIEW_BYTES_PER_SECOND) as sim:
        env = serve_env(settings, data_root, port, COMFYUI_ENDPOINTS=f"{sim.url}#gpu",
                        MAX_INFLIGHT_PER_BACKEND="1", LOG_FORMAT="json", SHUTDOWN_TIMEOUT="20")
        async with aiohttp.ClientSession() as http:
            async with serve(env, log) as first:
                ids = []
                for width in (16, 17, 18):
                    body = {"workflow": "invert", "params": {"width": width},
                            "callback_url": receiver.url}
                    async with http.post(f"{api}/jobs", json=body) as response:
                        assert response.status == 202
                        ids.append((await response.json())["id"])
                # The first job's outputs are on their way to storage; the backend's one slot
                # went to the second job, and the third waits in the queue.
                await wait_for_job(http, api, ids[0], "uploading")
                first.send_signal(signal.SIGTERM)
                async with asyncio.timeout(30):
                    assert await first.wait() == 0

            # As the first process left them: the upload finished during the drain, the
            # third job was never claimed, the second is left where it was.
            left = await job_rows(settings, ids)
            assert left[0]["status"] == "succeeded"
            assert left[0]["outputs"][0]["size"] >= OUTPUT_BYTES
            assert left[1]["status"] in ("queued", "dispatched", "running")
            assert (left[2]["status"], left[2]["attempts"]) == ("queued", 0)

            async with serve(env, log):
                for job_id in ids:
                    done = await wait_for_job(http, api, job_id, "succeeded", "failed")
                    assert done["status"] == "succeeded", done
                # Promptly: the first process gave back whatever it had claimed and not sent.
                async with asyncio.timeout(20):
                    await receiver.wait_for(3)
    assert sorted(event["data"]["id"] for event in receiver.verified) == sorted(ids)
    assert all(event["type"] == "job.succeeded" for event in receiver.verified)

    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
    assert any(line["message"] == "waiting up to 20 s for 1 uploads in progress"
               for line in lines)
    dispatched = [line for line in lines if line["message"].startswith(f"job {ids[0]} queued")]
    assert dispatched
    assert dispatched[0]["job_id"] == ids[0]
    assert dispatched[0]["backend"] == "gpu"
    assert dispatched[0]["prompt_id"]
