"""`comfyfleet sim` with two clocks: when each prompt was accepted and when it succeeded.

The benchmarks that time a backend's side of a job run their simulators through this module
instead of `comfyfleet sim`. It is the same servers (`run_sim`), with the prompt queue and the
websocket hub swapped for subclasses that note `time.monotonic()`:

- accepted: the prompt enters the queue (`PromptQueue.put`, in the POST /prompt handler right
  before its 200 answer is written);
- started: `execution_start` is handed to the hub for the prompt's client (the hub writes it
  once the worker's loop yields: for a zero-duration prompt, in SaveImage's file work);
- succeeded: `execution_success` is handed to the hub for the prompt's client.

`time.monotonic()` is CLOCK_MONOTONIC on Linux, one clock for every process of the machine,
so these stamps compare directly with the benchmark's own. They are served as JSON on a port
of their own: `GET /stamps` -> {"accepted": {prompt_id: t}, "started": {...}, "succeeded": {...}},
`GET /accepted` -> the number accepted so far.

Run:  .venv/bin/python -m bench.timed_sim --backends N --port P --stamps-port S [--data-dir D]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any
from unittest import mock

from aiohttp import web

from comfyfleet.sim import run_sim
from comfyfleet.sim import server as sim_server
from comfyfleet.sim.hub import Hub
from comfyfleet.sim.prompt_queue import PromptQueue, QueueItem
from tests.support import LOOPBACK

ACCEPTED: dict[str, float] = {}
STARTED: dict[str, float] = {}
SUCCEEDED: dict[str, float] = {}


class StampingQueue(PromptQueue):
    def put(self, item: QueueItem) -> None:
        ACCEPTED[item.prompt_id] = time.monotonic()
        super().put(item)


class StampingHub(Hub):
    def send_to(self, sid: str, event: str, data: dict[str, Any]) -> None:
        if event == "execution_start":
            STARTED[data["prompt_id"]] = time.monotonic()
        elif event == "execution_success":
            SUCCEEDED[data["prompt_id"]] = time.monotonic()
        super().send_to(sid, event, data)


async def stamps(request: web.Request) -> web.Response:
    return web.json_response({"accepted": ACCEPTED, "started": STARTED, "succeeded": SUCCEEDED})


async def accepted(request: web.Request) -> web.Response:
    return web.json_response(len(ACCEPTED))


async def serve(backends: int, port: int, stamps_port: int, data_dir: Path | None) -> None:
    app = web.Application()
    app.add_routes([web.get("/stamps", stamps), web.get("/accepted", accepted)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, stamps_port).start()
    try:
        with (
            mock.patch.object(sim_server, "PromptQueue", StampingQueue),
            mock.patch.object(sim_server, "Hub", StampingHub),
        ):
            await run_sim(backends, port, LOOPBACK, data_dir=data_dir)
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="the first simulator's port")
    parser.add_argument("--stamps-port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    asyncio.run(serve(args.backends, args.port, args.stamps_port, args.data_dir))


if __name__ == "__main__":
    main()
