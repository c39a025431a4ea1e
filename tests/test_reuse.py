"""Result reuse: a request for work this API key already had done gets a new job holding those
outputs at once, with its own webhook, and never touches a backend."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyfleet import json_codec
from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import png

PARAMS = {"width": 24, "height": 16, "color": 0x336699}
INVERT: dict[str, Any] = {"workflow": "invert", "params": PARAMS}


class Api:
    def __init__(self, http: aiohttp.ClientSession, prefix: str, sim: SimulatedComfyUI) -> None:
        self.http, self.prefix, self.sim = http, prefix, sim

    async def call(self, method: str, path: str, body: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.http.request(method, self.prefix + path, json=body,
                                     headers=headers) as response:
            return response.status, await response.json()

    async def run(self, body: dict[str, Any], headers: dict[str, str] | None = None
                  ) -> dict[str, Any]:
        """Submit and wait for the end; the job must succeed."""
        status, job = await self.call("POST", "/jobs?wait=20", body, headers)
        assert (status, job["status"]) == (202, "succeeded"), job
        return dict(job)

    async def prompts_run(self) -> int:
        """How many prompts the backend was given."""
        async with self.http.get(f"{self.sim.url}/history") as response:
            return len(await response.json())


@pytest.fixture
async def api(settings: Settings, workflows: Path) -> AsyncIterator[Api]:
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            yield Api(http, base + settings.route_prefix, sim)


def test_the_text_fingerprints_are_made_of_is_the_standard_librarys() -> None:
    """Fingerprints kept with jobs were made of the standard library's sorted JSON; the new
    ones, of orjson's where it writes the same bytes (`json_codec.canonical`): a repeat of
    earlier work is found by either, whatever its parameters hold."""
    values: list[Any] = [
        "a cat", "é 😀 \u2028 \x00\x1f\x7f \"\\/", "", 0, -1, 2**63 - 1, -2**63, 2**64 - 1,
        2**64, -2**63 - 1, 2**80, True, None, 0.5, 1.0, 1e-05, 1e16, 1e300, float("nan"),
        float("inf"), [], [1, "two", None], {}, {"b": 1, "a": {"d": [True], "c": "x"}},
        {"é": 1, "e": 2, "z": 3, "A": 4, "😀": 5}, {1: "a key that is not text"}, (1, 2),
        [[[[[1]]]]], {"nested": [1.5, {"x": 2**70}]}]
    for value in values:
        document = {"workflow": "w", "definition": "d", "params": {"value": value}}
        assert json_codec.canonical(document) == json.dumps(
            document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(), value
    with pytest.raises(UnicodeEncodeError):  # as before: refused earlier, never stored
        json_codec.canonical({"lone": "\ud800"})


async def test_reuse_is_a_new_job_with_the_earlier_outputs_and_its_own_webhook(
    api: Api, receiver: WebhookReceiver
) -> None:
    original = await api.run({**INVERT, "callback_url": receiver.url})
    status, reused = await api.call("POST", "/jobs", {**INVERT, "reuse_outputs": True,
                                                      "callback_url": receiver.url})
    assert status == 202
    assert reused["status"] == "succeeded" and reused["progress"] == 1.0
    assert reused["id"] != original["id"]
    assert reused["reused_from"] == original["id"] and original["reused_from"] is None
    assert [o["key"] for o in reused["outputs"]] == [o["key"] for o in original["outputs"]]
    assert (reused["backend"], reused["prompt_id"], reused["attempts"]) == (None, None, 0)
    assert await api.prompts_run() == 1
    # Its webhook was stored with the job, in the same transaction.
    status, deliveries = await api.call("GET", f"/jobs/{reused['id']}/deliveries")
    assert status == 200
    assert [d["event_type"] for d in deliveries["deliveries"]] == ["job.succeeded"]
    status, shown = await api.call("GET", f"/jobs/{reused['id']}")
    assert (status, shown["reused_from"]) == (200, original["id"])
    for job in (original, reused):
        async with api.http.get(f"{api.prefix}/jobs/{job['id']}/outputs/0") as response:
            assert response.status == 200
            job["bytes"] = await response.read()
    assert reused["bytes"] == original["bytes"]

    await receiver.wait_for(2)
    events = {event["data"]["id"]: event for event in receiver.verified}
    assert events[reused["id"]]["type"] == "job.succeeded"
    assert events[reused["id"]]["data"]["reused_from"] == original["id"]
    assert events[reused["id"]]["webhook_id"] != events[original["id"]]["webhook_id"]


async def test_only_the_same_work_asked_for_reuse_is_reused(api: Api) -> None:
    original = await api.run(INVERT)
    again = await api.run(INVERT)  # not asked for
    other = await api.run({**INVERT, "params": {**PARAMS, "width": 25},
                           "reuse_outputs": True})
    assert again["reused_from"] is None and other["reused_from"] is None
    assert await api.prompts_run() == 3
    # Typed parameters: "24" is the integer 24; the defaults count as given.
    same = {**INVERT, "params": {**PARAMS, "width": "24"}, "reuse_outputs": True}
    status, reused = await api.call("POST", "/jobs", same)
    assert (status, reused["status"]) == (202, "succeeded")
    # The latest run is reused, and never a reuse itself.
    assert reused["reused_from"] == again["id"] != original["id"]
    typed = await api.call("POST", "/workflows/invert/jobs",
                           {"params": PARAMS, "reuse_outputs": True})
    shaped = await api.call("POST", "", {"service_type": "invert", "params": PARAMS,
                                         "reuse_outputs": True})
    for status, job in (typed, shaped):
        assert (status, job["reused_from"]) == (202, again["id"])
    assert await api.prompts_run() == 3


async def test_a_repeat_of_a_reusing_request_is_the_same_job(api: Api) -> None:
    await api.run(INVERT)
    body = {**INVERT, "reuse_outputs": True, "client_task_id": "reuse-1"}
    status, first = await api.call("POST", "/jobs", body)
    assert (status, first["status"]) == (202, "succeeded")
    status, again = await api.call("POST", "/jobs", body)
    assert (status, again["id"]) == (200, first["id"])


async def test_reuse_never_crosses_api_keys(api: Api, settings: Settings) -> None:
    settings.api_keys = ["key-a", "key-b"]
    async with serving(settings) as base:
        keyed = Api(api.http, base + settings.route_prefix, api.sim)
        key_a, key_b = ({"Authorization": f"Bearer {key}"} for key in settings.api_keys)
        ran_for_a = await keyed.run(INVERT, key_a)
        ran_for_b = await keyed.run({**INVERT, "reuse_outputs": True}, key_b)
        assert ran_for_b["reused_from"] is None
        for key, own in ((key_a, ran_for_a), (key_b, ran_for_b)):
            status, reused = await keyed.call("POST", "/jobs", {**INVERT, "reuse_outputs": True},
                                              key)
            assert (status, reused["reused_from"]) == (202, own["id"])
    assert await api.prompts_run() == 2


async def test_a_workflow_opts_in_and_an_edited_one_runs_again(api: Api, workflows: Path
                                                               ) -> None:
    sidecar = workflows / "invert.params.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "reuse_outputs": True}))
    await api.call("POST", "/workflows/reload")
    status, described = await api.call("GET", "/workflows/invert")
    assert (status, described["reuse_outputs"]) == (200, True)
    original = await api.run(INVERT)
    status, reused = await api.call("POST", "/jobs", INVERT)
    assert reused["reused_from"] == original["id"]
    declined = await api.run({**INVERT, "reuse_outputs": False})
    assert declined["reused_from"] is None

    template = workflows / "invert.json"
    prompt = json.loads(template.read_text())
    prompt["2"]["_meta"]["title"] = "Invert the image"
    template.write_text(json.dumps(prompt))
    await api.call("POST", "/workflows/reload")
    rerun = await api.run(INVERT)
    assert rerun["reused_from"] is None
    assert await api.prompts_run() == 3


async def test_images_are_matched_by_their_bytes_and_a_reuse_stores_none(
    api: Api, settings: Settings, image_server: str
) -> None:
    encoded = base64.b64encode(png()).decode()
    blur: dict[str, Any] = {"workflow": "blur_image", "params": {"image": encoded, "width": 32}}
    original = await api.run(blur)
    status, by_url = await api.call("POST", "/jobs", {
        **blur, "params": {**blur["params"], "image": image_server + "/picture.png"},
        "reuse_outputs": True})
    assert (status, by_url["reused_from"]) == (202, original["id"])
    assert by_url["params"]["image"]["sha256"] == original["params"]["image"]["sha256"]
    form = aiohttp.FormData({"width": "32", "reuse_outputs": "true"})
    form.add_field("image", png(), filename="me.png", content_type="image/png")
    async with api.http.post(f"{api.prefix}/workflows/blur_image/jobs", data=form) as response:
        uploaded = await response.json()
    assert uploaded["reused_from"] == original["id"]
    other = await api.run({**blur, "params": {"image": base64.b64encode(png(33)).decode(),
                                              "width": 32}, "reuse_outputs": True})
    assert other["reused_from"] is None
    assert await api.prompts_run() == 2
    stored = settings.data_dir / "outputs"
    assert sorted(path.name for path in stored.iterdir()) == sorted([original["id"],
                                                                     other["id"]])
