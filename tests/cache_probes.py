"""Probes of ComfyUI's cache between prompts: recorded from real servers, replayed on the sim.

Record (real ComfyUI 0.3.64 with tests/fixtures/real_comfyui_nodes loaded, one server per cache
option; see /work/shared/tools/real-comfyui.sh):

    python -m tests.cache_probes classic=127.0.0.1:8388 lru=127.0.0.1:8389 none=127.0.0.1:8390

writes tests/fixtures/comfyui-0.3.64/cache_probes.json: per server, its argv and every step
(an upload, a /free, or a prompt with the nodes it served from cache and the nodes it ran).
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

JSON = dict[str, Any]
FIXTURE = Path(__file__).parent / "fixtures" / "comfyui-0.3.64" / "cache_probes.json"


def chain(model: str, seconds: float, prefix: str) -> JSON:
    """SimulatedLoader -> SimulatedWork -> SaveImage: a model, some work, an output."""
    return {
        "1": {"class_type": "SimulatedLoader", "inputs": {"ckpt_name": model}},
        "2": {"class_type": "SimulatedWork",
              "inputs": {"image": ["1", 0], "seconds": seconds, "steps": 2, "preview": False}},
        "3": save("2", prefix),
    }


def empty(color: int = 0) -> JSON:
    return {"class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}}


def save(image: str, prefix: str) -> JSON:
    return {"class_type": "SaveImage", "inputs": {"images": [image, 0], "filename_prefix": prefix}}


def batch(second_parent: str) -> JSON:
    """Two identical EmptyImage nodes; ImageBatch takes node 1 and `second_parent`."""
    return {
        "1": empty(), "2": empty(),
        "3": {"class_type": "ImageBatch",
              "inputs": {"image1": ["1", 0], "image2": [second_parent, 0]}},
        "4": save("3", "batch"),
    }


def invert(note: Any, ids: tuple[str, str, str] = ("1", "2", "3")) -> JSON:
    """EmptyImage -> ImageInvert (with an undeclared input `note`) -> SaveImage."""
    source, inverted, output = ids
    return {
        source: empty(7),
        inverted: {"class_type": "ImageInvert", "inputs": {"image": [source, 0], "note": note}},
        output: save(inverted, "inv"),
    }


def load_image(name: str) -> JSON:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": save("2", "load"),
    }


def websocket_save() -> JSON:
    return {"1": empty(3),
            "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}}


def prompt(p: JSON) -> JSON:
    return {"prompt": p}


def upload(name: str, color: int) -> JSON:
    return {"upload": name, "color": color}


A, B, C = "model-a.safetensors", "model-b.safetensors", "model-c.safetensors"

# Per cache option: the steps, in order, each series starting with an empty cache.
PROBES: dict[str, list[JSON]] = {
    "classic": [
        {"free": True},
        prompt(chain(A, 0.1, "p1")),
        prompt(chain(A, 0.2, "p2")),  # another job on the same model: the loader is cached
        prompt(chain(B, 0.1, "p3")),
        prompt(chain(A, 0.1, "p4")),  # classic remembers one prompt only
        prompt(batch("2")),
        prompt(batch("1")),  # one parent twice is another key; node 2 (unused) is listed
        prompt(invert(1)),
        prompt(invert(1.0)),  # 1 == 1.0: all cached, undeclared input included
        prompt(invert("1")),
        prompt(invert("1", ids=("7", "8", "9"))),  # node ids do not matter
        prompt(websocket_save()),
        prompt(websocket_save()),  # IS_CHANGED is the time: never cached
        upload("probe.png", 0x102030),
        prompt(load_image("probe.png")),
        prompt(load_image("probe.png")),
        upload("probe.png", 0x405060),  # same name, new bytes: IS_CHANGED (the hash) differs
        prompt(load_image("probe.png")),
        {"free": True},
        prompt(load_image("probe.png")),
    ],
    "lru": [
        {"free": True},
        prompt(chain(A, 0.1, "p1")),
        prompt(chain(B, 0.1, "p2")),
        prompt(chain(A, 0.1, "p3")),
        prompt(chain(C, 0.1, "p4")),
        prompt(chain(B, 0.1, "p5")),
        prompt(chain(A, 0.1, "p6")),
        prompt(chain(A, 0.1, "p6")),
    ],
    "none": [
        {"free": True},
        prompt(chain(A, 0.1, "p1")),
        prompt(chain(A, 0.1, "p1")),
    ],
}


def png_bytes(color: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), ((color >> 16) & 255, (color >> 8) & 255, color & 255)).save(
        buffer, format="PNG")
    return buffer.getvalue()


async def run_step(http: aiohttp.ClientSession, base: str, ws: aiohttp.ClientWebSocketResponse,
                   client_id: str, step: JSON) -> JSON:
    """Do one step; for a prompt, return what the server reported about it."""
    if "upload" in step:
        form = aiohttp.FormData()
        form.add_field("image", png_bytes(step["color"]), filename=step["upload"],
                       content_type="image/png")
        form.add_field("overwrite", "true")
        async with http.post(f"{base}/upload/image", data=form) as response:
            assert response.status == 200, await response.text()
        return dict(step)
    if "free" in step:
        async with http.post(f"{base}/free", json={"free_memory": True}) as response:
            assert response.status == 200
        return dict(step)
    body = {"prompt": step["prompt"], "client_id": client_id, "prompt_id": str(uuid.uuid4())}
    async with http.post(f"{base}/prompt", json=body) as response:
        assert response.status == 200, await response.text()
    cached: list[str] | None = None
    ran: list[str] = []
    outcome = None
    while True:
        frame = await ws.receive(timeout=60)
        if frame.type != aiohttp.WSMsgType.TEXT:
            continue  # previews
        message = json.loads(frame.data)
        data = message["data"]
        if data.get("prompt_id") != body["prompt_id"]:
            continue
        kind = message["type"]
        if kind == "execution_cached":
            cached = data["nodes"]
        elif kind == "executing" and data["node"] is not None:
            ran.append(data["node"])
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            outcome = kind
        elif kind == "executing":
            break
    return {"prompt": step["prompt"], "cached": cached, "ran": ran, "outcome": outcome}


async def record(servers: dict[str, str]) -> JSON:
    recorded: JSON = {}
    async with aiohttp.ClientSession() as http:
        for kind, address in servers.items():
            base = f"http://{address}"
            async with http.get(f"{base}/system_stats") as response:
                argv = (await response.json())["system"]["argv"]
            client_id = f"probe-{uuid.uuid4().hex}"
            async with http.ws_connect(f"{base}/ws?clientId={client_id}") as ws:
                steps = [await run_step(http, base, ws, client_id, step) for step in PROBES[kind]]
            recorded[kind] = {"argv": argv, "steps": steps}
    return recorded


def main(arguments: list[str]) -> None:
    servers = dict(argument.split("=", 1) for argument in arguments)
    result = asyncio.run(record(servers))
    FIXTURE.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main(sys.argv[1:])
