"""A ComfyUI-server client moves to comfyfleet: its workflows through `import-seed`, its requests
to `POST /api/v1` unchanged (extra parameters and all), and its callback receiver reading the old
record, which it can verify as a Standard Webhooks signature when it is ready.

The client and its receiver are written as ComfyUI-server's README and client example show
them; the backend is a simulated ComfyUI with the model nodes the templates use, outputs go to
S3 (moto), where the receiver fetches them by `s3_key` as it did before."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiobotocore.session import get_session
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from comfyfleet.app import serving
from comfyfleet.cli.import_seed import import_seed
from comfyfleet.jobs.comfyui_server import comfyui_server_record
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.conftest import S3_CREDENTIALS
from tests.support import LOOPBACK, png

SEED = Path(__file__).resolve().parent / "fixtures" / "comfyui-server"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


class OldReceiver:
    """ComfyUI-server's client example: POST /callback takes the record as a dict. This one
    also keeps the headers, to verify the signature."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.raw: list[tuple[dict[str, str], str]] = []
        self.arrived = asyncio.Condition()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/callback", self._callback)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, LOOPBACK, 0).start()
        self.url = f"http://{LOOPBACK}:{self._runner.addresses[0][1]}/callback"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _callback(self, request: web.Request) -> web.Response:
        body = await request.text()
        async with self.arrived:
            self.records.append(json.loads(body))
            self.raw.append((dict(request.headers), body))
            self.arrived.notify_all()
        return web.json_response({})

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(30), self.arrived:
            await self.arrived.wait_for(lambda: len(self.records) >= count)


@pytest.fixture
async def old_receiver() -> AsyncIterator[OldReceiver]:
    receiver = OldReceiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest.fixture
def imported(tmp_path: Path, settings: Settings) -> Path:
    directory = tmp_path / "workflows"
    _, ok = import_seed(SEED, directory)
    assert not ok  # upscale has logic of its own; text2img and img2img convert
    assert sorted(p.name for p in directory.glob("*.json")) == [
        "img2img.json", "img2img.params.json", "text2img.json", "text2img.params.json"]
    settings.workflows_dir = directory
    return directory


async def test_a_comfyui_server_client_and_receiver_work_unchanged(
    settings: Settings, imported: Path, old_receiver: OldReceiver, s3_endpoint: str,
    s3_bucket: str,
) -> None:
    settings.storage = "s3"
    settings.s3_bucket, settings.s3_endpoint_url = s3_bucket, s3_endpoint
    settings.aws_access_key_id = S3_CREDENTIALS["aws_access_key_id"]
    settings.aws_secret_access_key = S3_CREDENTIALS["aws_secret_access_key"]
    picture = base64.b64encode(png()).decode()
    requests = [
        {"service_type": "text2img", "client_task_id": "order-1",
         "client_callback_url": old_receiver.url,
         "params": {"text": 'two "capybaras"', "seed": 5, "steps": 30}},
        {"service_type": "img2img", "client_task_id": "order-2",
         "client_callback_url": old_receiver.url,
         "params": {"text": "in the snow", "image": picture, "seed": 5}},
    ]
    async with SimulatedComfyUI(models=[CHECKPOINT]) as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings, port=0) as base, aiohttp.ClientSession() as http:
            answers = []
            for request in requests:
                async with http.post(f"{base}/api/v1", json=request) as response:
                    assert response.status == 202, await response.text()
                    answers.append(await response.json())
            await old_receiver.wait_for(2)
            async with http.get(f"{base}/api/v1/jobs/{answers[0]['id']}") as response:
                text2img = await response.json()
    # The answer is the record as ComfyUI-server gave it (not yet queued on ComfyUI here).
    for answer, request in zip(answers, requests, strict=True):
        assert answer["client_task_id"] == request["client_task_id"]
        assert answer["client_callback_url"] == old_receiver.url
        assert answer["error_code"] == 0
        assert {"id", "comfyui_task_id", "s3_key", "comfyui_filepath"} <= answer.keys()
    # Extra parameters are ignored, as there, and the job says so.
    assert text2img["params"] == {"text": 'two "capybaras"', "seed": 5}
    assert [w["param"] for w in text2img["warnings"]] == ["steps"]
    assert "'steps' is not a parameter of workflow 'text2img'" in text2img["warnings"][0][
        "message"]
    assert [w["param"] for w in answers[1]["warnings"]] == ["seed"]
    by_task = {record["client_task_id"]: record for record in old_receiver.records}
    assert by_task["order-1"]["comfyui_task_id"] == text2img["prompt_id"] is not None
    assert by_task["order-1"]["id"] == text2img["id"]
    s3 = get_session().create_client("s3", region_name="us-east-1", endpoint_url=s3_endpoint,
                                     **S3_CREDENTIALS)
    async with s3 as client:
        for record in by_task.values():
            assert record["error_code"] == 0
            assert record["comfyui_filepath"].endswith(".png")
            stored = await client.get_object(Bucket=s3_bucket, Key=record["s3_key"])
            async with stored["Body"] as stream:
                assert (await stream.read()).startswith(b"\x89PNG")
    # The same Standard Webhooks headers as every webhook: verifiable when the receiver wants.
    assert settings.webhook_secret is not None
    for headers, body in old_receiver.raw:
        verified = Webhook(settings.webhook_secret).verify(body, headers)
        assert verified["client_task_id"] in ("order-1", "order-2")


async def test_without_compat_the_endpoint_is_as_strict_as_post_jobs(
    settings: Settings, imported: Path
) -> None:
    settings.comfyui_server_compat = False
    params: dict[str, Any] = {"text": "x", "steps": 30}
    request = {"service_type": "text2img", "client_task_id": "order-9", "params": params}
    async with serving(settings, port=0) as base, aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/v1", json=request) as response:
            refused = await response.json()
            assert response.status == 422
        del params["steps"]
        async with http.post(f"{base}/api/v1", json=request) as response:
            job: dict[str, Any] = await response.json()
    assert refused["error"]["params"] == {"steps": "unknown parameter"}
    assert "error_code" not in job and job["warnings"] == []
    assert job["webhook_format"] == "standard"


@pytest.mark.parametrize(("error", "code"), [(None, 0), ("prompt_rejected", 1),
                                             ("output_unavailable", 3),
                                             ("collection_failed", 3),
                                             ("execution_error", 10), ("cancelled", 10)])
def test_error_codes_keep_their_comfyui_server_meanings(error: str | None, code: int) -> None:
    job: dict[str, Any] = {"callback_url": None, "prompt_id": None, "outputs": [],
                           "error": None if error is None else {"type": error}}
    assert comfyui_server_record(job)["error_code"] == code


def test_the_record_names_the_first_image() -> None:
    outputs = [{"node_id": "5", "text": "caption"},
               {"node_id": "7", "filename": "a.mp4", "content_type": "video/mp4", "key": "j/7"},
               {"node_id": "9", "filename": "b.png", "content_type": "image/png", "key": "j/9"}]
    record = comfyui_server_record({"callback_url": "u", "prompt_id": "p", "outputs": outputs,
                                    "error": None})
    assert (record["s3_key"], record["comfyui_filepath"]) == ("j/9", "b.png")
