"""The simulated ComfyUI, driven over real loopback sockets like a client drives ComfyUI.

Expected shapes and orders come from the recorded ComfyUI 0.3.64 transcripts described in
comfyui-protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from comfyfleet.sim import SimulatedComfyUI, run_sim
from comfyfleet.sim.nodes import model_specs
from comfyfleet.workflows.catalog import load_catalog
from tests.support import REPO, free_ports

JSON = dict[str, Any]
TIMEOUT = 5.0


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimulatedComfyUI]:
    server = SimulatedComfyUI(data_dir=tmp_path)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


# --- helpers -------------------------------------------------------------------------------


def invert_prompt(color: int = 0x3366CC, prefix: str = "lab/invert", **invert: Any) -> JSON:
    """EmptyImage 64x48 -> ImageInvert -> SaveImage, the protocol doc's smoke test."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": invert or {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": prefix},
        },
    }


def work_prompt(seconds: float, steps: int, prefix: str = "work") -> JSON:
    """EmptyImage -> SimulatedWork -> SaveImage."""
    prompt = invert_prompt(prefix=prefix)
    prompt["2"] = {
        "class_type": "SimulatedWork",
        "inputs": {"image": ["1", 0], "seconds": seconds, "steps": steps},
    }
    return prompt


async def connect(
    http: aiohttp.ClientSession, sim: SimulatedComfyUI, client_id: str
) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(f"{sim.url}/ws?clientId={client_id}")
    hello = await ws.receive_json(timeout=TIMEOUT)
    assert hello["type"] == "status"
    assert hello["data"]["sid"] == client_id
    return ws


async def submit(http: aiohttp.ClientSession, sim: SimulatedComfyUI, body: JSON) -> JSON:
    async with http.post(f"{sim.url}/prompt", json=body) as response:
        assert response.status == 200, await response.text()
        result: JSON = await response.json()
    return result


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200
        return await response.json()


def decode_binary(frame: bytes) -> JSON:
    """A binary frame's fields (protocol doc 5.4)."""
    (event,) = struct.unpack(">I", frame[:4])
    (number,) = struct.unpack(">I", frame[4:8])
    if event == 1:
        return {"event": event, "image_format": number, "image": frame[8:]}
    header, rest = frame[8 : 8 + number], frame[8 + number :]
    if event == 4:
        return {"event": event, "metadata": json.loads(header), "image": rest}
    assert event == 3
    return {"event": event, "node_id": header.decode(), "text": rest.decode()}


async def receive(ws: aiohttp.ClientWebSocketResponse) -> JSON:
    """The next frame: a text frame's JSON, or `{"type": "binary", "data": <its fields>}`."""
    message = await ws.receive(timeout=TIMEOUT)
    if message.type == WSMsgType.TEXT:
        text: JSON = json.loads(message.data)
        return text
    assert message.type == WSMsgType.BINARY, message
    return {"type": "binary", "data": decode_binary(message.data)}


async def last_words(ws: aiohttp.ClientWebSocketResponse) -> list[JSON]:
    """Close from our side and return what the server still sent before its close frame.

    The server handles a socket's incoming frames in order and answers our close frame only
    after everything before it, so this shows without waiting that nothing else came.
    """
    await ws.send_frame(struct.pack(">H", 1000), WSMsgType.CLOSE)
    messages = []
    while (message := await ws.receive(timeout=TIMEOUT)).type in (WSMsgType.TEXT, WSMsgType.BINARY):
        text = message.type == WSMsgType.TEXT
        messages.append(json.loads(message.data) if text else message.data)
    assert message.type == WSMsgType.CLOSE, message
    return messages


async def until_done(ws: aiohttp.ClientWebSocketResponse, prompt_id: str) -> list[JSON]:
    """Messages up to and including `executing {node: null}` for this prompt."""
    messages = []
    while True:
        message = await receive(ws)
        messages.append(message)
        data = message["data"]
        if message["type"] == "executing" and data == {"node": None, "prompt_id": prompt_id}:
            return messages


async def until_type(ws: aiohttp.ClientWebSocketResponse, event: str) -> JSON:
    while True:
        message = await receive(ws)
        if message["type"] == event:
            return message


async def until_status(ws: aiohttp.ClientWebSocketResponse, remaining: int) -> None:
    while True:
        message = await until_type(ws, "status")
        if message["data"]["status"]["exec_info"]["queue_remaining"] == remaining:
            return


def summary(messages: list[JSON]) -> list[tuple[str, Any]]:
    """(type, the detail that identifies the step) for comparing orders."""
    steps: list[tuple[str, Any]] = []
    for message in messages:
        kind, data = message["type"], message["data"]
        if kind == "status":
            steps.append((kind, data["status"]["exec_info"]["queue_remaining"]))
        elif kind in ("executing", "executed"):
            steps.append((kind, data["node"]))
        elif kind == "progress_state":
            steps.append((kind, {n: s["state"] for n, s in data["nodes"].items()}))
        elif kind == "progress":
            steps.append((kind, (data["value"], data["max"])))
        elif kind == "binary":
            steps.append((kind, data["event"]))
        else:
            steps.append((kind, None))
    return steps


def run_ok(messages: list[JSON]) -> None:
    assert [m["type"] for m in messages if m["type"].startswith("execution_")][-1] == (
        "execution_success"
    )


async def until_clients(
    http: aiohttp.ClientSession, sim: SimulatedComfyUI, done: Callable[[list[str]], bool]
) -> None:
    """Poll the control API until the registered clientIds satisfy `done`."""
    for _ in range(500):
        if done((await get_json(http, f"{sim.url}/_sim"))["clients"]):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the websocket clients never got there")


