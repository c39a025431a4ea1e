"""What the Comfy API v2 costs through comfyfleet, against Comfy's own comfy-api-proxy.

One zero-duration simulated ComfyUI (`comfyfleet sim --duration 0`); in front of it, in
processes of their own, `comfyfleet serve` (embedded PostgreSQL, outputs into S3 on moto), a
second `comfyfleet serve` storing outputs in a local directory instead (a database of its
own), and the official `comfy-api-proxy` (PyPI). Jobs go one at a time, taking turns: through
comfyfleet on S3, on local storage (the difference is what the bench's S3, moto, adds),
through the proxy, and straight to the simulator (POST /prompt, then /history/{prompt_id}),
the floor all stand on. Each job is a 64x64 invert graph whose color
changes every time (so ComfyUI's cache never answers it). Measured per job: the POST sent ->
the job seen finished, by polling every `--poll-ms` (both v2 surfaces: GET /api/v2/jobs/{id}
until `succeeded`, the contract's "poll-first" path; direct: GET /history/{id}). The same
polling for all three: what it adds is in every column. comfyfleet does more on the way:
every step recorded in PostgreSQL, the output streamed into S3 before it says succeeded.

Run from the repository root:  .venv/bin/python -m bench.v2_overhead [--jobs 200] [--poll-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import datetime
from typing import Any

import aiohttp

from bench.harness import (
    Component,
    bench_root,
    deploy,
    latency_ms,
    print_table,
    serve_beside,
)
from tests.support import LOOPBACK, free_ports, python_process

Submit = Callable[[aiohttp.ClientSession, dict[str, Any]], Awaitable[float]]


def graph(color: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "bench"}},
    }


def through_v2(base: str, poll: float, marks: list[dict[str, Any]] | None = None) -> Submit:
    """With `marks`, each job's id and when (wall clock) it was sent, answered and seen
    finished, for `phases`."""
    async def submit(http: aiohttp.ClientSession, workflow: dict[str, Any]) -> float:
        started, sent = time.monotonic(), time.time()
        async with http.post(f"{base}/api/v2/jobs", json={"workflow": workflow}) as response:
            assert response.status == 201, await response.text()
            job = await response.json()
        answered = time.time()
        while job["status"] not in ("succeeded", "failed", "canceled"):
            await asyncio.sleep(poll)
            async with http.get(f"{base}/api/v2/jobs/{job['id']}") as response:
                job = await response.json()
        assert job["status"] == "succeeded", job
        if marks is not None:
            marks.append({"id": job["id"], "sent": sent, "answered": answered,
                          "seen": time.time()})
        return time.monotonic() - started
    return submit


# A comfyfleet job's life in legs, by the times it records (GET /api/v1/jobs/{id}) and the
# client's own: (leg, from, to).
LEGS = [
    ("POST answered", "sent", "answered"),
    ("queued -> dispatched (claim)", "created_at", "dispatched_at"),
    ("dispatched -> running (POST /prompt, execution_start)", "dispatched_at", "started_at"),
    ("running -> succeeded (run, collect into storage)", "started_at", "finished_at"),
    ("succeeded -> seen by the poller", "finished_at", "seen"),
]


async def phases(http: aiohttp.ClientSession, base: str, marks: list[dict[str, Any]]
                 ) -> dict[str, dict[str, float]]:
    """Where a comfyfleet job's time goes: the legs of LEGS, p50/p95 in ms. (The client's
    and the service's clocks are the same machine's.)"""
    legs: dict[str, list[float]] = {leg: [] for leg, _, _ in LEGS}
    for mark in marks:
        async with http.get(f"{base}/api/v1/jobs/{mark['id']}") as response:
            job = await response.json()
        times = {**mark, **{name: datetime.fromisoformat(job[name]).timestamp() for name in
                            ("created_at", "dispatched_at", "started_at", "finished_at")}}
        for leg, start, end in LEGS:
            legs[leg].append(times[end] - times[start])
    return {leg: latency_ms(values) for leg, values in legs.items()}


def direct(sim: str, poll: float) -> Submit:
    async def submit(http: aiohttp.ClientSession, workflow: dict[str, Any]) -> float:
        started = time.monotonic()
        prompt_id = str(uuid.uuid4())
        async with http.post(f"{sim}/prompt", json={"prompt": workflow,
                                                    "prompt_id": prompt_id}) as response:
            assert response.status == 200, await response.text()
        while True:
            async with http.get(f"{sim}/history/{prompt_id}") as response:
                if prompt_id in await response.json():
                    return time.monotonic() - started
            await asyncio.sleep(poll)
    return submit


async def run(jobs: int, poll_ms: float) -> dict[str, Any]:
    poll = poll_ms / 1000
    async with AsyncExitStack() as stack:
        root = stack.enter_context(bench_root())
        deployment = await deploy(stack, root, 1)
        sim = deployment.sims.urls[0]
        port = free_ports(1)
        proxy = f"http://{LOOPBACK}:{port}"
        proxy_process = await stack.enter_async_context(python_process(
            "comfy_api_proxy.cli", "--comfyui", sim, "--port", str(port),
            ready_url=proxy + "/api/v2/health"))
        local = await serve_beside(stack, deployment, root / "data-local", [sim])
        meter = deployment.meter
        meter.components.append(Component("comfyfleet serve, local storage",
                                          [local.process.pid]))
        meter.components.append(Component("comfy-api-proxy", [proxy_process.pid]))
        marks: list[dict[str, Any]] = []
        local_marks: list[dict[str, Any]] = []
        ways: dict[str, Submit] = {
            "comfyfleet /api/v2": through_v2(deployment.serve.base, poll, marks),
            "comfyfleet /api/v2, local storage": through_v2(local.base, poll, local_marks),
            "comfy-api-proxy": through_v2(proxy, poll),
            "direct to ComfyUI": direct(sim, poll),
        }
        http = deployment.http
        for submit in ways.values():  # warm up: connections, first-use costs
            for color in range(3):
                await submit(http, graph(color))
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        marks.clear()
        local_marks.clear()
        meter.start()
        for index in range(jobs):
            for name, submit in ways.items():
                seconds[name].append(await submit(http, graph(1000 + index)))
        meter.stop()
        legs = await phases(http, deployment.serve.base, marks)
        local_legs = await phases(http, local.base, local_marks)
    results = {name: latency_ms(values) for name, values in seconds.items()}
    print_table(["submit -> seen finished", "jobs", "p50 ms", "p95 ms", "p99 ms"],
                [(name, r["samples"], r["p50"], r["p95"], r["p99"])
                 for name, r in results.items()])
    floor = results["direct to ComfyUI"]["p50"]
    print_table(["added over direct", "p50 ms"],
                [(name, round(r["p50"] - floor, 2)) for name, r in results.items()
                 if name != "direct to ComfyUI"])
    print_table(["comfyfleet's legs", "S3 p50 ms", "S3 p95 ms", "local p50 ms", "local p95 ms"],
                [(leg, r["p50"], r["p95"], local_legs[leg]["p50"], local_legs[leg]["p95"])
                 for leg, r in legs.items()])
    meter.print()
    return {"jobs": jobs, "poll_ms": poll_ms, "latency_ms": results, "legs_ms": legs,
            "local_legs_ms": local_legs,
            "cpu": meter.as_json(),
            "machine": platform.machine(), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs through each way")
    parser.add_argument("--poll-ms", type=float, default=2.0,
                        help="how often each client asks whether its job finished")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.jobs, args.poll_ms))))


if __name__ == "__main__":
    main()
