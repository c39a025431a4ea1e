"""Image parameters from a URL, base64, a data URI or a multipart upload reach the backend
that runs the job, and bad ones are refused at submit naming the parameter."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import random
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import COLOR, REPO, app_on_loopback, png, wait_for_job


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedComfyUI]:
    async with SimulatedComfyUI() as server:
        yield server


@pytest.fixture
async def api(settings: Settings, sim: SimulatedComfyUI
              ) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    settings.comfyui_endpoints = [sim.url]
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        yield http, base + settings.route_prefix


async def output_image(http: aiohttp.ClientSession, prefix: str, job: dict[str, Any]
                       ) -> Image.Image:
    async with http.get(f"{prefix}/jobs/{job['id']}/outputs/0") as response:
        return Image.open(io.BytesIO(await response.read())).convert("RGB")


async def test_each_way_of_sending_an_image_runs_the_job(
    api: tuple[aiohttp.ClientSession, str], image_server: str, sim: SimulatedComfyUI
) -> None:
    http, prefix = api
    encoded = base64.b64encode(png()).decode()
    sources = [encoded, f"data:image/png;base64,{encoded}", f"{image_server}/picture.png"]
    for source in sources:
        async with http.post(f"{prefix}/jobs", json={"workflow": "blur_image", "params": {
                "image": source, "width": 64}}) as response:
            assert response.status == 202, await response.text()
            submitted = await response.json()
        record = submitted["params"]["image"]
        assert record["content_type"] == "image/png" and record["size"] == len(png())
        job = await wait_for_job(http, prefix, submitted["id"])
        assert job["status"] == "succeeded", job
        picture = await output_image(http, prefix, job)
        assert picture.size == (64, 32)  # height 0 keeps the aspect ratio
        assert picture.getpixel((32, 16)) == COLOR
        uploaded = sim.data_dir / "input" / record["subfolder"] / record["name"]
        assert uploaded.read_bytes() == png()


# Noise does not compress: a PNG of a little over 1 MB, many times one read of a socket.
PHOTO_SIDE = 620
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def photo() -> bytes:
    pixels = random.Random(14).randbytes(PHOTO_SIDE * PHOTO_SIDE * 3)
    encoded = io.BytesIO()
    Image.frombytes("RGB", (PHOTO_SIDE, PHOTO_SIDE), pixels).save(encoded, format="PNG")
    assert len(encoded.getvalue()) > 1024 * 1024
    return encoded.getvalue()


@pytest.fixture
async def photo_server(photo: bytes) -> AsyncIterator[str]:
    """Serves `photo` on loopback: /photo.png with a Content-Length, /chunked.png in chunks
    of 64 KiB (no length said), /text.png: not an image."""

    async def plain(_: web.Request) -> web.Response:
        return web.Response(body=photo, content_type="image/png")

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for start in range(0, len(photo), CHUNK):
                await response.write(photo[start:start + CHUNK])
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client stopped reading: over its limit
        return response

    async def text(_: web.Request) -> web.Response:
        return web.Response(text="not a picture " * 1000, content_type="image/png")

    app = web.Application()
    app.router.add_get("/photo.png", plain)
    app.router.add_get("/chunked.png", chunked)
    app.router.add_get("/text.png", text)
    async with app_on_loopback(app) as url:
        yield url


async def test_an_image_url_arrives_whole_however_its_body_is_framed(
    api: tuple[aiohttp.ClientSession, str], photo_server: str, photo: bytes,
    sim: SimulatedComfyUI,
) -> None:
    http, prefix = api
    for path in ("/photo.png", "/chunked.png"):
        async with http.post(f"{prefix}/jobs", json={"workflow": "blur_image", "params": {
                "image": photo_server + path, "width": 31}}) as response:
            assert response.status == 202, await response.text()
            submitted = await response.json()
        record = submitted["params"]["image"]
        assert record["size"] == len(photo)
        assert record["sha256"] == hashlib.sha256(photo).hexdigest()
        job = await wait_for_job(http, prefix, submitted["id"])
        assert job["status"] == "succeeded", job
        uploaded = sim.data_dir / "input" / record["subfolder"] / record["name"]
        assert uploaded.read_bytes() == photo


async def test_an_image_url_over_the_limit_is_413_and_one_not_an_image_422(
    settings: Settings, photo_server: str, photo: bytes
) -> None:
    settings.max_upload_bytes = len(photo) - 1
    answers = {}
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        for path in ("/photo.png", "/chunked.png", "/text.png"):
            request = {"workflow": "blur_image", "params": {"image": photo_server + path}}
            async with http.post(f"{base}{settings.route_prefix}/jobs", json=request) as got:
                answers[path] = got.status, (await got.json())["error"]
    for path in ("/photo.png", "/chunked.png"):  # a length said too large, or read past it
        status, error = answers[path]
        assert status == 413, error
        assert error["type"] == "input_too_large"
        assert f"larger than {len(photo) - 1} bytes" in error["params"]["image"]
    status, error = answers["/text.png"]
    assert status == 422
    assert "not an image" in error["params"]["image"]


async def test_multipart_upload_on_the_typed_endpoint(
    api: tuple[aiohttp.ClientSession, str],
) -> None:
    http, prefix = api
    form = aiohttp.FormData()
    form.add_field("image", png(20, 20), filename="me.png", content_type="image/png")
    form.add_field("width", "40")
    form.add_field("client_task_id", "upload-1")
    async with http.post(f"{prefix}/workflows/blur_image/jobs", data=form) as response:
        assert response.status == 202, await response.text()
        submitted = await response.json()
    assert submitted["client_task_id"] == "upload-1"
    job = await wait_for_job(http, prefix, submitted["id"])
    assert (await output_image(http, prefix, job)).size == (40, 40)


@pytest.mark.parametrize(
    ("image", "says"),
    [
        ("bm90IGFuIGltYWdl", "not an image"),  # base64 of "not an image"
        ("%%%not base64%%%", "expected an http(s) URL"),
        ("{server}/not-found", "HTTP 404"),
        ("http://169.254.169.254/latest/meta-data", "non-public address"),
    ],
)
async def test_bad_image_is_422_naming_the_parameter(
    settings: Settings, image_server: str, image: str, says: str
) -> None:
    settings.allow_private_callbacks = "169.254" not in image  # the guard itself is on trial
    request = {"workflow": "blur_image", "params": {"image": image.format(server=image_server)}}
    async with serving(settings) as base, aiohttp.ClientSession() as http, http.post(
            f"{base}{settings.route_prefix}/jobs", json=request) as response:
        body = await response.json()
    assert response.status == 422
    assert body["error"]["type"] == "invalid_params"
    assert set(body["error"]["params"]) == {"image"}
    assert says in body["error"]["params"]["image"]


async def test_image_over_the_upload_limit_is_refused(settings: Settings) -> None:
    settings.max_upload_bytes = 1000
    noise = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(noise, format="PNG")
    request = {"workflow": "blur_image",
               "params": {"image": base64.b64encode(noise.getvalue()).decode()}}
    async with serving(settings) as base, aiohttp.ClientSession() as http, http.post(
            f"{base}{settings.route_prefix}/jobs", json=request) as response:
        body = await response.json()
    assert response.status == 413
    assert "larger than 1000 bytes" in body["error"]["params"]["image"]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with (almost) no pixel data: a bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


async def test_an_image_of_too_many_pixels_is_422(settings: Settings) -> None:
    settings.max_image_pixels = 32 * 16 - 1
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        prefix = base + settings.route_prefix
        answers = []
        for picture in (png_header(30000, 30000), png(32, 16)):
            request = {"workflow": "blur_image",
                       "params": {"image": base64.b64encode(picture).decode()}}
            async with http.post(f"{prefix}/jobs", json=request) as response:
                answers.append((response.status, await response.json()))
        form = aiohttp.FormData()
        form.add_field("image", png(32, 16), filename="me.png", content_type="image/png")
        async with http.post(f"{prefix}/workflows/blur_image/jobs", data=form) as response:
            answers.append((response.status, await response.json()))
    for status, body in answers:
        assert status == 422, body
        assert "pixels" in body["error"]["params"]["image"]
    assert "32x16 is more than 511 pixels" in answers[1][1]["error"]["params"]["image"]


async def test_uploaded_input_is_deleted_from_the_backend_when_the_job_ends(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMFYFLEET_NODE_TOKEN", "shared-token")  # the ComfyUI side's env
    settings.comfyfleet_node_token = "shared-token"
    package = REPO / "comfyui_nodes" / "comfyfleet_cleanup"
    async with SimulatedComfyUI(custom_nodes=[package]) as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            prefix = base + settings.route_prefix
            async with http.post(f"{prefix}/jobs", json={"workflow": "blur_image", "params": {
                    "image": base64.b64encode(png()).decode(), "width": 8}}) as response:
                submitted = await response.json()
            job = await wait_for_job(http, prefix, submitted["id"])
            record = job["params"]["image"]
            uploaded = sim.data_dir / "input" / record["subfolder"] / record["name"]
            async with asyncio.timeout(10):
                while uploaded.exists():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # deleted by a task after the job ended
    assert job["status"] == "succeeded"


async def test_a_submit_that_makes_no_job_leaves_no_input_in_storage(settings: Settings) -> None:
    settings.max_queued_per_key = 1  # no backends: the first job stays queued
    stored = settings.data_dir / "outputs"

    def files() -> list[str]:
        return sorted(str(path.relative_to(stored)) for path in stored.rglob("*"))

    def blur(picture: bytes, **fields: Any) -> dict[str, Any]:
        encoded = base64.b64encode(picture).decode()
        return {"workflow": "blur_image", "params": {"image": encoded}, **fields}

    async with serving(settings) as base, aiohttp.ClientSession() as http:
        async def submit(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            async with http.post(f"{base}{settings.route_prefix}/jobs", json=body) as response:
                return response.status, await response.json()

        status, job = await submit(blur(png(), client_task_id="photo-1"))
        assert status == 202
        kept = files()
        assert kept == [job["id"], f"{job['id']}/inputs", f"{job['id']}/inputs/image.png"]
        refusals = [
            (blur(png(), client_task_id="photo-1"), 200, None),  # a repeat: the same job
            (blur(png(8), client_task_id="photo-1"), 422, "idempotency_conflict"),
            (blur(png(8)), 429, "queue_full"),
            (blur(png(8), client_task_id="photo\u0000"), 422, "invalid_request"),
        ]
        for body, expected, error in refusals:
            status, answer = await submit(body)
            assert status == expected
            assert (answer["error"] or {}).get("type") == error  # a job's error is null
            assert files() == kept


@pytest.fixture
async def awkward_server() -> AsyncIterator[str]:
    """Image URLs on loopback that misbehave: /stall answers nothing for a minute, /big
    declares 5000 bytes."""
    app = web.Application()

    async def stall(_: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response(body=png(), content_type="image/png")

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=png() + bytes(5000 - len(png())), content_type="image/png")

    app.router.add_get("/stall", stall)
    app.router.add_get("/big", big)
    async with app_on_loopback(app, shutdown_timeout=0.1) as url:
        yield url


@pytest.mark.parametrize(("path", "answer", "says"), [
    ("/stall", (422, "invalid_params"), "took longer than 1 s"),  # no answer at all
    ("/big", (413, "input_too_large"), "is larger than 4000 bytes"),  # by its Content-Length
])
async def test_image_urls_are_fetched_with_a_time_and_a_size_limit(
    settings: Settings, awkward_server: str, path: str, answer: tuple[int, str], says: str
) -> None:
    settings.input_url_timeout = 1.0
    settings.max_upload_bytes = 4000
    request = {"workflow": "blur_image", "params": {"image": awkward_server + path}}
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        async with asyncio.timeout(20), http.post(  # far less than the stalling server's minute
                f"{base}{settings.route_prefix}/jobs", json=request) as response:
            status, body = response.status, await response.json()
        async with http.get(f"{base}{settings.route_prefix}/jobs") as response:
            jobs = (await response.json())["jobs"]
    assert (status, body["error"]["type"]) == answer
    assert says in body["error"]["params"]["image"], body
    assert jobs == []


async def test_a_job_whose_stored_input_is_gone_fails_and_calls_back(
    settings: Settings, receiver: WebhookReceiver
) -> None:
    """The input's bytes gone from storage before dispatch (deleted by hand, by a lifecycle
    rule) will not come back: the job fails once, with its webhook, rather than being put
    back in the backlog and claimed again for ever."""
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            prefix = base + settings.route_prefix

            async def drain(drained: bool) -> None:
                async with http.patch(f"{prefix}/backends/gpu",
                                      json={"drain": drained}) as response:
                    assert response.status == 200, await response.text()

            await drain(True)  # the job waits in the backlog while its input goes
            async with http.post(f"{prefix}/jobs", json={
                    "workflow": "blur_image", "callback_url": receiver.url,
                    "params": {"image": base64.b64encode(png()).decode()}}) as response:
                assert response.status == 202, await response.text()
                submitted = await response.json()
            (settings.data_dir / "outputs" / submitted["params"]["image"]["input"]).unlink()
            await drain(False)

            job = await wait_for_job(http, prefix, submitted["id"], "failed", seconds=15)
            assert job["error"]["type"] == "input_unavailable", job
            assert "image" in job["error"]["message"]
            async with asyncio.timeout(10):
                await receiver.wait_for(1)
            (event,) = receiver.verified
            assert (event["data"]["id"], event["data"]["status"]) == (job["id"], "failed")
            assert event["data"]["error"]["type"] == "input_unavailable"
            # The slot it held is free: the next job runs.
            async with http.post(f"{prefix}/jobs?wait=30",
                                 json={"workflow": "invert"}) as response:
                assert (await response.json())["status"] == "succeeded"