async def wait_history(http: aiohttp.ClientSession, sim: SimulatedComfyUI, prompt_id: str) -> JSON:
    """Poll /history/{id}, as a client without a websocket would."""
    for _ in range(500):
        history = await get_json(http, f"{sim.url}/history/{prompt_id}")
        if history:
            entry: JSON = history[prompt_id]
            return entry
        await asyncio.sleep(0.01)
    raise AssertionError(f"{prompt_id} never reached the history")


# --- a normal run --------------------------------------------------------------------------


async def test_normal_run_events_view_and_history(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    ws = await connect(http, sim, "client-a")
    prompt = invert_prompt()
    body = {
        "prompt": prompt,
        "client_id": "client-a",
        "extra_data": {"extra_pnginfo": {"lab_note": "hello"}},
    }
    accepted = await submit(http, sim, body)
    prompt_id = accepted["prompt_id"]
    assert accepted == {"prompt_id": prompt_id, "number": 0, "node_errors": {}}

    messages = await until_done(ws, prompt_id)
    assert summary(messages) == [
        ("status", 1),
        ("status", 1),
        ("execution_start", None),
        ("execution_cached", None),
        ("progress_state", {"1": "running"}),
        ("executing", "1"),
        ("progress_state", {"1": "finished"}),
        ("progress_state", {"1": "finished", "2": "running"}),
        ("executing", "2"),
        ("progress_state", {"1": "finished", "2": "finished"}),
        ("progress_state", {"1": "finished", "2": "finished", "3": "running"}),
        ("executing", "3"),
        ("executed", "3"),
        ("progress_state", {"1": "finished", "2": "finished", "3": "finished"}),
        ("execution_success", None),
        ("status", 0),
        ("executing", None),
    ]
    image_ref = {"filename": "invert_00001_.png", "subfolder": "lab", "type": "output"}
    assert messages[12]["data"] == {
        "node": "3",
        "display_node": "3",
        "output": {"images": [image_ref]},
        "prompt_id": prompt_id,
    }
    assert messages[5]["data"] == {"node": "1", "display_node": "1", "prompt_id": prompt_id}
    assert messages[4]["data"]["nodes"]["1"] == {
        "value": 0.0,
        "max": 1.0,
        "state": "running",
        "node_id": "1",
        "prompt_id": prompt_id,
        "display_node_id": "1",
        "parent_node_id": None,
        "real_node_id": "1",
    }
    assert messages[-1]["data"] == {"node": None, "prompt_id": prompt_id}
    assert messages[3]["data"]["nodes"] == []
    assert all(isinstance(m["data"]["timestamp"], int) for m in messages[2:4])

    params = {"filename": "invert_00001_.png", "subfolder": "lab"}
    async with http.get(f"{sim.url}/view", params=params) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "image/png"
        assert r.headers["Content-Disposition"] == 'filename="invert_00001_.png"'
        png = await r.read()
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (64, 48)
        # 0x3366CC inverted; ComfyUI's float math may land one below on a channel.
        pixel = image.convert("RGB").getpixel((10, 10))
        assert isinstance(pixel, tuple)
        expected = (0xCC, 0x99, 0x33)
        assert all(abs(got - want) <= 1 for got, want in zip(pixel, expected, strict=True))
        assert image.info["lab_note"] == '"hello"'  # extra_pnginfo, as a PNG text chunk

    history = await get_json(http, f"{sim.url}/history/{prompt_id}")
    execution_messages = [
        [m["type"], m["data"]] for m in messages if m["type"].startswith("execution_")
    ]
    assert history == {
        prompt_id: {
            "prompt": [
                0,
                prompt_id,
                prompt,
                {"extra_pnginfo": {"lab_note": "hello"}, "client_id": "client-a"},
                ["3"],
            ],
            "outputs": {"3": {"images": [image_ref]}},
            "status": {"status_str": "success", "completed": True, "messages": execution_messages},
            "meta": {
                "3": {"node_id": "3", "display_node": "3", "parent_node": None, "real_node_id": "3"}
            },
        }
    }
    assert list(await get_json(http, f"{sim.url}/api/history")) == [prompt_id]
    assert await get_json(http, f"{sim.url}/queue") == {"queue_running": [], "queue_pending": []}
    assert await get_json(http, f"{sim.url}/prompt") == {"exec_info": {"queue_remaining": 0}}
    assert await get_json(http, f"{sim.url}/history/unknown") == {}
    await ws.close()


async def test_identical_resubmission_reports_old_file_until_free(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    ws = await connect(http, sim, "client-c")
    body = {"prompt": invert_prompt(prefix="cache/same"), "client_id": "client-c"}
    first = await submit(http, sim, body)
    run_ok(await until_done(ws, first["prompt_id"]))
    folder = sim.data_dir / "output" / "cache"
    assert sorted(p.name for p in folder.iterdir()) == ["same_00001_.png"]

    second = await submit(http, sim, body)
    messages = await until_done(ws, second["prompt_id"])
    assert summary(messages)[2:] == [
        ("execution_start", None),
        ("execution_cached", None),
        ("executed", "3"),
        ("progress_state", {"3": "finished"}),
        ("execution_success", None),
        ("status", 0),
        ("executing", None),
    ]
    assert messages[3]["data"]["nodes"] == ["1", "2", "3"]
    old_file = {"filename": "same_00001_.png", "subfolder": "cache", "type": "output"}
    assert messages[4]["data"]["output"] == {"images": [old_file]}
    assert sorted(p.name for p in folder.iterdir()) == ["same_00001_.png"]
    entry = await wait_history(http, sim, second["prompt_id"])
    assert entry["outputs"] == {"3": {"images": [old_file]}}

    # Only a changed upstream node re-runs (and re-saves); unchanged ones stay cached.
    changed = {"prompt": invert_prompt(color=1, prefix="cache/same"), "client_id": "client-c"}
    third = await submit(http, sim, changed)
    messages = await until_done(ws, third["prompt_id"])
    assert messages[3]["data"]["nodes"] == []
    assert sorted(p.name for p in folder.iterdir()) == ["same_00001_.png", "same_00002_.png"]

    # POST /free {"free_memory": true} drops the cache: the same prompt really runs again.
    async with http.post(f"{sim.url}/free", json={"free_memory": True}) as r:
        assert r.status == 200
    fourth = await submit(http, sim, changed)
    messages = await until_done(ws, fourth["prompt_id"])
    assert messages[3]["data"]["nodes"] == []
    assert len(list(folder.iterdir())) == 3
    await ws.close()


# --- validation ----------------------------------------------------------------------------


def _failed(node_id: str, class_type: str, error: JSON, outputs: tuple[str, ...] = ("3",)) -> JSON:
    return {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
            "extra_info": {},
        },
        "node_errors": {
            node_id: {
                "errors": [error],
                "dependent_outputs": list(outputs),
                "class_type": class_type,
            }
        },
    }


def _invalid(message: str, node_id: str) -> JSON:
    details = f"Node ID '#{node_id}'"
    error = {"type": "invalid_prompt", "message": message, "details": details, "extra_info": {}}
    return {"error": error, "node_errors": {}}


_WIDTH_CONFIG = ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}]
_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


