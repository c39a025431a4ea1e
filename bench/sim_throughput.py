"""How many zero-duration prompts per second one simulator process completes.

Each prompt goes the way a client drives ComfyUI: POST /prompt with a client_id, then wait on
the websocket for its `executing {"node": null}`. The simulator runs in its own process
(`comfyfleet sim`); this process is the client, keeping `--window` prompts in flight. The
baseline, measured in the same run with the same client, is a bare aiohttp server (also in
its own process) answering each POST with its JSON body: an HTTP round trip with no work.
Each figure is the median of `--runs` runs, after a warm-up run.

Run from the repository root:
    .venv/bin/python -m bench.sim_throughput [--prompts 4000] [--window 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from tests.support import LOOPBACK, free_ports, python_process

FINISHED = '"executing", "data": {"node": null'  # the only frames the client parses


def protocol_prompt(n: int) -> dict[str, Any]:
    """No image and no file: the protocol's own cost. PrimitiveInt's value differs each time,
    so nothing is served from the cache."""
    return {
        "1": {"class_type": "PrimitiveInt", "inputs": {"value": n}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }


def save_prompt(n: int) -> dict[str, Any]:
    """What a job gateway sends: a unique filename_prefix, so SaveImage writes every time."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": f"bench/{n}/out"},
        },
    }


def work_prompt(n: int) -> dict[str, Any]:
    """SimulatedWork with no time and one step (so one progress update and one preview),
    its output to the websocket, no file."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": n % 0xFFFFFF},
        },
        "2": {
            "class_type": "SimulatedWork",
            "inputs": {"image": ["1", 0], "seconds": 0, "steps": 1},
        },
        "3": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}},
    }


WORKLOADS: dict[str, Callable[[int], dict[str, Any]]] = {
    "PrimitiveInt -> PreviewAny": protocol_prompt,
    "EmptyImage -> SaveImage, unique prefix": save_prompt,
    "EmptyImage -> SimulatedWork -> SaveImageWebsocket": work_prompt,
}


async def run_prompts(
    url: str, make: Callable[[int], dict[str, Any]], count: int, window: int
) -> float:
    """Seconds to complete `count` prompts with `window` in flight."""
    client_id = uuid.uuid4().hex
    pending: dict[str, asyncio.Future[None]] = {}
    connector = aiohttp.TCPConnector(limit=window)
    async with aiohttp.ClientSession(connector=connector) as http:
        ws = await http.ws_connect(f"{url}/ws?clientId={client_id}", max_msg_size=0)

        async def read() -> None:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT and FINISHED in message.data:
                    prompt_id = json.loads(message.data)["data"]["prompt_id"]
                    pending.pop(prompt_id).set_result(None)

        reader = asyncio.create_task(read())
        numbers = iter(range(count))
        loop = asyncio.get_running_loop()

        async def submitter() -> None:
            for n in numbers:
                prompt_id = str(uuid.uuid4())
                done = pending[prompt_id] = loop.create_future()
                body = {"prompt": make(n), "client_id": client_id, "prompt_id": prompt_id}
                async with http.post(f"{url}/prompt", json=body) as response:
                    if response.status != 200:
                        raise RuntimeError(f"prompt {n}: {response.status} {await response.text()}")
                await done

        started = time.perf_counter()
        await asyncio.gather(*(submitter() for _ in range(window)))
        elapsed = time.perf_counter() - started
        reader.cancel()
        await ws.close()
    return elapsed


async def run_echoes(url: str, count: int, window: int) -> float:
    """Seconds for `count` POSTs of a prompt-sized body to the echo server."""
    body = {"prompt": save_prompt(0), "client_id": "bench", "prompt_id": str(uuid.uuid4())}
    connector = aiohttp.TCPConnector(limit=window)
    async with aiohttp.ClientSession(connector=connector) as http:
        numbers = iter(range(count))

        async def poster() -> None:
            for _ in numbers:
                async with http.post(f"{url}/echo", json=body) as response:
                    await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(poster() for _ in range(window)))
        return time.perf_counter() - started


def serve_echo(port: int) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response(await request.json())

    async def ready(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.add_routes([web.post("/echo", echo), web.get("/ready", ready)])
    web.run_app(app, host=LOOPBACK, port=port, access_log=None, print=None)


async def median_rate(run: Callable[[int], Awaitable[float]], count: int, runs: int) -> float:
    """Requests per second, the median of `runs` runs after a warm-up run."""
    await run(count)
    return statistics.median([count / await run(count) for _ in range(runs)])


async def bench(count: int, window: int, runs: int) -> None:
    rates: dict[str, float] = {}
    echo_port = free_ports(1)
    echo_url = f"http://{LOOPBACK}:{echo_port}"
    async with python_process("bench.sim_throughput", "--echo-server", str(echo_port),
                              ready_url=f"{echo_url}/ready"):
        echoes = functools.partial(run_echoes, echo_url, window=window)
        rates["baseline: aiohttp echo round trip"] = await median_rate(echoes, count, runs)

    with tempfile.TemporaryDirectory(prefix="comfyfleet-bench-") as data_dir:
        port = free_ports(1)
        url = f"http://{LOOPBACK}:{port}"
        async with python_process("comfyfleet", "sim", "--port", str(port), "--data-dir",
                                  data_dir, ready_url=f"{url}/prompt"):
            for name, make in WORKLOADS.items():
                prompts = functools.partial(run_prompts, url, make, window=window)
                rates[name] = await median_rate(prompts, count, runs)

    baseline = rates["baseline: aiohttp echo round trip"]
    print(f"| {'workload':<50} | {'per second':>10} | {'vs echo':>7} |")
    print(f"|{'-' * 52}|{'-' * 11}:|{'-' * 8}:|")
    for name, rate in rates.items():
        print(f"| {name:<50} | {rate:>10.0f} | {rate / baseline:>7.2f} |")
    print(f"\n{os.cpu_count()} CPUs; {count} requests a run, {window} in flight, median of {runs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4000, help="per workload (default 4000)")
    parser.add_argument("--window", type=int, default=32, help="in flight at once (default 32)")
    parser.add_argument("--runs", type=int, default=3, help="median of this many (default 3)")
    parser.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server is not None:
        serve_echo(args.echo_server)
    else:
        asyncio.run(bench(args.prompts, args.window, args.runs))


if __name__ == "__main__":
    main()
