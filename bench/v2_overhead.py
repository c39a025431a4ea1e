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

`--explain` takes the gap to the proxy apart, in the same run, with more ways taking turns:
comfyfleet on local storage with `synchronous_commit=off` on its database (no WAL flush at
its commits: a diagnostic, never a setting to run with); the proxy with its SQLite state
(`--state-dir`: WAL, `synchronous=NORMAL` as shipped, which syncs at checkpoints only) and
the same with `synchronous=FULL` (bench.durable_proxy: a sync at every commit, as
PostgreSQL's); and a graph whose output is text, no file (PrimitiveString -> PreviewAny),
through comfyfleet (nothing fetched from /view, nothing stored), the proxy and straight to
ComfyUI. The serve processes then run under bench.step_trace and the simulator under
bench.timed_sim: each step of a job's way is stamped, and their p50s printed.

Run from the repository root:  .venv/bin/python -m bench.v2_overhead [--jobs 200] [--poll-ms 2]
[--explain]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path
from statistics import median
from typing import Any

import aiohttp

from bench.harness import (
    CPU_SAMPLES_WRITE_SECONDS,
    Component,
    Deployment,
    Serve,
    bench_root,
    deploy,
    latency_ms,
    print_table,
    serve_beside,
)
from tests.support import LOOPBACK, free_ports, python_process

Submit = Callable[[aiohttp.ClientSession, dict[str, Any]], Awaitable[float]]
Graph = Callable[[int], dict[str, Any]]


def graph(color: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "bench"}},
    }