def _with(prompt: JSON, node_id: str, node: JSON | None) -> JSON:
    changed = dict(prompt)
    if node is None:
        del changed[node_id]
    else:
        changed[node_id] = node
    return changed


def _empty(**inputs: Any) -> JSON:
    return {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0} | inputs,
    }


def _scale_prompt() -> JSON:
    scale_inputs = {"image": ["1", 0], "width": 16, "height": 16, "crop": "disabled"}
    return _with(
        invert_prompt(),
        "2",
        {"class_type": "ImageScale", "inputs": scale_inputs | {"upscale_method": "nope"}},
    )


def _load_prompt(image: str, slot: int) -> JSON:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", slot], "filename_prefix": "x"}},
    }


# (request body, expected 400 body): the cases of fixtures/comfyui-0.3.64/http_400_errors.json.
VALIDATION_CASES: dict[str, tuple[JSON, JSON]] = {
    "missing_required_input": (
        {"prompt": _with(invert_prompt(), "2", {"class_type": "ImageInvert", "inputs": {}})},
        _failed(
            "2",
            "ImageInvert",
            {
                "type": "required_input_missing",
                "message": "Required input is missing",
                "details": "image",
                "extra_info": {"input_name": "image"},
            },
        ),
    ),
    "unknown_class_type": (
        {"prompt": _with(invert_prompt(), "2", {"class_type": "NoSuchNode", "inputs": {}})},
        _invalid("Cannot execute because node NoSuchNode does not exist.", "2"),
    ),
    "missing_class_type": (
        {"prompt": _with(invert_prompt(), "2", {"inputs": {"image": ["1", 0]}})},
        _invalid("Cannot execute because a node is missing the class_type property.", "2"),
    ),
    "no_outputs": (
        {"prompt": _with(invert_prompt(), "3", None)},
        {
            "error": {
                "type": "prompt_no_outputs",
                "message": "Prompt has no outputs",
                "details": "",
                "extra_info": {},
            },
            "node_errors": {},
        },
    ),
    "value_smaller_than_min": (
        {"prompt": _with(invert_prompt(), "1", _empty(width=0))},
        _failed(
            "1",
            "EmptyImage",
            {
                "type": "value_smaller_than_min",
                "message": "Value 0 smaller than min of 1",
                "details": "width",
                "extra_info": {
                    "input_name": "width",
                    "input_config": _WIDTH_CONFIG,
                    "received_value": 0,
                },
            },
        ),
    ),
    "value_bigger_than_max": (
        {"prompt": _with(invert_prompt(), "1", _empty(height=999999))},
        _failed(
            "1",
            "EmptyImage",
            {
                "type": "value_bigger_than_max",
                "message": "Value 999999 bigger than max of 16384",
                "details": "height",
                "extra_info": {
                    "input_name": "height",
                    "input_config": _WIDTH_CONFIG,
                    "received_value": 999999,
                },
            },
        ),
    ),
    "invalid_input_type": (
        {"prompt": _with(invert_prompt(), "1", _empty(width="abc"))},
        _failed(
            "1",
            "EmptyImage",
            {
                "type": "invalid_input_type",
                "message": "Failed to convert an input value to a INT value",
                "details": "width, abc, invalid literal for int() with base 10: 'abc'",
                "extra_info": {
                    "input_name": "width",
                    "input_config": _WIDTH_CONFIG,
                    "received_value": "abc",
                    "exception_message": "invalid literal for int() with base 10: 'abc'",
                },
            },
        ),
    ),
    "value_not_in_list": (
        {"prompt": _scale_prompt()},
        _failed(
            "2",
            "ImageScale",
            {
                "type": "value_not_in_list",
                "message": "Value not in list",
                "details": f"upscale_method: 'nope' not in {_METHODS}",
                "extra_info": {
                    "input_name": "upscale_method",
                    "input_config": [_METHODS, {}],
                    "received_value": "nope",
                },
            },
        ),
    ),
    "loadimage_missing_file": (
        {"prompt": _load_prompt("does_not_exist.png", 0)},
        _failed(
            "1",
            "LoadImage",
            {
                "type": "custom_validation_failed",
                "message": "Custom validation failed for node",
                "details": "image - Invalid image file: does_not_exist.png",
                "extra_info": {"input_name": "image"},
            },
        ),
    ),
    "bad_linked_input": (
        {"prompt": invert_prompt(image=["1", 0, 5])},
        _failed(
            "2",
            "ImageInvert",
            {
                "type": "bad_linked_input",
                "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                "details": "image",
                "extra_info": {
                    "input_name": "image",
                    "input_config": ["IMAGE", {}],
                    "received_value": ["1", 0, 5],
                },
            },
        ),
    ),
    "no_prompt": (
        {"client_id": "x"},
        {
            "error": {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            },
            "node_errors": {},
        },
    ),
}


