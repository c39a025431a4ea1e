"""The simulator's failure injection, set through the constructor and the control API."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from PIL import Image

from comfyfleet.sim import SimulatedComfyUI
from tests.test_sim import (
    JSON,
    TIMEOUT,
    connect,
    get_json,
    invert_prompt,
    last_words,
    submit,
    until_done,
    wait_history,
    work_prompt,
)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


async def until_dropped(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Read what was still in flight until the connection ends, which must be without a
    close frame (a dropped connection, not a closed websocket)."""
    while (message := await ws.receive(timeout=TIMEOUT)).type in (WSMsgType.TEXT, WSMsgType.BINARY):
        pass
    assert message.type in (WSMsgType.CLOSED, WSMsgType.ERROR), message


async def post_json(http: aiohttp.ClientSession, url: str, body: Any = None) -> tuple[int, Any]:
    async with http.post(url, json=body) as response:
        return response.status, await response.json()


async def test_fail_rate_fails_prompts_like_an_out_of_memory_gpu(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with SimulatedComfyUI(data_dir=tmp_path, fail_rate=0.5, fail_seed=7) as sim:
        ws = await connect(http, sim, "client-f")
        outcomes = []
        for i in range(8):
            prompt = work_prompt(0, 1, prefix=f"f/{i}") if i % 2 else invert_prompt(prefix=f"f/{i}")
            prompt["1"]["inputs"]["color"] = i  # nothing cached: every node runs
            accepted = await submit(http, sim, {"prompt": prompt, "client_id": "client-f"})
            messages = await until_done(ws, accepted["prompt_id"])
            outcome = [m for m in messages if m["type"].startswith("execution_")][-1]
            outcomes.append(outcome)
        # The seed decides which prompts fail: one draw per prompt.
        draws = random.Random(7)
        expected = [draws.random() < 0.5 for _ in range(8)]
        assert [o["type"] == "execution_error" for o in outcomes] == expected
        assert any(expected) and not all(expected)

        for i, outcome in enumerate(outcomes):
            if outcome["type"] != "execution_error":
                continue
            error = outcome["data"]
            # SimulatedWork is the "sampler" that runs out of memory; without one, the last
            # node that computes something.
            assert (error["node_id"], error["node_type"]) == (
                ("2", "SimulatedWork") if i % 2 else ("2", "ImageInvert")
            )
            assert error["exception_type"] == "torch.OutOfMemoryError"
            assert error["exception_message"].startswith("CUDA out of memory.")
            assert error["exception_message"].endswith("batch_size to a large number.")
            assert error["executed"] == ["1"]
            entry = await wait_history(http, sim, error["prompt_id"])
            assert entry["status"]["status_str"] == "error"
            assert entry["status"]["messages"][-1] == ["execution_error", error]

        # fail_rate 1 through the control API: every prompt fails.
        await post_json(http, f"{sim.url}/_sim/faults", {"fail_rate": 1})
        body = {"prompt": invert_prompt(prefix="f/x"), "client_id": "client-f"}
        accepted = await submit(http, sim, body)
        messages = await until_done(ws, accepted["prompt_id"])
        assert messages[-3]["type"] == "execution_error"
        await ws.close()


async def test_control_api(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with SimulatedComfyUI(data_dir=tmp_path, name="ctl", output_size=100) as sim:
        defaults = {
            "fail_rate": 0.0,
            "seed": None,
            "hang": False,
            "view_bytes_per_second": None,
            "output_size": 100,
            "prompt_delay": None,
            "system_stats_status": None,
            "prompt_status": None,
            "view_status": None,
            "view_cut_bytes": None,
        }
        assert await get_json(http, f"{sim.url}/_sim/faults") == defaults
        changed = defaults | {"fail_rate": 0.25, "seed": 3, "view_bytes_per_second": 5000}
        changes = {"fail_rate": 0.25, "seed": 3, "view_bytes_per_second": 5000}
        assert await post_json(http, f"{sim.url}/_sim/faults", changes) == (200, changed)
        assert sim.faults.as_json() == changed
        for bad in [
            {"fail_rate": 2},
            {"hang": "yes"},
            {"output_size": -1},
            {"view_bytes_per_second": 0},
            {"seed": 1.5},
            {"prompt_delay": -1},
            {"prompt_delay": "1"},
            {"system_stats_status": 200},
            {"system_stats_status": "500"},
            {"view_status": 302},
            {"prompt_status": 200},
            {"view_cut_bytes": -1},
            {"fail_rate": 0.5, "colour": "red"},
            ["fail_rate"],
        ]:
            status, body = await post_json(http, f"{sim.url}/_sim/faults", bad)
            assert status == 400 and body["error"], bad
        async with http.post(f"{sim.url}/_sim/faults", data="{nope") as response:
            assert response.status == 400
        assert sim.faults.as_json() == changed  # nothing of a bad request applied

        ws = await connect(http, sim, "watcher")
        state = await get_json(http, f"{sim.url}/_sim")
        assert state == {
            "name": "ctl",
            "faults": changed,
            "clients": ["watcher"],
            "queue_remaining": 0,
            "restarts": 0,
        }
        # Not a ComfyUI route: no /api copy.
        async with http.get(f"{sim.url}/api/_sim") as response:
            assert response.status == 404
        await ws.close()


async def test_drop_websockets(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with SimulatedComfyUI(data_dir=tmp_path) as sim:
        first, second = await connect(http, sim, "one"), await connect(http, sim, "two")
        assert await post_json(http, f"{sim.url}/_sim/drop_websockets") == (200, {"dropped": 2})
        for ws in (first, second):
            await until_dropped(ws)
        # The server carries on; a new socket gets the events.
        again = await connect(http, sim, "one")
        accepted = await submit(http, sim, {"prompt": invert_prompt(), "client_id": "one"})
        await until_done(again, accepted["prompt_id"])
        await again.close()


async def test_crash_and_restart(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with SimulatedComfyUI(data_dir=tmp_path) as sim:
        port = sim.port
        ws = await connect(http, sim, "c")
        done = await submit(http, sim, {"prompt": invert_prompt(prefix="r/a"), "client_id": "c"})
        await until_done(ws, done["prompt_id"])
        slow = await submit(http, sim, {"prompt": work_prompt(30, 300), "client_id": "c"})
        pending = await submit(http, sim, {"prompt": invert_prompt(prefix="r/b"), "client_id": "c"})
        (tmp_path / "temp" / "scratch.png").write_bytes(b"x")

        assert await post_json(http, f"{sim.url}/_sim/restart") == (200, {"restarts": 1})
        await until_dropped(ws)
        assert sim.port == port
        empty: JSON = {"queue_running": [], "queue_pending": []}
        assert await get_json(http, f"{sim.url}/queue") == empty
        assert await get_json(http, f"{sim.url}/history") == {}
        assert not (tmp_path / "temp" / "scratch.png").exists()
        assert (tmp_path / "output" / "r" / "a_00001_.png").exists()

        # A new socket hears nothing of the lost prompts; the counter and the cache start over.
        ws = await connect(http, sim, "c")
        again = await submit(http, sim, {"prompt": invert_prompt(prefix="r/a"), "client_id": "c"})
        assert again["number"] == 0
        messages = await until_done(ws, again["prompt_id"])
        prompt_ids = {m["data"].get("prompt_id") for m in messages} - {None}
        assert prompt_ids == {again["prompt_id"]}
        assert messages[3]["data"]["nodes"] == []  # nothing cached
        assert (tmp_path / "output" / "r" / "a_00002_.png").exists()
        for lost in (slow, pending):
            assert await get_json(http, f"{sim.url}/history/{lost['prompt_id']}") == {}
        assert (await get_json(http, f"{sim.url}/_sim"))["restarts"] == 1
        await ws.close()


async def test_hang(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with SimulatedComfyUI(data_dir=tmp_path) as sim:
        ws = await connect(http, sim, "h")
        await post_json(http, f"{sim.url}/_sim/faults", {"hang": True})
        accepted = await submit(http, sim, {"prompt": work_prompt(0, 3), "client_id": "h"})
        # The prompt runs and reaches the history, while the socket stays open and silent.
        entry = await wait_history(http, sim, accepted["prompt_id"])
        assert entry["status"]["status_str"] == "success"
        await until_queue_empty(http, sim)
        assert await last_words(ws) == []

        # Unhung, the next prompt's events flow again (nothing of the earlier one is replayed).
        await post_json(http, f"{sim.url}/_sim/faults", {"hang": False})
        ws = await connect(http, sim, "h")
        accepted = await submit(http, sim, {"prompt": invert_prompt(), "client_id": "h"})
        messages = await until_done(ws, accepted["prompt_id"])
        assert messages[0]["data"] == {"status": {"exec_info": {"queue_remaining": 1}}}
        await ws.close()


async def until_queue_empty(http: aiohttp.ClientSession, sim: SimulatedComfyUI) -> None:
    for _ in range(500):
        if (await get_json(http, f"{sim.url}/prompt"))["exec_info"]["queue_remaining"] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the queue never emptied")


async def test_slow_view(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    rate = 50_000
    async with SimulatedComfyUI(data_dir=tmp_path, view_bytes_per_second=rate) as sim:
        data = random.Random(1).randbytes(12_000)
        (tmp_path / "input" / "blob.bin").write_bytes(data)
        params = {"filename": "blob.bin", "type": "input"}
        started = time.monotonic()
        async with http.get(f"{sim.url}/view", params=params) as response:
            assert response.status == 200
            assert response.content_length == len(data)
            assert response.headers["Content-Disposition"] == 'filename="blob.bin"'
            body = await response.read()
        # A lower bound only: all but the last piece (rate / 20 bytes) were paced.
        assert time.monotonic() - started >= (len(data) - rate // 20) / rate
        assert body == data
        async with http.head(f"{sim.url}/view", params=params) as response:
            assert (response.status, response.content_length) == (200, len(data))
        # Re-encoded previews are throttled too.
        Image.new("RGB", (8, 8)).save(tmp_path / "input" / "p.png")
        preview = {"filename": "p.png", "type": "input", "preview": "jpeg;80"}
        async with http.get(f"{sim.url}/view", params=preview) as response:
            assert response.headers["Content-Type"] == "image/jpeg"
            assert (await response.read()).startswith(b"\xff\xd8")


async def test_view_failures(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """`view_status`: /view answers an error page; `view_cut_bytes`: it promises the whole
    file and drops the connection after that many bytes."""
    data = random.Random(2).randbytes(3000)
    async with SimulatedComfyUI(data_dir=tmp_path) as sim:
        await post_json(http, f"{sim.url}/_sim/faults", {"view_status": 500})
        (tmp_path / "input" / "blob.bin").write_bytes(data)
        params = {"filename": "blob.bin", "type": "input"}
        async with http.get(f"{sim.url}/view", params=params) as response:
            assert response.status == 500
        for rate in (None, 100_000):  # at once, and trickled
            await post_json(http, f"{sim.url}/_sim/faults", {
                "view_status": None, "view_cut_bytes": 1000, "view_bytes_per_second": rate})
            async with http.get(f"{sim.url}/view", params=params) as response:
                assert (response.status, response.content_length) == (200, len(data))
                received = b""
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for piece in response.content.iter_any():
                        received += piece
            assert received == data[:1000]
        await post_json(http, f"{sim.url}/_sim/faults", {"view_cut_bytes": len(data)})
        async with http.get(f"{sim.url}/view", params=params) as response:
            assert await response.read() == data  # no longer than the cut: whole


async def test_output_size(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    size = 3 * 1024 * 1024 + 7
    async with SimulatedComfyUI(data_dir=tmp_path, output_size=size) as sim:
        ws = await connect(http, sim, "o")
        prompt = invert_prompt(prefix="big/out")
        prompt["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
        accepted = await submit(http, sim, {"prompt": prompt, "client_id": "o"})
        messages = await until_done(ws, accepted["prompt_id"])
        images = [m["data"]["output"]["images"][0] for m in messages if m["type"] == "executed"]
        assert len(images) == 2  # SaveImage's and PreviewImage's
        for image in images:
            async with http.get(f"{sim.url}/view", params=image) as response:
                assert response.content_length == size
                received, head = 0, b""
                async for piece in response.content.iter_chunked(256 * 1024):
                    head = head or piece
                    received += len(piece)
            assert received == size
            assert head.startswith(b"\x89PNG")
        path = tmp_path / "output" / "big" / "out_00001_.png"
        with Image.open(path) as saved:  # still a PNG that decodes
            assert saved.size == (64, 48)

        # Gigabytes cost nothing: the padding is a hole in a sparse file.
        huge = 5 * 1024**3
        await post_json(http, f"{sim.url}/_sim/faults", {"output_size": huge})
        body = {"prompt": invert_prompt(prefix="big/huge"), "client_id": "o"}
        accepted = await submit(http, sim, body)
        await until_done(ws, accepted["prompt_id"])
        params = {"filename": "huge_00001_.png", "subfolder": "big"}
        async with http.head(f"{sim.url}/view", params=params) as response:
            assert (response.status, response.content_length) == (200, huge)
        await ws.close()


async def test_faults_survive_a_restart(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with SimulatedComfyUI(data_dir=tmp_path, fail_rate=1.0, fail_seed=1) as sim:
        await post_json(http, f"{sim.url}/_sim/restart")
        ws = await connect(http, sim, "s")
        accepted = await submit(http, sim, {"prompt": invert_prompt(), "client_id": "s"})
        messages: list[JSON] = await until_done(ws, accepted["prompt_id"])
        assert messages[-3]["type"] == "execution_error"
        await ws.close()


async def test_prompt_delay_holds_posts_and_drops_those_whose_client_left(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with SimulatedComfyUI(data_dir=tmp_path) as sim:
        assert (await post_json(http, f"{sim.url}/_sim/faults", {"prompt_delay": 0.5}))[0] == 200
        started = time.monotonic()
        await submit(http, sim, {"prompt": invert_prompt(prefix="d/kept"), "prompt_id": "kept"})
        assert time.monotonic() - started >= 0.5  # held, then queued as usual
        await wait_history(http, sim, "kept")

        # Held as long as the fault says, by its current value: clearing it lets them go on.
        await post_json(http, f"{sim.url}/_sim/faults", {"prompt_delay": 600})
        body = {"prompt": invert_prompt(prefix="d/released"), "prompt_id": "released"}
        posting = asyncio.create_task(http.post(f"{sim.url}/prompt", json=body))
        await asyncio.sleep(0.2)
        assert not posting.done()
        await post_json(http, f"{sim.url}/_sim/faults", {"prompt_delay": None})
        async with await posting as response:
            assert response.status == 200
        await wait_history(http, sim, "released")

        # A client that dies while its POST is held: the prompt is never queued.
        await post_json(http, f"{sim.url}/_sim/faults", {"prompt_delay": 1.0})
        body = {"prompt": invert_prompt(prefix="d/gone"), "prompt_id": "gone"}
        posting = asyncio.create_task(http.post(f"{sim.url}/prompt", json=body))
        await asyncio.sleep(0.2)
        posting.cancel()  # closes its connection
        with contextlib.suppress(asyncio.CancelledError):
            await posting
        await post_json(http, f"{sim.url}/_sim/faults", {"prompt_delay": None})
        await asyncio.sleep(1.0)  # past the moment the held request would have gone on
        await submit(http, sim, {"prompt": invert_prompt(prefix="d/after"), "prompt_id": "after"})
        await wait_history(http, sim, "after")
        assert sorted(await get_json(http, f"{sim.url}/history")) == ["after", "kept",
                                                                      "released"]
        empty: JSON = {"queue_running": [], "queue_pending": []}
        assert await get_json(http, f"{sim.url}/queue") == empty


async def test_system_stats_status(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with SimulatedComfyUI(data_dir=tmp_path) as sim:
        await post_json(http, f"{sim.url}/_sim/faults", {"system_stats_status": 503})
        async with http.ws_connect(f"{sim.url}/ws?clientId=probe") as ws:
            assert (await ws.receive_json())["type"] == "status"  # the socket is as usual
            for path in ("/system_stats", "/api/system_stats"):
                async with http.get(sim.url + path) as response:
                    assert response.status == 503
            async with http.get(f"{sim.url}/queue") as response:
                assert response.status == 200
        await post_json(http, f"{sim.url}/_sim/faults", {"system_stats_status": None})
        async with http.get(f"{sim.url}/system_stats") as response:
            assert response.status == 200
            assert "system" in await response.json()


async def test_prompt_status(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """POST /prompt answers the error status, read as the request is let go, and queues
    nothing."""
    async with SimulatedComfyUI(data_dir=tmp_path) as sim:
        await post_json(http, f"{sim.url}/_sim/faults", {"prompt_delay": 600})
        body = {"prompt": invert_prompt(prefix="s/refused"), "prompt_id": "refused"}
        posting = asyncio.create_task(http.post(f"{sim.url}/prompt", json=body))
        await post_json(http, f"{sim.url}/_sim/faults", {"prompt_status": 500,
                                                         "prompt_delay": None})
        async with await posting as response:
            assert response.status == 500
        await post_json(http, f"{sim.url}/_sim/faults", {"prompt_status": None})
        await submit(http, sim, {"prompt": invert_prompt(prefix="s/taken"), "prompt_id": "taken"})
        await wait_history(http, sim, "taken")
        assert list(await get_json(http, f"{sim.url}/history")) == ["taken"]