def text_graph(value: int) -> dict[str, Any]:
    """A graph whose only output is text: no file to fetch or store."""
    return {
        "1": {"class_type": "PrimitiveString", "inputs": {"value": f"bench {value}"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
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
    and the service's clocks are the same machine's.) Each mark gets the job's recorded
    times and its prompt_id too."""
    legs: dict[str, list[float]] = {leg: [] for leg, _, _ in LEGS}
    for mark in marks:
        async with http.get(f"{base}/api/v1/jobs/{mark['id']}") as response:
            job = await response.json()
        mark.update({name: datetime.fromisoformat(job[name]).timestamp() for name in
                     ("created_at", "dispatched_at", "started_at", "finished_at")})
        mark["prompt_id"] = job["prompt_id"]
        for leg, start, end in LEGS:
            legs[leg].append(mark[end] - mark[start])
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


# The steps of a traced comfyfleet job (bench.step_trace in serve, bench.timed_sim in the
# simulator, the job's recorded times, the client's marks), each with where it is stamped.
SIM_STEPS = {"accepted": "sim: prompt queued (POST /prompt handled)",
             "started": "sim: execution_start queued (sent as its loop yields)",
             "succeeded": "sim: execution_success queued"}
RECORDED = {"sent": "client: POST /api/v2/jobs sent",
            "answered": "client: 201 read",
            "dispatched_at": "dispatched_at (insert's statement_timestamp())",
            "started_at": "started_at (execution_start handled)",
            "finished_at": "finished_at (before the finish statement)",
            "seen": "client: succeeded seen"}


def steps(marks: list[dict[str, Any]], traced: dict[str, dict[str, list[float]]],
          sim: dict[str, dict[str, float]], monotonic_to_wall: float
          ) -> list[tuple[str, float, float, float | str]]:
    """Each step of the traced jobs, in the order of their p50s: (step, p50 ms from the POST
    sent, p50 ms of the step's own: from the step before it, job by job; and for a step
    stamped in serve, the p50 of the CPU serve's event loop used since its step before)."""
    timelines, cpu = [], []
    for mark in marks:
        line = {RECORDED[name]: mark[name] for name in RECORDED}
        stamped = traced.get(mark["id"], {})
        line.update({step: at for step, (at, _) in stamped.items()})
        cpu.append({step: used for step, (_, used) in stamped.items()})
        for kind, label in SIM_STEPS.items():
            if mark["prompt_id"] in sim.get(kind, {}):
                line[label] = sim[kind][mark["prompt_id"]] + monotonic_to_wall
        timelines.append(line)
    names = {name for line in timelines for name in line}
    at = {name: median(1000 * (line[name] - line[RECORDED["sent"]]) for line in timelines
                       if name in line) for name in names}
    order = sorted(names, key=at.__getitem__)
    in_serve = [name for name in order if any(name in used for used in cpu)]
    table: list[tuple[str, float, float, float | str]] = []
    for before, name in zip([None, *order], order, strict=False):
        own = 0.0 if before is None else median(
            1000 * (line[name] - line[before]) for line in timelines
            if name in line and before in line)
        serve_cpu: float | str = ""
        if name in in_serve and in_serve.index(name) > 0:
            previous = in_serve[in_serve.index(name) - 1]
            serve_cpu = round(median(1000 * (used[name] - used[previous]) for used in cpu
                                     if name in used and previous in used), 2)
        table.append((name, round(at[name], 2), round(own, 2), serve_cpu))
    return table


async def traced_stamps(serve: Serve, output: Path) -> dict[str, dict[str, list[float]]]:
    """The stamps bench.step_trace took in `serve`, written on SIGUSR2."""
    await asyncio.to_thread(output.unlink, missing_ok=True)
    serve.process.send_signal(signal.SIGUSR2)
    # Written (whole: renamed into place) by the process's signal handler, which runs as soon
    # as its event loop wakes, with nothing else to do by now.
    await asyncio.sleep(CPU_SAMPLES_WRITE_SECONDS)
    stamps: dict[str, dict[str, list[float]]] = json.loads(
        await asyncio.to_thread(output.read_text))
    return stamps


# The ways --explain adds: (name, graph); each also a way of taking out one piece.
IMAGE, TEXT = "image", "text"
S3, LOCAL, LOCAL_OFF = ("comfyfleet /api/v2", "comfyfleet /api/v2, local storage",
                        "comfyfleet, local, synchronous_commit=off")
PROXY, PROXY_STATE, PROXY_FULL = ("comfy-api-proxy", "comfy-api-proxy --state-dir",
                                  "comfy-api-proxy --state-dir, synchronous=FULL")
DIRECT = "direct to ComfyUI"


def decomposition(p50: dict[str, float]) -> list[tuple[str, float]]:
    """The pieces of the gap between comfyfleet and the proxy, from the ways' p50s (ms)."""
    floor, text_floor = p50[DIRECT], p50[f"{DIRECT}, text output"]
    saving = p50[DIRECT] - text_floor  # the simulator's SaveImage, every way pays it
    ours_bare = p50[f"{LOCAL_OFF}, text output"] - text_floor
    proxy_bare = p50[f"{PROXY}, text output"] - text_floor
    return [
        ("comfyfleet on S3, added over direct", round(p50[S3] - floor, 2)),
        ("  moto's PUT (S3 - local)", round(p50[S3] - p50[LOCAL], 2)),
        ("  WAL flushes of the two commits (local - local with synchronous_commit=off)",
         round(p50[LOCAL] - p50[LOCAL_OFF], 2)),
        ("  the output's copy: /view + the local write (local off: image - text, less the "
         "simulator's SaveImage)", round(p50[LOCAL_OFF] - p50[f"{LOCAL_OFF}, text output"]
                                         - saving, 2)),
        ("  the rest: no flush, no file (local off, text output, over direct)",
         round(ours_bare, 2)),
        ("comfy-api-proxy (in memory, as the bench runs it), added over direct",
         round(p50[PROXY] - floor, 2)),
        ("  the same, text output, over direct", round(proxy_bare, 2)),
        ("  its SQLite state as shipped (--state-dir)", round(p50[PROXY_STATE] - p50[PROXY], 2)),
        ("  its SQLite state synced at every commit (synchronous=FULL)",
         round(p50[PROXY_FULL] - p50[PROXY], 2)),
        ("comfyfleet without the pieces the proxy does not do, less the proxy",
         round(ours_bare - proxy_bare, 2)),
    ]


async def run(jobs: int, poll_ms: float, explain: bool = False) -> dict[str, Any]:
    poll = poll_ms / 1000
    async with AsyncExitStack() as stack:
        root = stack.enter_context(bench_root())
        traces = {S3: root / "trace-s3.json", LOCAL: root / "trace-local.json",
                  LOCAL_OFF: root / "trace-local-off.json"} if explain else {}
        deployment = await deploy(stack, root, 1, timed=explain, step_trace=traces.get(S3))
        sim = deployment.sims.urls[0]
        meter = deployment.meter
        proxy = await comfy_api_proxy(stack, deployment, "comfy_api_proxy.cli", PROXY)
        local = await serve_beside(stack, deployment, root / "data-local", [sim],
                                   step_trace=traces.get(LOCAL))
        meter.components.append(Component("comfyfleet serve, local storage",
                                          [local.process.pid]))
        # The proxy's ways' marks: when its answers came.
        answers: dict[str, list[dict[str, Any]]] = {PROXY: []}
        # The comfyfleet ways: their serve, and each job's marks (for its legs and steps).
        followed: dict[str, tuple[Serve, list[dict[str, Any]]]] = {
            S3: (deployment.serve, []), LOCAL: (local, [])}
        ways: dict[str, tuple[Submit, Graph]] = {
            S3: (through_v2(deployment.serve.base, poll, followed[S3][1]), graph),
            LOCAL: (through_v2(local.base, poll, followed[LOCAL][1]), graph),
            PROXY: (through_v2(proxy, poll, answers[PROXY]), graph),
            DIRECT: (direct(sim, poll), graph),
        }
        if explain:
            local_off = await serve_beside(
                stack, deployment, root / "data-local-off", [sim], step_trace=traces[LOCAL_OFF],
                database_settings={"synchronous_commit": "off"})
            meter.components.append(Component(LOCAL_OFF, [local_off.process.pid]))
            followed[LOCAL_OFF] = (local_off, [])
            ways[LOCAL_OFF] = (through_v2(local_off.base, poll, followed[LOCAL_OFF][1]), graph)
            for name, module in ((PROXY_STATE, "comfy_api_proxy.cli"),
                                 (PROXY_FULL, "bench.durable_proxy")):
                base = await comfy_api_proxy(stack, deployment, module, name,
                                             root / name.replace(" ", "_"))
                answers[name] = []
                ways[name] = (through_v2(base, poll, answers[name]), graph)
            for name, serve in ((LOCAL, local), (LOCAL_OFF, local_off)):
                followed[f"{name}, text output"] = (serve, [])
                ways[f"{name}, text output"] = (
                    through_v2(serve.base, poll, followed[f"{name}, text output"][1]), text_graph)
            answers[f"{PROXY}, text output"] = []
            ways[f"{PROXY}, text output"] = (
                through_v2(proxy, poll, answers[f"{PROXY}, text output"]), text_graph)
            ways[f"{DIRECT}, text output"] = (direct(sim, poll), text_graph)
        http = deployment.http
        for submit, make in ways.values():  # warm up: connections, first-use costs
            for color in range(3):
                await submit(http, make(color))
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for marked in [*answers.values(), *(marked for _, marked in followed.values())]:
            marked.clear()
        meter.start()
        for index in range(jobs):
            for name, (submit, make) in ways.items():
                seconds[name].append(await submit(http, make(1000 + index)))
        meter.stop()
        load = os.getloadavg()
        legs = {name: await phases(http, serve.base, marked)
                for name, (serve, marked) in followed.items()}
        traced: dict[str, list[tuple[str, float, float, float | str]]] = {}
        if explain:
            sim_stamps = await deployment.sims.stamps(http)
            offset = time.time() - time.monotonic()
            by_serve = {id(serve): await traced_stamps(serve, output) for serve, output in
                        ((deployment.serve, traces[S3]), (local, traces[LOCAL]),
                         (local_off, traces[LOCAL_OFF]))}
            traced = {name: steps(marked, by_serve[id(serve)], sim_stamps, offset)
                      for name, (serve, marked) in followed.items()}
    results = {name: latency_ms(values) for name, values in seconds.items()}
    print_table(["submit -> seen finished", "jobs", "p50 ms", "p95 ms", "p99 ms"],
                [(name, r["samples"], r["p50"], r["p95"], r["p99"])
                 for name, r in results.items()])
    floor = results[DIRECT]["p50"]
    answered = {name: latency_ms([mark["answered"] - mark["sent"] for mark in marked])["p50"]
                for name, marked in [*answers.items(),
                                     *((name, marked) for name, (_, marked) in followed.items())]}
    print_table(["added over direct", "p50 ms", "POST answered, p50 ms"],
                [(name, round(r["p50"] - floor, 2), answered.get(name, ""))
                 for name, r in results.items() if name != DIRECT])
    print_table(["comfyfleet's legs, p50 / p95 ms", *followed],
                [(leg, *(f"{legs[name][leg]['p50']} / {legs[name][leg]['p95']}"
                         for name in followed)) for leg, _, _ in LEGS])
    pieces = decomposition({name: r["p50"] for name, r in results.items()}) if explain else []
    if explain:
        print_table(["the gap taken apart (differences of p50s)", "ms"], pieces)
        for name, table in traced.items():
            print_table([f"{name}: step (traced)", "p50 ms from sent", "p50 ms step's own",
                         "serve CPU ms since its step before"], table)
    meter.print()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return {"jobs": jobs, "poll_ms": poll_ms, "latency_ms": results,
            "post_answered_ms": answered, "legs_ms": legs,
            "decomposition_ms": dict(pieces), "steps_ms": traced,
            "cpu": meter.as_json(), "load": load,
            "machine": platform.machine(), "python": platform.python_version()}


async def comfy_api_proxy(stack: AsyncExitStack, deployment: Deployment, module: str, name: str,
                          state_dir: Path | None = None) -> str:
    """comfy-api-proxy (run as `module`) in front of the deployment's simulator, its CPU
    metered as `name`; with its SQLite state in `state_dir`, if given. Its base URL."""
    port = free_ports(1)
    base = f"http://{LOOPBACK}:{port}"
    state = ("--state-dir", str(state_dir)) if state_dir is not None else ()
    process = await stack.enter_async_context(python_process(
        module, "--comfyui", deployment.sims.urls[0], "--port", str(port), *state,
        ready_url=base + "/api/v2/health"))
    deployment.meter.components.append(Component(name, [process.pid]))
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs through each way")
    parser.add_argument("--poll-ms", type=float, default=2.0,
                        help="how often each client asks whether its job finished")
    parser.add_argument("--explain", action="store_true",
                        help="take the gap to the proxy apart (more ways, steps traced)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.jobs, args.poll_ms, args.explain))))


if __name__ == "__main__":
    main()