@pytest.mark.parametrize("case", sorted(VALIDATION_CASES))
async def test_validation_errors_match_comfyui(
    case: str, sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    body, expected = VALIDATION_CASES[case]
    async with http.post(f"{sim.url}/prompt", json=body) as response:
        assert response.status == 400
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        assert await response.json() == expected


async def test_validation_details_and_partial_outputs(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    # A mismatch on the output node itself is also spelled out in error.details.
    async with http.post(f"{sim.url}/prompt", json={"prompt": _load_prompt("x.png", 1)}) as r:
        assert r.status == 400
        rejected = await r.json()
    details = "images, received_type(MASK) mismatch input_type(IMAGE)"
    assert rejected["error"]["details"] == f"Return type mismatch between linked nodes: {details}"
    assert rejected["node_errors"]["3"]["errors"][0]["extra_info"]["linked_node"] == ["1", 1]

    # A link to a node that does not exist fails like ComfyUI's lookup: with a KeyError.
    async with http.post(f"{sim.url}/prompt", json={"prompt": invert_prompt(image=["9", 0])}) as r:
        assert r.status == 400
        rejected = await r.json()
    inner = rejected["node_errors"]["2"]["errors"][0]
    assert inner["type"] == "exception_during_inner_validation"
    assert inner["extra_info"]["exception_type"] == "KeyError"

    # One valid output is enough: 200, with the broken output reported in node_errors.
    prompt = invert_prompt() | {
        "4": {"class_type": "ImageInvert", "inputs": {}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}},
    }
    accepted = await submit(http, sim, {"prompt": prompt})
    # Two rejected prompts before it still consumed numbers 0 and 1.
    assert accepted["number"] == 2
    assert accepted["node_errors"]["4"]["dependent_outputs"] == ["5"]
    entry = await wait_history(http, sim, accepted["prompt_id"])
    assert entry["prompt"][4] == ["3"]
    assert list(entry["outputs"]) == ["3"]

    async with http.post(f"{sim.url}/api/prompt", data="{not json") as r:
        assert r.status == 500
        assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert await r.text() == "500 Internal Server Error\n\nServer got itself in trouble"


# --- queue, priorities and interrupt -------------------------------------------------------


async def test_queue_priorities_delete_and_interrupt(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    ws = await connect(http, sim, "client-q")
    slow = await submit(http, sim, {"prompt": work_prompt(30, 3000), "client_id": "client-q"})
    await until_type(ws, "progress")  # the slow prompt is running now

    ids = {}
    extras: dict[str, JSON] = {"b": {}, "c": {"front": True}, "d": {}, "e": {"number": -1000.5}}
    for name, extra in extras.items():
        body: JSON = {"prompt": invert_prompt(prefix=f"q/{name}"), "client_id": "client-q"}
        body |= extra
        accepted = await submit(http, sim, body)
        ids[name] = accepted["prompt_id"]
        assert accepted["number"] == {"b": 1, "c": -2, "d": 3, "e": -1000.5}[name]

    queue = await get_json(http, f"{sim.url}/queue")
    assert [item[1] for item in queue["queue_running"]] == [slow["prompt_id"]]
    running = queue["queue_running"][0]
    assert running[3] == {"client_id": "client-q"}
    assert running[4] == ["3"]
    pending = sorted(queue["queue_pending"], key=lambda item: (item[0], item[1]))
    assert [item[1] for item in pending] == [ids["e"], ids["c"], ids["b"], ids["d"]]
    assert await get_json(http, f"{sim.url}/prompt") == {"exec_info": {"queue_remaining": 5}}

    async with http.post(f"{sim.url}/queue", json={"delete": [ids["d"], "unknown"]}) as r:
        assert r.status == 200
    await until_status(ws, 4)  # the deletion is broadcast

    # An interrupt naming a pending prompt does nothing; naming the running one stops it.
    async with http.post(f"{sim.url}/interrupt", json={"prompt_id": ids["b"]}) as r:
        assert r.status == 200
    assert (await until_type(ws, "progress"))["data"]["node"] == "2"
    async with http.post(f"{sim.url}/interrupt", json={"prompt_id": slow["prompt_id"]}) as r:
        assert r.status == 200
    messages = await until_done(ws, slow["prompt_id"])
    assert [m["type"] for m in messages[-3:]] == ["execution_interrupted", "status", "executing"]
    interrupted = messages[-3]["data"]
    assert interrupted == {
        "prompt_id": slow["prompt_id"],
        "node_id": "2",
        "node_type": "SimulatedWork",
        "executed": ["1"],
        "timestamp": interrupted["timestamp"],
    }
    entry = await wait_history(http, sim, slow["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1] == ["execution_interrupted", interrupted]

    # The rest runs in priority order, untouched by the interrupt.
    for name in ("e", "c", "b"):
        run_ok(await until_done(ws, ids[name]))
    history = await get_json(http, f"{sim.url}/history")
    assert list(history) == [slow["prompt_id"], ids["e"], ids["c"], ids["b"]]
    assert list(await get_json(http, f"{sim.url}/history?max_items=1")) == [ids["b"]]
    await ws.close()


async def test_simulated_work_progress_and_speed(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # An hour at speed 36000 is 0.1 s: without the speed factor these prompts would never end
    # within the receive timeout. `duration` does not apply to prompts with SimulatedWork.
    async with SimulatedComfyUI(data_dir=tmp_path, speed=36000.0, duration=3600) as sim:
        ws = await connect(http, sim, "client-w")
        body = {"prompt": work_prompt(3600, 4), "client_id": "client-w"}
        accepted = await submit(http, sim, body)
        messages = await until_done(ws, accepted["prompt_id"])
        steps = [s for s in summary(messages) if s[0] in ("progress", "executing", "binary")]
        # Each step has a preview, after its `progress` for a client without preview metadata.
        assert steps == [
            ("executing", "1"),
            ("executing", "2"),
            ("progress", (1, 4)),
            ("binary", 1),
            ("progress", (2, 4)),
            ("binary", 1),
            ("progress", (3, 4)),
            ("binary", 1),
            ("progress", (4, 4)),
            ("binary", 1),
            ("executing", "3"),
            ("executing", None),
        ]
        preview = next(m["data"] for m in messages if m["type"] == "binary")
        assert preview["image_format"] == 2  # PNG
        with Image.open(io.BytesIO(preview["image"])) as image:
            assert image.size == (8, 6)  # the 64x48 input, a few dozen pixels
        progress = [m for m in messages if m["type"] == "progress"]
        assert progress[0]["data"] == {
            "value": 1,
            "max": 4,
            "prompt_id": accepted["prompt_id"],
            "node": "2",
        }
        snapshots = [m["data"]["nodes"] for m in messages if m["type"] == "progress_state"]
        states = [(n["2"]["value"], n["2"]["max"], n["2"]["state"]) for n in snapshots if "2" in n]
        # Each snapshot lists every node that started; node 3's start and finish come last.
        assert states == [
            (0.0, 1.0, "running"),
            (1, 4, "running"),
            (2, 4, "running"),
            (3, 4, "running"),
            (4, 4, "running"),
            (4, 4, "finished"),
            (4, 4, "finished"),
            (4, 4, "finished"),
        ]

        # Without SimulatedWork, a prompt takes `duration / speed`.
        accepted = await submit(http, sim, {"prompt": invert_prompt(), "client_id": "client-w"})
        run_ok(await until_done(ws, accepted["prompt_id"]))

        # preview: false leaves out the previews.
        prompt = work_prompt(0, 2)
        prompt["2"]["inputs"]["preview"] = False
        accepted = await submit(http, sim, {"prompt": prompt, "client_id": "client-w"})
        messages = await until_done(ws, accepted["prompt_id"])
        assert "binary" not in {m["type"] for m in messages}
        await ws.close()


async def test_prompt_without_client_id_and_observers(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    observer = await connect(http, sim, "observer")
    accepted = await submit(http, sim, {"prompt": work_prompt(0, 2)})
    seen: list[tuple[str, Any]] = []
    while not seen or seen[-1] != ("status", 0):
        seen.append(summary([await receive(observer)])[0])
    kinds = {kind for kind, _ in seen}
    # Progress and legacy previews are broadcast; the per-client events are not sent to anyone.
    assert kinds == {"status", "progress_state", "progress", "binary"}
    assert ("binary", 1) in seen
    assert ("progress", (2, 2)) in seen
    entry = await wait_history(http, sim, accepted["prompt_id"])
    assert entry["status"]["status_str"] == "success"
    assert entry["prompt"][3] == {}
    await observer.close()


async def test_same_client_id_hazard_and_reconnect(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    old = await connect(http, sim, "dup")
    new = await connect(http, sim, "dup")
    await old.close()
    # Closing the old socket unregistered the id, and with it the new socket.
    await until_clients(http, sim, lambda clients: "dup" not in clients)
    other = await connect(http, sim, "other")
    await submit(http, sim, {"prompt": invert_prompt(prefix="dup")})
    await until_status(other, 0)  # the other socket sees the broadcasts...
    assert await last_words(new) == []  # ...the new "dup" socket none of them

    # A socket (re)connecting with the id of a running prompt learns which node executes.
    ws = await connect(http, sim, "runner")
    accepted = await submit(http, sim, {"prompt": work_prompt(30, 3000), "client_id": "runner"})
    await until_type(ws, "progress")
    again = await connect(http, sim, "runner")
    assert await again.receive_json(timeout=TIMEOUT) == {"type": "executing", "data": {"node": "2"}}
    async with http.post(f"{sim.url}/interrupt") as r:
        assert r.status == 200
    messages = await until_done(again, accepted["prompt_id"])
    assert messages[-3]["type"] == "execution_interrupted"
    for ws_ in (new, other, ws, again):
        await ws_.close()


async def test_feature_flags_negotiation(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    flags = {"supports_preview_metadata": True, "max_upload_size": 104857600}
    async with http.ws_connect(f"{sim.url}/api/ws") as ws:
        hello = await ws.receive_json(timeout=TIMEOUT)
        assert len(hello["data"]["sid"]) == 32  # made-up hex uuid
        await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        assert await ws.receive_json(timeout=TIMEOUT) == {"type": "feature_flags", "data": flags}
        await ws.send_json({"type": "feature_flags", "data": {}})  # only the first one counts
        assert await last_words(ws) == []
    assert await get_json(http, f"{sim.url}/features") == flags


async def test_previews_follow_each_clients_feature_flags(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    # A client that negotiated preview metadata gets type 4 previews, before each `progress`.
    ws = await http.ws_connect(f"{sim.url}/ws?clientId=modern")
    await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    assert [(await receive(ws))["type"] for _ in range(2)] == ["status", "feature_flags"]
    legacy = await connect(http, sim, "legacy")
    accepted = await submit(http, sim, {"prompt": work_prompt(0, 2), "client_id": "modern"})
    messages = await until_done(ws, accepted["prompt_id"])
    steps = [s for s in summary(messages) if s[0] in ("progress", "binary")]
    assert steps == [("binary", 4), ("progress", (1, 2)), ("binary", 4), ("progress", (2, 2))]
    preview = next(m["data"] for m in messages if m["type"] == "binary")
    assert preview["metadata"] == {
        "node_id": "2",
        "prompt_id": accepted["prompt_id"],
        "display_node_id": "2",
        "parent_node_id": None,
        "real_node_id": "2",
        "image_type": "image/png",
    }
    assert preview["image"].startswith(b"\x89PNG")
    # Previews of another client's prompt go to that client only.
    assert {m["type"] for m in await last_words(legacy)} == {"status"}
    await ws.close()


# --- runtime errors ------------------------------------------------------------------------


async def test_execution_errors(sim: SimulatedComfyUI, http: aiohttp.ClientSession) -> None:
    ws = await connect(http, sim, "client-e")
    (sim.data_dir / "input" / "corrupt.png").write_bytes(b"not an image")
    prompt = _load_prompt("corrupt.png", 0)
    accepted = await submit(http, sim, {"prompt": prompt, "client_id": "client-e"})
    messages = await until_done(ws, accepted["prompt_id"])
    assert [m["type"] for m in messages[-4:]] == [
        "executing",
        "execution_error",
        "status",
        "executing",
    ]
    error = messages[-3]["data"]
    assert list(error) == [
        "prompt_id",
        "node_id",
        "node_type",
        "executed",
        "exception_message",
        "exception_type",
        "traceback",
        "current_inputs",
        "current_outputs",
        "timestamp",
    ]
    assert error["node_id"] == "1"
    assert error["node_type"] == "LoadImage"
    assert error["exception_type"] == "PIL.UnidentifiedImageError"
    assert error["exception_message"].startswith("cannot identify image file '")
    assert error["exception_message"].endswith("corrupt.png'\n")
    assert error["current_inputs"] == {"image": ["corrupt.png"]}
    assert error["executed"] == []
    assert all(isinstance(line, str) for line in error["traceback"])
    entry = await wait_history(http, sim, accepted["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][-1] == ["execution_error", error]
    assert entry["outputs"] == {}

    accepted = await submit(
        http, sim, {"prompt": invert_prompt(prefix="../escape"), "client_id": "client-e"}
    )
    messages = await until_done(ws, accepted["prompt_id"])
    error = messages[-3]["data"]
    assert error["node_type"] == "SaveImage"
    assert error["exception_type"] == "Exception"
    assert error["exception_message"].startswith(
        "**** ERROR: Saving image outside the output folder is not allowed."
    )
    assert error["executed"] == ["1", "2"]
    assert error["current_inputs"]["filename_prefix"] == ["../escape"]
    assert error["current_inputs"]["extra_pnginfo"] == [None]
    assert not (sim.data_dir / "escape_00001_.png").exists()
    await ws.close()


# --- files ---------------------------------------------------------------------------------


def _png(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


async def upload(
    http: aiohttp.ClientSession,
    sim: SimulatedComfyUI,
    data: bytes,
    filename: str = "up.png",
    field: str = "image",
    route: str = "/upload/image",
    **fields: str,
) -> tuple[int, Any]:
    with aiohttp.MultipartWriter("form-data") as form:
        part = form.append(data, {"Content-Type": "image/png"})
        # Unquoted, as browsers and `requests` send it (aiohttp would send "..%2Fx.png").
        part.set_content_disposition("form-data", quote_fields=False, name=field, filename=filename)
        for key, value in fields.items():
            form.append(value).set_content_disposition("form-data", name=key)
    async with http.post(f"{sim.url}{route}", data=form) as response:
        body = await response.json() if response.status == 200 else await response.text()
        return response.status, body


async def test_upload_rename_rule_and_load_image(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    stored = {"name": "up.png", "subfolder": "", "type": "input"}
    assert await upload(http, sim, red) == (200, stored)
    assert await upload(http, sim, red) == (200, stored)  # same bytes: reused
    renamed = stored | {"name": "up (1).png"}
    assert await upload(http, sim, blue) == (200, renamed)
    assert await upload(http, sim, blue) == (200, renamed)  # matches the renamed copy
    assert await upload(http, sim, blue, overwrite="true") == (200, stored)
    assert (sim.data_dir / "input" / "up.png").read_bytes() == blue
    assert await upload(http, sim, red, subfolder="sub") == (200, stored | {"subfolder": "sub"})
    assert await upload(http, sim, red, type="temp") == (200, stored | {"type": "temp"})
    assert await upload(http, sim, red, subfolder="../../etc") == (400, "")
    assert await upload(http, sim, red, filename="../x.png") == (400, "")
    assert await upload(http, sim, red, field="notimage") == (400, "")
    assert (await upload(http, sim, red, type="models"))[0] == 500

    info = await get_json(http, f"{sim.url}/object_info/LoadImage")
    assert info["LoadImage"]["input"]["required"]["image"][0] == ["up (1).png", "up.png"]

    ws = await connect(http, sim, "client-u")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "sub/up.png"}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "nearest-exact",
                "width": 16,
                "height": 0,
                "crop": "disabled",
            },
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    accepted = await submit(http, sim, {"prompt": prompt, "client_id": "client-u"})
    messages = await until_done(ws, accepted["prompt_id"])
    run_ok(messages)
    [image_ref] = next(m for m in messages if m["type"] == "executed")["data"]["output"]["images"]
    assert image_ref["type"] == "temp"
    assert image_ref["subfolder"] == ""
    name = image_ref["filename"]
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", name)
    params = {"filename": name, "type": "temp"}
    async with http.get(f"{sim.url}/view", params=params) as r:
        with Image.open(io.BytesIO(await r.read())) as image:
            assert image.size == (16, 12)  # 8x6 scaled to width 16, keeping the aspect ratio
            assert image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    await ws.close()


async def test_upload_mask(sim: SimulatedComfyUI, http: aiohttp.ClientSession) -> None:
    original = io.BytesIO()
    info = PngInfo()
    info.add_text("prompt", "{}")
    Image.new("RGB", (4, 3), (10, 20, 30)).save(original, format="PNG", pnginfo=info)
    (sim.data_dir / "output" / "lab").mkdir()
    (sim.data_dir / "output" / "lab" / "orig.png").write_bytes(original.getvalue())
    mask = io.BytesIO()
    Image.new("RGBA", (4, 3), (0, 0, 0, 77)).save(mask, format="PNG")

    async def upload_mask(name: str, ref: Any, **fields: str) -> tuple[int, Any]:
        if ref is not None:
            fields["original_ref"] = json.dumps(ref)
        return await upload(
            http, sim, mask.getvalue(), name, route="/upload/mask", subfolder="clipspace", **fields
        )

    ref = {"filename": "orig.png", "subfolder": "lab", "type": "output"}
    stored = {"name": "m.png", "subfolder": "clipspace", "type": "input"}
    assert await upload_mask("m.png", ref) == (200, stored)
    with Image.open(sim.data_dir / "input" / "clipspace" / "m.png") as masked:
        assert masked.getpixel((1, 1)) == (10, 20, 30, 77)
        assert masked.info["prompt"] == "{}"  # the original's text chunks are kept

    # As in ComfyUI: a reference that names no file, or a path outside its directory, is
    # still a 200 with nothing written; no reference at all is a server error.
    for name, bad in [
        ("gone.png", {"filename": "nope.png", "type": "output"}),
        ("out.png", {"filename": "orig.png", "subfolder": "../..", "type": "output"}),
        ("up.png", {"filename": "../orig.png"}),
    ]:
        assert await upload_mask(name, bad) == (200, stored | {"name": name})
        assert not (sim.data_dir / "input" / "clipspace" / name).exists()
    assert (await upload_mask("x.png", None))[0] == 500


async def test_request_size_limit(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with SimulatedComfyUI(data_dir=tmp_path, max_upload_size=2000) as sim:
        flags = await get_json(http, f"{sim.url}/features")
        assert flags == {"supports_preview_metadata": True, "max_upload_size": 2000}
        status, body = await upload(http, sim, _png((1, 2, 3), size=(300, 300)) + bytes(2000))
        assert status == 413
        assert body.startswith("Maximum request body size 2000 exceeded")
        assert not (tmp_path / "input" / "up.png").exists()
        assert (await upload(http, sim, _png((1, 2, 3))))[0] == 200
        # The limit applies to every request, as aiohttp's client_max_size in ComfyUI.
        big = {"prompt": invert_prompt(prefix="x" * 3000)}
        async with http.post(f"{sim.url}/prompt", json=big) as response:
            assert response.status == 413


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"filename": "/etc/passwd"}, 400),
        ({"filename": "../v.png", "type": "input"}, 400),
        ({"filename": "v.png", "type": "models"}, 400),
        ({"filename": "passwd", "subfolder": "../../../../etc"}, 403),
        ({"filename": "nope.png"}, 404),
        ({"type": "output"}, 404),
        ({"filename": "sub/../v.png", "type": "input"}, 400),
        ({"filename": "deep/dir/v.png", "type": "input"}, 200),  # basename only
        ({"filename": "v.png [input]", "type": "output"}, 200),
    ],
)
async def test_view_security_checks(
    params: dict[str, str], status: int, sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    (sim.data_dir / "input" / "v.png").write_bytes(_png((1, 2, 3)))
    async with http.get(f"{sim.url}/view", params=params) as response:
        assert response.status == status
        if status == 200:
            assert response.headers["Content-Disposition"] == 'filename="v.png"'
            assert await response.read() == _png((1, 2, 3))


async def test_view_previews(sim: SimulatedComfyUI, http: aiohttp.ClientSession) -> None:
    (sim.data_dir / "input" / "v.png").write_bytes(_png((1, 2, 3)))
    base = {"filename": "v.png", "type": "input"}
    for extra, content_type, magic in [
        ({"preview": "jpeg;50"}, "image/jpeg", b"\xff\xd8\xff"),
        ({"preview": "webp;90"}, "image/webp", b"RIFF"),
        ({"channel": "a"}, "image/png", b"\x89PNG"),
    ]:
        async with http.get(f"{sim.url}/view", params=base | extra) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == content_type
            assert (await response.read()).startswith(magic)


# --- server information and the CLI entry point ---------------------------------------------


async def test_server_information(sim: SimulatedComfyUI, http: aiohttp.ClientSession) -> None:
    stats = await get_json(http, f"{sim.url}/api/system_stats")
    assert stats["system"]["comfyui_version"] == "0.3.64"
    assert str(sim.port) in stats["system"]["argv"]
    assert stats["devices"][0]["type"] == "cpu"

    info = await get_json(http, f"{sim.url}/object_info")
    assert info["SaveImage"]["output_node"] is True
    work = info["SimulatedWork"]
    assert work["category"] == "comfyfleet/sim"
    assert work["output"] == ["IMAGE"]
    assert work["input"]["required"]["seconds"][1]["max"] == 3600
    assert await get_json(http, f"{sim.url}/object_info/SimulatedWork") == {"SimulatedWork": work}
    assert await get_json(http, f"{sim.url}/object_info/NoSuchNode") == {}

    headers = {"Origin": "http://evil.example"}
    async with http.get(f"{sim.url}/prompt", headers=headers) as response:
        assert response.status == 403


async def test_run_sim_serves_consecutive_ports(
    http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_ports(2)
    task = asyncio.create_task(run_sim(2, port, speeds=[0.5], fail_rate=0.25, fail_seed=7))
    try:
        lines: list[str] = []
        for _ in range(500):
            lines += capsys.readouterr().out.splitlines()
            if len(lines) >= 2 or task.done():
                break
            await asyncio.sleep(0.01)
        assert lines == [
            f"sim 0 listening on http://127.0.0.1:{port} (speed 0.5)",
            f"sim 1 listening on http://127.0.0.1:{port + 1} (speed 1)",
        ]
        for i in range(2):
            stats = await get_json(http, f"http://127.0.0.1:{port + i}/system_stats")
            assert str(port + i) in stats["system"]["argv"]
            faults = await get_json(http, f"http://127.0.0.1:{port + i}/_sim/faults")
            assert (faults["fail_rate"], faults["seed"]) == (0.25, 7 + i)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # Cancelling stopped both servers.
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(f"http://127.0.0.1:{port}/prompt")


async def test_node_specs_give_a_server_model_nodes_that_run_as_pass_throughs(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    workflow = load_catalog(REPO / "workflows").workflows["sd15_txt2img"]
    defaults = {name: spec.default for name, spec in workflow.params.items()}
    prompt = workflow.fill({**defaults, "prompt": "a lighthouse at dawn"})
    checkpoint = prompt["4"]["inputs"]["ckpt_name"]
    has = SimulatedComfyUI(data_dir=tmp_path / "has", node_specs=model_specs([checkpoint]))
    lacks = SimulatedComfyUI(data_dir=tmp_path / "lacks", node_specs=model_specs(["x.ckpt"]))
    async with has, lacks:
        info = await get_json(http, f"{has.url}/object_info/CheckpointLoaderSimple")
        assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [checkpoint]
        assert "SaveImage" in await get_json(http, f"{has.url}/object_info")  # still there
        ws = await connect(http, has, "m")
        accepted = await submit(http, has, {"prompt": prompt, "client_id": "m"})
        messages = await until_done(ws, accepted["prompt_id"])
        run_ok(messages)
        (saved,) = [m["data"]["output"]["images"] for m in messages if m["type"] == "executed"]
        assert saved[0]["filename"].startswith("txt2img")
        await ws.close()
        async with http.post(f"{lacks.url}/prompt", json={"prompt": prompt}) as response:
            rejected = await response.json()
        assert response.status == 400
        (error,) = rejected["node_errors"]["4"]["errors"]
        assert (error["type"], error["extra_info"]["input_name"]) == ("value_not_in_list",
                                                                      "ckpt_name")


async def test_partner_keys_show_in_the_queue_and_leave_no_trace_in_the_history(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    """As ComfyUI 0.3.64: extra_data travels with the prompt as sent while it waits and runs
    (GET /queue shows it, nodes read it), and task_done drops the partner-node keys
    (api_key_comfy_org, auth_token_comfy_org) from the copy kept in the history."""
    extra_data = {"api_key_comfy_org": "comfyui-partner-key", "auth_token_comfy_org": "tok",
                  "extra_pnginfo": {"lab_note": "kept"}}
    accepted = await submit(http, sim, {"prompt": work_prompt(1.0, 2), "client_id": "c",
                                        "extra_data": extra_data})
    queue = await get_json(http, f"{sim.url}/queue")
    (item,) = queue["queue_running"] + queue["queue_pending"]
    assert item[1] == accepted["prompt_id"]
    assert item[3] == {**extra_data, "client_id": "c"}
    entry = await wait_history(http, sim, accepted["prompt_id"])
    assert entry["prompt"][3] == {"extra_pnginfo": {"lab_note": "kept"}, "client_id": "c"}
