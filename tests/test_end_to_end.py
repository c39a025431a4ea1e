"""One path through everything real: embedded Postgres, moto S3, two `comfyfleet sim` backends
in their own process, the service, and a webhook receiver verifying every signature."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiobotocore.session import get_session
from PIL import Image
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.settings import Settings
from comfyfleet.webhooks.signing import new_secret
from tests.conftest import S3_CREDENTIALS
from tests.support import LOOPBACK, REPO, free_ports, python_process

JOBS = 6


@pytest.fixture
async def sim_urls() -> AsyncIterator[list[str]]:
    """Two simulated ComfyUI servers from the real CLI; each prompt takes 0.3 s."""
    port = free_ports(2)
    urls = [f"http://{LOOPBACK}:{port}", f"http://{LOOPBACK}:{port + 1}"]
    async with python_process(
        "comfyfleet", "sim", "--backends", "2", "--port", str(port), "--duration", "0.3",
        ready_url=urls[1] + "/system_stats",
    ):
        yield urls


async def test_jobs_run_on_both_backends_land_in_s3_and_webhooks_verify(
    database_url: str, s3_endpoint: str, s3_bucket: str, sim_urls: list[str], tmp_path: Path
) -> None:
    secret = new_secret()
    public = s3_endpoint.replace(LOOPBACK, "localhost")  # where clients reach the store
    receiver = WebhookReceiver(secret)
    await receiver.start()
    settings = Settings(
        _env_file=None,
        database_url=database_url,
        data_dir=tmp_path / "data",
        workflows_dir=REPO / "workflows",
        comfyui_endpoints=[f"{url}#gpu{i}" for i, url in enumerate(sim_urls)],
        s3_bucket=s3_bucket,
        s3_endpoint_url=s3_endpoint,
        s3_public_url=public,
        s3_prefix="outputs/",
        webhook_secret=secret,
        allow_private_callbacks=True,
        aws_access_key_id=S3_CREDENTIALS["aws_access_key_id"],
        aws_secret_access_key=S3_CREDENTIALS["aws_secret_access_key"],
    )
    colors = [0x102030 * (i + 1) for i in range(JOBS)]
    try:
        async with serving(settings, port=0) as base, aiohttp.ClientSession() as http:
            api = base + settings.route_prefix
            submitted = []
            for i, color in enumerate(colors):
                body = {"workflow": "invert", "params": {"width": 40 + i, "height": 30,
                                                         "color": color},
                        "callback_url": receiver.url}
                async with http.post(f"{api}/jobs", json=body) as response:
                    assert response.status == 202
                    submitted.append(await response.json())
            async with asyncio.timeout(60):
                await receiver.wait_for(JOBS)
            async with http.get(f"{api}/jobs/{submitted[0]['id']}") as response:
                first = await response.json()
            assert first["outputs"][0]["url"].startswith(f"{public}/{s3_bucket}/")
            async with http.get(first["outputs"][0]["url"]) as response:
                assert response.status == 200
                presigned_bytes = await response.read()
            async with http.get(f"{api}/jobs/{first['id']}/outputs/0",
                                allow_redirects=False) as response:
                assert response.status == 307
                location = response.headers["Location"]
                assert location.startswith(f"{public}/{s3_bucket}/{first['outputs'][0]['key']}?")
            async with http.get(location) as response:
                assert (response.status, await response.read()) == (200, presigned_bytes)
    finally:
        await receiver.stop()

    assert receiver.rejected == 0
    events = {event["data"]["id"]: event for event in receiver.verified}
    assert set(events) == {job["id"] for job in submitted}
    assert len({event["webhook_id"] for event in receiver.verified}) == JOBS
    assert {event["type"] for event in events.values()} == {"job.succeeded"}
    assert {event["data"]["backend"] for event in events.values()} == {"gpu0", "gpu1"}

    async with get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=s3_endpoint, **S3_CREDENTIALS
    ) as s3:
        for i, job in enumerate(submitted):
            (output,) = events[job["id"]]["data"]["outputs"]
            assert output["key"] == f"outputs/{job['id']}/3_0.png"
            assert output["content_type"] == "image/png"
            stored = await s3.get_object(Bucket=s3_bucket, Key=output["key"])
            png = await stored["Body"].read()
            assert stored["ContentType"] == "image/png"
            assert len(png) == output["size"]
            image = Image.open(io.BytesIO(png))
            assert image.size == (40 + i, 30)
            inverted = 0xFFFFFF - colors[i]
            expected = (inverted >> 16 & 0xFF, inverted >> 8 & 0xFF, inverted & 0xFF)
            assert image.convert("RGB").getpixel((0, 0)) == expected
            if i == 0:
                assert presigned_bytes == png

    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT id, status, backend, prompt_id, attempts, outputs, finished_at "
                "FROM jobs"))).all()
    finally:
        await engine.dispose()
    assert len(rows) == JOBS
    for row in rows:
        assert row.status == "succeeded"
        assert row.backend in ("gpu0", "gpu1")
        assert uuid.UUID(row.prompt_id).version == 4
        assert row.attempts == 1
        assert row.outputs[0]["key"].startswith(f"outputs/{row.id}/")
        assert row.finished_at is not None
