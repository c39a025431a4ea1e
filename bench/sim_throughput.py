"""How many zero-duration prompts per second one simulator process completes.

Each prompt goes the way a client drives ComfyUI: POST /prompt with a client_id, then wait on
the websocket for its `executing {"node": null}`. The simulator runs in its own process
(`comfyfleet sim`); this process is the client, keeping `--window` prompts in flight. The
baseline, measured in the same run with the same client, is a bare aiohttp server (also in
its own process) answering each POST with its JSON body: an HTTP round trip with no work. A
second baseline is the disk: how many directories with a small file this process creates
per second, one after the other, in the simulator's data directory (what SaveImage with a
unique prefix does per prompt), after the simulator's workloads. Each figure is the median
of `--runs` runs, after a warm-up run; the simulator's and the echo server's CPU time per
request is shown too. The data directory is a temporary one, on the file system of $TMPDIR
(default /tmp).

Run from the repository root:
    .venv/bin/python -m bench.sim_throughput [--prompts 4000] [--window 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import itertools
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image

from tests.support import LOOPBACK, free_ports, python_process

FINISHED = '"executing", "data": {"node": null'  # the only frames the client parses
INPUT_IMAGE = "bench.png"  # uploaded before the workloads run
BASELINE = "baseline: aiohttp echo round trip"
_prompt_numbers = itertools.count()


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


def load_prompt(n: int) -> dict[str, Any]:
    """An uploaded input image, inverted and saved with a unique prefix (everything but
    SaveImage comes from the cache, as long as the input file stays the same)."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": INPUT_IMAGE}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": f"bench/{n}/inverted"},
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
    "LoadImage -> ImageInvert -> SaveImage, unique prefix": load_prompt,
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
        # Numbers never used before in this process: prefixes stay unique across runs too.
        numbers = itertools.islice(_prompt_numbers, count)
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


async def upload_input(url: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 10)).save(buffer, format="PNG")
    form = aiohttp.FormData()
    form.add_field("image", buffer.getvalue(), filename=INPUT_IMAGE, content_type="image/png")
    async with aiohttp.ClientSession() as http, http.post(f"{url}/upload/image", data=form) as r:
        r.raise_for_status()


async def disk_creations(data_dir: str, count: int) -> float:
    """Seconds to create `count` directories, each with a 300-byte file, on the disk of
    `data_dir`, one after the other."""
    return await asyncio.to_thread(_create_files, tempfile.mkdtemp(dir=data_dir), count)


def _create_files(directory: str, count: int) -> float:
    data = bytes(300)
    started = time.perf_counter()
    for n in range(count):
        folder = os.path.join(directory, str(n))
        os.mkdir(folder)
        with open(os.path.join(folder, "out_00001_.png"), "wb") as f:
            f.write(data)
    return time.perf_counter() - started


@dataclass
class Figures:
    rate: float  # requests per second
    server_ms: float | None  # CPU time the server process spent per request


def cpu_seconds(pid: int) -> float:
    """User and system time a process has used (Linux: /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    run: Callable[[int], Awaitable[float]], count: int, runs: int, server: int | None = None
) -> Figures:
    """Medians of `runs` runs after a warm-up run; CPU time of the `server` process if given.

    CPU time per request is the steadier figure on a shared machine: other load slows the
    run down, but hardly changes how much work each request is."""
    await run(count)
    rates, cpu = [], []
    for _ in range(runs):
        before = cpu_seconds(server) if server is not None else 0.0
        rates.append(count / await run(count))
        if server is not None:
            cpu.append((cpu_seconds(server) - before) / count * 1000)
    return Figures(statistics.median(rates), statistics.median(cpu) if cpu else None)


async def bench(count: int, window: int, runs: int) -> None:
    results: dict[str, Figures] = {}
    echo_port = free_ports(1)
    echo_url = f"http://{LOOPBACK}:{echo_port}"
    async with python_process("bench.sim_throughput", "--echo-server", str(echo_port),
                              ready_url=f"{echo_url}/ready") as echo:
        echoes = functools.partial(run_echoes, echo_url, window=window)
        results[BASELINE] = await measure(echoes, count, runs, echo.pid)

    with tempfile.TemporaryDirectory(prefix="comfyfleet-bench-") as data_dir:
        port = free_ports(1)
        url = f"http://{LOOPBACK}:{port}"
        async with python_process("comfyfleet", "sim", "--port", str(port), "--data-dir",
                                  data_dir, ready_url=f"{url}/prompt") as sim:
            await upload_input(url)
            for name, make in WORKLOADS.items():
                prompts = functools.partial(run_prompts, url, make, window=window)
                results[name] = await measure(prompts, count, runs, sim.pid)
        # After the simulator: the writes of a measurement before would still be flushed to the
        # disk during its first workloads.
        creations = functools.partial(disk_creations, data_dir)
        results["baseline: disk, a directory and a file"] = await measure(creations, count, runs)

    baseline = results[BASELINE].rate
    print(f"| {'workload':<54} | {'per second':>10} | {'vs echo':>7} | {'server CPU ms':>13} |")
    print(f"|{'-' * 56}|{'-' * 11}:|{'-' * 8}:|{'-' * 14}:|")
    for name, figures in results.items():
        rate, ratio = f"{figures.rate:.0f}", f"{figures.rate / baseline:.2f}"
        cpu = "" if figures.server_ms is None else f"{figures.server_ms:.3f}"
        print(f"| {name:<54} | {rate:>10} | {ratio:>7} | {cpu:>13} |")
    print(f"\n{os.cpu_count()} CPUs; {count} requests a run, {window} in flight, median of {runs}; "
          f"data directory in {tempfile.gettempdir()}; server CPU: per request, its process")


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
